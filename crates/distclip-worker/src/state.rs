//! The trainer's state as bytes (parameters, AdamW moments, step) for healing a joining worker
//! from a peer and for checkpoints.
//!
//! Layout, all little-endian: magic `DCLPSTAT` (8 bytes), format version `u32`, step `u64`,
//! layout fingerprint `u64`, element count `n` `u64`, then `n` f32 parameters, `n` f32 first
//! moments, `n` f32 second moments, and an FNV-1a checksum `u64` of everything before it.

use crate::StepError;
use crate::params::Fnv;

const MAGIC: &[u8; 8] = b"DCLPSTAT";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 8 + 8;

/// What the bytes carry.
pub(crate) struct TrainerState {
    pub step: u64,
    pub fingerprint: u64,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h.word(u64::from_le_bytes(a));
    }
    h.bytes(words.remainder());
    h.word(bytes.len() as u64);
    h.finish()
}

pub(crate) fn encode(step: u64, fingerprint: u64, params: &[f32], m: &[f32], v: &[f32]) -> Vec<u8> {
    let n = params.len();
    let mut out = Vec::with_capacity(HEADER + 12 * n + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&step.to_le_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    for buf in [params, m, v] {
        for x in buf {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    let sum = hash(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub(crate) fn decode(bytes: &[u8]) -> Result<TrainerState, StepError> {
    let err = |m: String| StepError::State(m);
    if bytes.len() < HEADER + 8 || &bytes[..8] != MAGIC {
        return Err(err("not distclip trainer state (bad magic or too short)".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(err(format!("format version {version}, this build reads {VERSION}")));
    }
    let step = u64_at(bytes, 12);
    let fingerprint = u64_at(bytes, 20);
    let n = u64_at(bytes, 28);
    let expected = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_mul(12))
        .and_then(|b| b.checked_add(HEADER + 8));
    if expected != Some(bytes.len()) {
        return Err(err(format!("{} bytes for {n} parameters: truncated or corrupt", bytes.len())));
    }
    let body_end = bytes.len() - 8;
    if hash(&bytes[..body_end]) != u64_at(bytes, body_end) {
        return Err(err("checksum mismatch: the state was corrupted in transit or on disk".into()));
    }
    let n = n as usize;
    let at = |k: usize| HEADER + 4 * n * k;
    Ok(TrainerState {
        step,
        fingerprint,
        params: floats(&bytes[at(0)..at(1)]),
        m: floats(&bytes[at(1)..at(2)]),
        v: floats(&bytes[at(2)..at(3)]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_an_error() {
        let bytes = encode(7, 0xabc, &[1.0, 2.0], &[0.1, 0.2], &[0.01, 0.02]);
        let s = decode(&bytes).unwrap();
        assert_eq!((s.step, s.fingerprint), (7, 0xabc));
        assert_eq!((s.params, s.m, s.v), (vec![1.0, 2.0], vec![0.1, 0.2], vec![0.01, 0.02]));

        let msg = |b: &[u8]| decode(b).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(&bytes[..bytes.len() - 1]).contains("truncated"));
        assert!(msg(b"garbage").contains("magic"));
        let mut flipped = bytes.clone();
        flipped[HEADER + 3] ^= 1;
        assert!(msg(&flipped).contains("checksum"));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(msg(&v2).contains("version 2"));
        // A huge element count must not overflow or allocate.
        let mut huge = bytes.clone();
        huge[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(msg(&huge).contains("truncated"));
    }
}
