//! Whatever workers send, the machine answers or refuses: never a panic. [`drive_untrusted`]
//! reads bytes as a sequence of control-plane requests (each decoded as gRPC would decode it)
//! and feeds them to one machine, with the clock moved between them. It is the entry point of
//! the fuzz target `fuzz/fuzz_targets/messages.rs` and of a seeded unit test.

use super::{Machine, MachineConfig};
use crate::ledger::ShardInfo;
use distclip_proto::v1::{
    CommitRequest, HeartbeatRequest, JoinRequest, LeaseRequest, LeaveRequest, QuorumRequest, RecordRequest,
};
use prost::Message;
use std::time::{Duration, Instant};

/// Feed `bytes` to a fresh machine of 4 shards and 2 minimum workers. Each record is one byte
/// of kind (modulo 9), one of clock advance in 10 ms, two of length (little endian) and that many
/// bytes of message. Returns how many records decoded, so the fuzzer sees progress.
#[doc(hidden)]
pub fn drive_untrusted(bytes: &[u8]) -> usize {
    let cfg = MachineConfig {
        min_workers: 2,
        max_workers: 8,
        join_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        step_timeout: Duration::from_secs(30),
        shards_per_worker: 2,
        epochs: 2,
        max_steps: None,
        seed: 0,
        shuffle: true,
        resampled: false,
        samples_per_epoch: None,
        total_steps: 0,
        checkpoint_every: 2,
        max_non_finite_steps: 3,
    };
    let shards = (0..4).map(|i| ShardInfo { url: format!("/d/{i}.tar"), weight: 1.0 }).collect();
    let start = Instant::now();
    let mut now = start;
    let mut m = Machine::new(cfg, String::new(), "run-fuzz".into(), shards, now);
    let mut decoded = 0;
    let mut rest = bytes;
    while rest.len() >= 4 {
        let (kind, advance) = (rest[0] % 9, rest[1]);
        let len = (u16::from_le_bytes([rest[2], rest[3]]) as usize).min(rest.len() - 4);
        let body = &rest[4..4 + len];
        rest = &rest[4 + len..];
        now += Duration::from_millis(10 * u64::from(advance));
        let ok = match kind {
            0 => JoinRequest::decode(body).map(|r| drop(m.join(&r, now))).is_ok(),
            1 => HeartbeatRequest::decode(body).map(|r| { m.heartbeat(&r, now); }).is_ok(),
            2 => QuorumRequest::decode(body)
                .map(|r| {
                    if let Ok(ticket) = m.request_quorum(&r, now) {
                        let _ = m.poll_quorum(&r.worker_id, ticket);
                    }
                })
                .is_ok(),
            3 => LeaseRequest::decode(body).map(|r| drop(m.lease(&r, now))).is_ok(),
            4 => CommitRequest::decode(body)
                .map(|r| {
                    let (q, s, w) = (r.quorum_id, r.step, r.worker_id.clone());
                    let _ = m.vote(r, now);
                    let _ = m.poll_commit(q, s, &w);
                })
                .is_ok(),
            5 => LeaveRequest::decode(body).map(|r| m.leave(&r, now)).is_ok(),
            6 => RecordRequest::decode(body).map(|r| m.record(&r)).is_ok(),
            7 => {
                m.tick(now);
                true
            }
            _ => {
                let _ = m.status(now);
                let _ = m.snapshot();
                let _ = m.take_outbox();
                true
            }
        };
        decoded += usize::from(ok);
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use distclip_proto::v1::{ShardIndices, ShardReport, StepMetrics};

    fn record(kind: u8, advance: u8, msg: &impl Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![kind, advance];
        out.extend_from_slice(&(body.len() as u16).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A seeded stream (the shard order's generator), so a failing input can be rebuilt.
    fn next(state: &mut u64) -> u64 {
        distclip_rng::splitmix64(state)
    }

    /// Well-formed messages with hostile values: unknown workers, steps and quorums far off,
    /// shard indices and positions out of range, huge counts, non-finite losses.
    fn hostile(seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut out = Vec::new();
        let ids = ["a", "b", "c", ""];
        for _ in 0..60 {
            let r = next(&mut s);
            let id = ids[(r % 4) as usize].to_string();
            let big = |x: u64| if x.is_multiple_of(3) { u64::MAX - (x % 5) } else { x % 6 };
            let advance = (r >> 8) as u8 % 40;
            let rec = match (r >> 16) % 8 {
                0 => record(0, advance, &JoinRequest { worker_id: id.clone(), peer_address: format!("{id}:1"), step: big(r >> 20), ..Default::default() }),
                1 => record(1, advance, &HeartbeatRequest { worker_id: id, step: big(r >> 24), ..Default::default() }),
                2 => record(2, advance, &QuorumRequest { worker_id: id, step: big(r >> 20), epoch: big(r >> 28), has_data: r & 1 == 0, commit_quorum: big(r >> 32), known_quorum: big(r >> 36) }),
                3 => record(3, advance, &LeaseRequest { worker_id: id, want: (r >> 20) as u32, epoch: big(r >> 30), ..Default::default() }),
                4 => record(4, advance, &CommitRequest {
                    worker_id: id,
                    quorum_id: big(r >> 20),
                    step: big(r >> 24),
                    ok: r & 2 == 0,
                    non_finite: r & 4 == 0,
                    consumed: vec![ShardIndices { shard: big(r >> 34), indices: vec![0, u64::MAX, big(r >> 40)] }],
                    shard_reports: vec![ShardReport {
                        shard: big(r >> 44),
                        epoch: big(r >> 36),
                        samples: big(r >> 46),
                        skipped: vec![big(r >> 48)],
                        ..Default::default()
                    }],
                    metrics: Some(StepMetrics { loss: if r & 8 == 0 { f64::NAN } else { 1.0 }, samples: (r >> 50) as u32, ..Default::default() }),
                    ..Default::default()
                }),
                5 => record(5, advance, &LeaveRequest { worker_id: id, reason: String::new() }),
                6 => record(6, advance, &RecordRequest { worker_id: id, step: big(r >> 20), eval_json: "{\"x\":".into(), ..Default::default() }),
                _ => vec![7 + (r & 1) as u8, advance, 0, 0],
            };
            out.extend(rec);
        }
        out
    }

    #[test]
    fn hostile_and_random_requests_never_panic_the_machine() {
        let mut decoded = 0;
        for seed in 0..300 {
            decoded += drive_untrusted(&hostile(seed));
            // And raw bytes.
            let mut s = seed;
            let raw: Vec<u8> = (0..512).map(|_| next(&mut s) as u8).collect();
            drive_untrusted(&raw);
        }
        // The well-formed records did reach the machine.
        assert!(decoded > 300 * 50, "only {decoded} records decoded");
    }
}
