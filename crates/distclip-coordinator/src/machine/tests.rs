use super::*;
use distclip_proto::v1::{ShardIndices, ShardLease};

/// The machine config every unit test starts from (also used by `telemetry`'s tests).
pub(super) fn cfg() -> MachineConfig {
    MachineConfig {
        min_workers: 2,
        max_workers: 0,
        join_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        step_timeout: Duration::from_secs(30),
        shards_per_worker: 2,
        epochs: 1,
        max_steps: None,
        seed: 0,
        shuffle: false,
        resampled: false,
        samples_per_epoch: None,
        total_steps: 0,
        checkpoint_every: 0,
        max_non_finite_steps: 3,
    }
}

fn shards(n: usize) -> Vec<ShardInfo> {
    (0..n)
        .map(|i| ShardInfo {
            url: format!("/d/{i}.tar"),
            weight: if i == 0 { 3.0 } else { 1.0 },
        })
        .collect()
}

fn ms(t: Instant, ms: u64) -> Instant {
    t + Duration::from_millis(ms)
}

fn join(m: &mut Machine, id: &str, step: u64, now: Instant) {
    let req = JoinRequest {
        worker_id: id.into(),
        peer_address: format!("{id}:1"),
        device: "flex".into(),
        threads: 1,
        step,
        rank_hint: None,
    };
    m.join(&req, now).unwrap();
}

fn ask(m: &mut Machine, id: &str, step: u64, epoch: u64, has_data: bool, now: Instant) -> u64 {
    m.request_quorum(
        &QuorumRequest {
            worker_id: id.into(),
            step,
            epoch,
            has_data,
            commit_quorum: 0,
            known_quorum: 0,
        },
        now,
    )
    .unwrap()
}

fn answer(m: &Machine, id: &str, ticket: u64) -> QuorumResponse {
    m.poll_quorum(id, ticket)
        .unwrap()
        .unwrap_or_else(|| panic!("no quorum answer for {id} yet"))
}

/// Ask and take the answer at once (a quorum of one).
fn ask_now(m: &mut Machine, id: &str, step: u64, now: Instant) -> QuorumResponse {
    let ticket = ask(m, id, step, 0, true, now);
    answer(m, id, ticket)
}

fn action(r: &QuorumResponse) -> StepAction {
    StepAction::try_from(r.action).unwrap()
}

fn lease(m: &mut Machine, id: &str, want: u32, now: Instant) -> Vec<ShardLease> {
    let epoch = m.epoch();
    m.lease(
        &LeaseRequest {
            worker_id: id.into(),
            epoch,
            want,
            shard_reports: vec![],
            fresh: false,
        },
        now,
    )
    .unwrap()
    .leases
}

fn vote(
    m: &mut Machine,
    id: &str,
    q: &QuorumResponse,
    consumed: &[(u64, &[u64])],
    reports: Vec<ShardReport>,
    now: Instant,
) -> Option<CommitResponse> {
    let quorum_id = q.quorum.as_ref().unwrap().quorum_id;
    m.vote(
        CommitRequest {
            worker_id: id.into(),
            quorum_id,
            step: q.step,
            ok: true,
            error: String::new(),
            consumed: consumed
                .iter()
                .map(|(s, i)| ShardIndices {
                    shard: *s,
                    indices: i.to_vec(),
                })
                .collect(),
            shard_reports: reports,
            metrics: Some(distclip_proto::v1::StepMetrics {
                loss: 2.5,
                lr: 1e-3,
                samples: consumed.iter().map(|(_, i)| i.len() as u32).sum(),
                step_s: 0.5,
                ..Default::default()
            }),
            non_finite: false,
        },
        now,
    )
}

fn rep(shard: u64, epoch: u64, samples: u64) -> ShardReport {
    ShardReport {
        shard,
        epoch,
        samples,
        ..Default::default()
    }
}

fn kinds(m: &mut Machine) -> Vec<&'static str> {
    m.take_outbox().events.iter().map(|e| e.kind).collect()
}

/// Two members at step 0, both with data: the first TRAIN quorum.
/// What a coordinator restarted from the journal would load: `replica` (the state on disk)
/// with the line for the changes since the last call applied equals the machine's state.
fn journal_keeps_up(m: &mut Machine, replica: &mut SavedState) {
    let line = m.take_changes();
    let text = serde_json::to_string(&line).unwrap();
    replica.apply([serde_json::from_str(&text).unwrap()]);
    assert_eq!(*replica, m.snapshot());
}

fn two_training(n_shards: usize) -> (Machine, Instant, QuorumResponse) {
    let t = Instant::now();
    let mut m = Machine::new(cfg(), String::new(), "run-test".into(), shards(n_shards), t);
    join(&mut m, "a", 0, t);
    join(&mut m, "b", 0, t);
    let ta = ask(&mut m, "a", 0, 0, true, t);
    let tb = ask(&mut m, "b", 0, 0, true, t);
    let qa = answer(&m, "a", ta);
    assert_eq!(answer(&m, "b", tb).quorum, qa.quorum);
    (m, t, qa)
}

#[test]
fn quorum_forms_when_every_live_member_asked_and_min_workers_reached() {
    let t = Instant::now();
    let mut m = Machine::new(cfg(), String::new(), "r".into(), shards(2), t);
    join(&mut m, "b", 0, t);
    let tb = ask(&mut m, "b", 0, 0, true, t);
    assert_eq!(
        m.poll_quorum("b", tb),
        Ok(None),
        "one member, min_workers 2: wait"
    );
    join(&mut m, "a", 0, t);
    assert_eq!(
        m.poll_quorum("b", tb),
        Ok(None),
        "a is live but has not asked"
    );
    let ta = ask(&mut m, "a", 0, 0, false, t);
    let (qa, qb) = (answer(&m, "a", ta), answer(&m, "b", tb));
    assert_eq!(action(&qa), StepAction::Train, "b has data");
    let q = qa.quorum.clone().unwrap();
    assert_eq!(q.quorum_id, 1);
    assert_eq!(q.step, 0);
    // Ranks follow join order: b joined first.
    assert_eq!(
        q.members
            .iter()
            .map(|x| (x.worker_id.as_str(), x.rank))
            .collect::<Vec<_>>(),
        [("b", 0), ("a", 1)]
    );
    assert_eq!(q.members[1].peer_address, "a:1");
    assert_eq!(qb.quorum, qa.quorum);
    assert_eq!(qa.heal_from, "");
    assert_eq!(m.phase(), &Phase::Training);
    assert_eq!(
        m.poll_quorum("zz", 1),
        Err(MachineError::UnknownWorker("zz".into()))
    );
    assert!(matches!(
        m.request_quorum(
            &QuorumRequest {
                worker_id: "zz".into(),
                ..Default::default()
            },
            t
        ),
        Err(MachineError::UnknownWorker(_))
    ));
}

#[test]
fn a_joiner_bumps_the_quorum_id_and_heals_from_an_up_to_date_member() {
    let (mut m, t, q) = two_training(4);
    lease(&mut m, "a", 1, t);
    lease(&mut m, "b", 1, t);
    assert!(vote(&mut m, "a", &q, &[(0, &[0, 1])], vec![], t).is_none());
    assert!(
        vote(&mut m, "b", &q, &[(1, &[0])], vec![], t)
            .unwrap()
            .commit
    );
    assert_eq!(m.step(), 1);
    join(&mut m, "c", 0, t);
    let tc = ask(&mut m, "c", 0, 0, false, t);
    let ta = ask(&mut m, "a", 1, 0, true, t);
    assert_eq!(m.poll_quorum("a", ta), Ok(None));
    let tb = ask(&mut m, "b", 1, 0, true, t);
    let (qa, qc) = (answer(&m, "a", ta), answer(&m, "c", tc));
    assert_eq!(action(&qc), StepAction::Train);
    assert_eq!(qc.step, 1, "the quorum runs the coordinator's step");
    assert_eq!(qc.heal_from, "a:1", "c is behind: heal from rank 0");
    assert_eq!(qa.heal_from, "");
    assert_eq!(qa.quorum.as_ref().unwrap().quorum_id, 2);
    assert_eq!(qa.quorum.as_ref().unwrap().members.len(), 3);
    assert_eq!(
        answer(&m, "b", tb).quorum.unwrap().members[2].worker_id,
        "c"
    );
    // The same membership next step keeps the id.
    let q1 = qa.clone();
    for id in ["a", "b", "c"] {
        vote(&mut m, id, &q1, &[], vec![], t);
    }
    assert_eq!(m.step(), 2);
    let tickets: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|id| ask(&mut m, id, 2, 0, true, t))
        .collect();
    assert_eq!(answer(&m, "c", tickets[2]).quorum.unwrap().quorum_id, 2);
    assert_eq!(answer(&m, "c", tickets[2]).heal_from, "");
    let ev = kinds(&mut m);
    assert_eq!(ev.iter().filter(|k| **k == "quorum").count(), 2, "{ev:?}");
}

#[test]
fn a_silent_worker_expires_its_vote_fails_and_its_shards_return_with_skip() {
    let (mut m, t, q) = two_training(3);
    assert_eq!(lease(&mut m, "a", 1, t)[0].shard, 0);
    assert_eq!(lease(&mut m, "b", 1, t)[0].shard, 1);
    // Step 0 commits positions 0..3 of b's shard.
    vote(&mut m, "a", &q, &[], vec![], t);
    assert!(
        vote(&mut m, "b", &q, &[(1, &[0, 1, 2])], vec![], t)
            .unwrap()
            .commit
    );
    let ta = ask(&mut m, "a", 1, 0, true, t);
    let tb = ask(&mut m, "b", 1, 0, true, t);
    let q1 = answer(&m, "a", ta);
    answer(&m, "b", tb);
    // a votes on step 1; b goes silent. a heartbeats; at 5.1 s b is dead.
    assert!(vote(&mut m, "a", &q1, &[(0, &[0])], vec![], ms(t, 100)).is_none());
    m.heartbeat(
        &HeartbeatRequest {
            worker_id: "a".into(),
            step: 1,
            state: "training".into(),
        },
        ms(t, 4000),
    );
    m.tick(ms(t, 4900));
    assert!(
        m.poll_commit(q1.quorum.as_ref().unwrap().quorum_id, 1, "a")
            .is_none(),
        "b is not dead yet"
    );
    m.tick(ms(t, 5100));
    let d = m
        .poll_commit(q1.quorum.as_ref().unwrap().quorum_id, 1, "a")
        .unwrap();
    assert!(!d.commit && d.reason.contains("worker b died"), "{d:?}");
    assert_eq!(m.step(), 1, "nothing changed");
    assert_eq!(m.ledger().unwrap().shard(0).unwrap().committed.len(), 0);
    let ev = kinds(&mut m);
    assert!(
        ev.contains(&"death") && ev.contains(&"commit_failed"),
        "{ev:?}"
    );
    // b's shard goes first, skipping what step 0 committed.
    // a still reads shard 0, so with shards_per_worker 2 it gets one more.
    let l = lease(&mut m, "a", 2, ms(t, 5200));
    assert_eq!(l.iter().map(|x| x.shard).collect::<Vec<_>>(), [1]);
    assert_eq!((l[0].skip[0].start, l[0].skip[0].end), (0, 3));
    // Below min_workers now: a's quorum request waits, then the run fails at the join timeout.
    let ta = ask(&mut m, "a", 1, 0, true, ms(t, 5200));
    assert_eq!(m.poll_quorum("a", ta), Ok(None));
    assert_eq!(m.status(ms(t, 5200)).state, "waiting");
    let beat = |m: &mut Machine, at| {
        m.heartbeat(
            &HeartbeatRequest {
                worker_id: "a".into(),
                ..Default::default()
            },
            at,
        )
    };
    beat(&mut m, ms(t, 9000));
    beat(&mut m, ms(t, 14000));
    m.tick(ms(t, 15000));
    assert!(matches!(m.phase(), Phase::Waiting), "{:?}", m.phase());
    beat(&mut m, ms(t, 15200));
    m.tick(ms(t, 15300));
    assert!(
        matches!(m.phase(), Phase::Failed(e) if e.contains("only 1 of 2 workers")),
        "{:?}",
        m.phase()
    );
    assert!(matches!(
        m.poll_quorum("a", ta),
        Err(MachineError::RunFailed(_))
    ));
}

#[test]
fn exactly_once_accounting_refuses_a_double_commit() {
    let (mut m, t, q) = two_training(2);
    lease(&mut m, "a", 1, t);
    lease(&mut m, "b", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0, 1])], vec![], t);
    assert!(
        vote(&mut m, "b", &q, &[(1, &[0, 1])], vec![], t)
            .unwrap()
            .commit
    );
    let out = m.take_outbox();
    assert!(out.state_changed);
    assert_eq!(out.metrics.len(), 1);
    let line = serde_json::to_value(&out.metrics[0]).unwrap();
    assert_eq!(line["samples"], 4);
    assert_eq!(line["step"], 0);
    assert_eq!(line["loss"], 2.5);
    assert_eq!(line["samples_per_s"], 8.0);
    assert_eq!(line["workers"]["b"]["rank"], 1);
    assert_eq!(m.samples_seen(), 4);
    let (ta, tb) = (
        ask(&mut m, "a", 1, 0, true, t),
        ask(&mut m, "b", 1, 0, true, t),
    );
    let q1 = answer(&m, "a", ta);
    answer(&m, "b", tb);
    vote(&mut m, "a", &q1, &[(0, &[1, 2])], vec![], t);
    let d = vote(&mut m, "b", &q1, &[(1, &[2])], vec![], t).unwrap();
    assert!(
        !d.commit && d.reason.contains("position 1 of shard 0 a second time"),
        "{d:?}"
    );
    assert_eq!(m.step(), 1);
    assert_eq!(m.samples_seen(), 4);
    assert_eq!(
        m.ledger().unwrap().shard(1).unwrap().committed.len(),
        2,
        "b's part of the refused step is not entered"
    );
    assert!(kinds(&mut m).contains(&"commit_refused"));
    assert_eq!(m.ledger().unwrap().state().refused_commits, 1);
    // A retried vote gets the decision made; a vote for a step never opened is refused.
    assert!(vote(&mut m, "a", &q, &[], vec![], t).unwrap().commit);
    let never = QuorumResponse {
        step: 7,
        ..q.clone()
    };
    let d = vote(&mut m, "a", &never, &[], vec![], t).unwrap();
    assert!(
        !d.commit && d.reason.contains("no open vote for step 7"),
        "{d:?}"
    );
}

#[test]
fn a_failed_vote_changes_nothing() {
    let (mut m, t, q) = two_training(2);
    lease(&mut m, "a", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0])], vec![], t);
    let mut bad = CommitRequest {
        worker_id: "b".into(),
        quorum_id: 1,
        step: 0,
        ok: false,
        error: "all-gather timed out".into(),
        ..Default::default()
    };
    bad.consumed.clear();
    let d = m.vote(bad, t).unwrap();
    assert!(
        !d.commit && d.reason.contains("b: all-gather timed out"),
        "{d:?}"
    );
    assert_eq!(m.step(), 0);
    assert_eq!(m.ledger().unwrap().shard(0).unwrap().committed.len(), 0);
    // Heartbeats now name the dropped quorum, so a rank still in its collectives stops them.
    let beat = HeartbeatRequest { worker_id: "a".into(), step: 0, state: "training".into() };
    assert_eq!(m.heartbeat(&beat, t).abandoned_quorum, 1);
    // The same decision for a retried vote.
    assert_eq!(vote(&mut m, "a", &q, &[(0, &[0])], vec![], t).unwrap(), d);
    // The retry of step 0 runs under a new quorum id, and can commit.
    let (ta, tb) = (
        ask(&mut m, "a", 0, 0, true, t),
        ask(&mut m, "b", 0, 0, false, t),
    );
    let retry = answer(&m, "a", ta);
    answer(&m, "b", tb);
    assert_eq!(
        (retry.step, retry.quorum.as_ref().unwrap().quorum_id),
        (0, 2)
    );
    vote(&mut m, "a", &retry, &[(0, &[0])], vec![], t);
    assert!(vote(&mut m, "b", &retry, &[], vec![], t).unwrap().commit);
    assert_eq!(m.step(), 1);
}

#[test]
fn wait_then_epoch_end_then_next_epoch_then_finish() {
    let mut c = cfg();
    c.epochs = 2;
    let t = Instant::now();
    let mut m = Machine::new(c, String::new(), "r".into(), shards(2), t);
    let mut disk = m.snapshot();
    m.take_changes();
    join(&mut m, "a", 0, t);
    join(&mut m, "b", 0, t);
    // Nobody has data yet: WAIT.
    let (ta, tb) = (
        ask(&mut m, "a", 0, 0, false, t),
        ask(&mut m, "b", 0, 0, false, t),
    );
    assert_eq!(action(&answer(&m, "a", ta)), StepAction::Wait);
    assert_eq!(action(&answer(&m, "b", tb)), StepAction::Wait);
    lease(&mut m, "a", 1, t);
    lease(&mut m, "b", 1, t);
    let (ta, tb) = (
        ask(&mut m, "a", 0, 0, true, t),
        ask(&mut m, "b", 0, 0, true, t),
    );
    let q = answer(&m, "a", ta);
    answer(&m, "b", tb);
    assert_eq!(action(&q), StepAction::Train);
    // Shard 0 has 2 samples, shard 1 has 3 with one skipped as bad.
    let mut r1 = rep(1, 0, 3);
    r1.skipped = vec![2];
    r1.skipped_by_reason.insert("decode".into(), 1);
    vote(&mut m, "a", &q, &[(0, &[0, 1])], vec![rep(0, 0, 2)], t);
    assert!(
        vote(&mut m, "b", &q, &[(1, &[0, 1])], vec![r1], t)
            .unwrap()
            .commit
    );
    assert!(m.ledger().unwrap().is_complete());
    journal_keeps_up(&mut m, &mut disk);
    assert_eq!(disk.ledger.as_ref().unwrap().shards[1].skipped_by_reason["decode"], 1);
    let (ta, tb) = (
        ask(&mut m, "a", 1, 0, false, t),
        ask(&mut m, "b", 1, 0, false, t),
    );
    let n = answer(&m, "a", ta);
    assert_eq!(action(&n), StepAction::NextEpoch);
    assert_eq!(n.epoch, 1);
    assert_eq!(answer(&m, "b", tb).epoch, 1);
    let out = m.take_outbox();
    let (epoch, audit) = &out.audits[0];
    assert_eq!(*epoch, 0);
    assert_eq!(audit["exactly_once"], true);
    assert_eq!(audit["samples_committed"], 4);
    assert_eq!(audit["samples_skipped"], 1);
    assert!(
        out.events
            .iter()
            .any(|e| e.kind == "epoch_end" && e.fields["exactly_once"] == true)
    );
    // A lease for the old epoch gets nothing; the new epoch starts over.
    let old = m
        .lease(
            &LeaseRequest {
                worker_id: "a".into(),
                epoch: 0,
                want: 1,
                shard_reports: vec![],
                fresh: false,
            },
            t,
        )
        .unwrap();
    assert!(old.leases.is_empty() && old.exhausted);
    // The new epoch's ledger replaces the old one in the journal.
    journal_keeps_up(&mut m, &mut disk);
    assert_eq!(disk.ledger.as_ref().map(|l| (l.epoch, l.shards.len())), Some((1, 0)));
    assert_eq!(lease(&mut m, "a", 2, t).len(), 2);
    // A member still on the old epoch makes everyone switch first.
    let (ta, tb) = (
        ask(&mut m, "a", 1, 1, true, t),
        ask(&mut m, "b", 1, 0, false, t),
    );
    assert_eq!(action(&answer(&m, "a", ta)), StepAction::NextEpoch);
    answer(&m, "b", tb);
    let (ta, tb) = (
        ask(&mut m, "a", 1, 1, true, t),
        ask(&mut m, "b", 1, 1, false, t),
    );
    let q = answer(&m, "a", ta);
    answer(&m, "b", tb);
    assert_eq!(action(&q), StepAction::Train);
    vote(
        &mut m,
        "a",
        &q,
        &[(0, &[0, 1]), (1, &[0, 1])],
        vec![
            rep(0, 1, 2),
            ShardReport {
                skipped: vec![2],
                ..rep(1, 1, 3)
            },
        ],
        t,
    );
    assert!(vote(&mut m, "b", &q, &[], vec![], t).unwrap().commit);
    let (ta, _) = (
        ask(&mut m, "a", 2, 1, false, t),
        ask(&mut m, "b", 2, 1, false, t),
    );
    assert_eq!(action(&answer(&m, "a", ta)), StepAction::Finish);
    assert_eq!(m.phase(), &Phase::Finished);
    journal_keeps_up(&mut m, &mut disk);
    assert!(disk.finished && disk.step == 2);
    assert_eq!(m.take_outbox().audits[0].0, 1);
    // A late joiner is told to finish at once, and the run is done when everyone left.
    join(&mut m, "c", 0, t);
    let tc = ask(&mut m, "c", 0, 0, false, t);
    assert_eq!(action(&answer(&m, "c", tc)), StepAction::Finish);
    for id in ["a", "b"] {
        m.leave(
            &LeaveRequest {
                worker_id: id.into(),
                reason: "finished".into(),
            },
            t,
        );
    }
    assert!(!m.is_done());
    m.leave(
        &LeaveRequest {
            worker_id: "c".into(),
            reason: "finished".into(),
        },
        t,
    );
    assert!(m.is_done());
}

#[test]
fn finish_on_max_steps() {
    let mut c = cfg();
    c.max_steps = Some(1);
    c.min_workers = 1;
    let t = Instant::now();
    let mut m = Machine::new(c, String::new(), "r".into(), shards(2), t);
    join(&mut m, "a", 0, t);
    let q = ask_now(&mut m, "a", 0, t);
    lease(&mut m, "a", 1, t);
    assert!(
        vote(&mut m, "a", &q, &[(0, &[0])], vec![], t)
            .unwrap()
            .commit
    );
    let f = ask_now(&mut m, "a", 1, t);
    assert_eq!(action(&f), StepAction::Finish);
    let out = m.take_outbox();
    assert!(out.events.iter().any(|e| e.kind == "finish"));
    // The epoch cut short by max_steps is audited: one sample committed once, not complete.
    let [(epoch, audit)] = &out.audits[..] else { panic!("one audit: {:?}", out.audits) };
    assert_eq!(*epoch, 0);
    assert_eq!(audit["complete"], false);
    assert_eq!(audit["exactly_once"], false);
    assert_eq!(audit["at_most_once"], true);
    assert_eq!(audit["samples_committed"], 1);
}

#[test]
fn a_straggler_is_left_out_after_the_step_timeout() {
    let (mut m, t, q) = two_training(2);
    join(&mut m, "c", 0, t);
    vote(&mut m, "a", &q, &[], vec![], t);
    vote(&mut m, "b", &q, &[], vec![], t);
    let ta = ask(&mut m, "a", 1, 0, true, t);
    ask(&mut m, "b", 1, 0, true, t);
    let beat = |m: &mut Machine, at| {
        for id in ["a", "b", "c"] {
            m.heartbeat(
                &HeartbeatRequest {
                    worker_id: id.into(),
                    ..Default::default()
                },
                at,
            );
        }
    };
    for s in 1..=29 {
        beat(&mut m, ms(t, s * 1000));
    }
    m.tick(ms(t, 29_000));
    assert_eq!(m.poll_quorum("a", ta), Ok(None), "c is alive: wait for it");
    beat(&mut m, ms(t, 30_000));
    m.tick(ms(t, 30_500));
    let qa = answer(&m, "a", ta);
    assert_eq!(
        qa.quorum.as_ref().unwrap().members.len(),
        2,
        "formed without the straggler"
    );
    assert_eq!(qa.step, 1);
    let d = vote(&mut m, "c", &qa, &[], vec![], ms(t, 30_600)).unwrap();
    assert!(!d.commit && d.reason.contains("not a member"), "{d:?}");
    // The straggler asks later: it joins the next quorum, behind, and heals.
    let tc = ask(&mut m, "c", 0, 0, false, ms(t, 30_700));
    vote(&mut m, "a", &qa, &[], vec![], ms(t, 30_700));
    vote(&mut m, "b", &qa, &[], vec![], ms(t, 30_700));
    ask(&mut m, "a", 2, 0, true, ms(t, 30_800));
    ask(&mut m, "b", 2, 0, true, ms(t, 30_800));
    let qc = answer(&m, "c", tc);
    assert_eq!((qc.step, qc.heal_from.as_str()), (2, "a:1"));
    assert_eq!(qc.quorum.unwrap().members.len(), 3);
    let _ = q;
}

#[test]
fn joins_beyond_max_workers_are_refused_and_a_rejoin_releases_leases() {
    let mut c = cfg();
    c.max_workers = 2;
    let t = Instant::now();
    let mut m = Machine::new(c, String::new(), "r".into(), shards(3), t);
    join(&mut m, "a", 0, t);
    join(&mut m, "b", 0, t);
    let e = m
        .join(
            &JoinRequest {
                worker_id: "c".into(),
                ..Default::default()
            },
            t,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("2 workers (cluster.max_workers)"),
        "{e}"
    );
    assert_eq!(lease(&mut m, "a", 2, t).len(), 2);
    join(&mut m, "a", 0, t);
    assert!(m.ledger().unwrap().held_by("a").is_empty());
    assert_eq!(
        lease(&mut m, "b", 2, t)
            .iter()
            .map(|l| l.shard)
            .collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(kinds(&mut m).contains(&"rejoin"));
}

#[test]
fn state_round_trips_and_a_resumed_run_loses_nothing() {
    let (mut m, t, q) = two_training(3);
    lease(&mut m, "a", 1, t);
    lease(&mut m, "b", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0, 1])], vec![], t);
    assert!(
        vote(&mut m, "b", &q, &[(1, &[0])], vec![rep(1, 0, 1)], t)
            .unwrap()
            .commit
    );
    let saved = m.snapshot();
    let text = serde_json::to_string(&saved).unwrap();
    let back: SavedState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, saved);
    assert_eq!(back.step, 1);
    assert_eq!(back.quorum_id, 1);
    assert_eq!(back.samples_seen, 3);
    assert!(text.contains("\"committed\":[[0,2]]"), "{text}");

    // A restarted coordinator: workers rejoin; shard 0 is re-leased skipping [0, 2).
    let t2 = ms(t, 1000);
    let mut r = Machine::resume(cfg(), String::new(), shards(3), back.clone(), t2).unwrap();
    assert_eq!((r.step(), r.samples_seen(), r.run_id()), (1, 3, "run-test"));
    assert!(r.ledger().unwrap().shard(1).unwrap().is_complete());
    join(&mut r, "a", 1, t2);
    join(&mut r, "b", 1, t2);
    let l = lease(&mut r, "b", 2, t2);
    assert_eq!(l.iter().map(|x| x.shard).collect::<Vec<_>>(), [0, 2]);
    assert_eq!((l[0].skip[0].start, l[0].skip[0].end), (0, 2));
    let (ta, tb) = (
        ask(&mut r, "a", 1, 0, true, t2),
        ask(&mut r, "b", 1, 0, true, t2),
    );
    let q = answer(&r, "a", ta);
    answer(&r, "b", tb);
    assert_eq!(
        (q.step, q.quorum.as_ref().unwrap().quorum_id),
        (1, 2),
        "quorum ids keep growing across restarts"
    );

    // Another restart where no live worker applied the last persisted commit: it is undone.
    let mut r = Machine::resume(cfg(), String::new(), shards(3), back.clone(), t2).unwrap();
    join(&mut r, "a", 0, t2);
    join(&mut r, "b", 0, t2);
    let (ta, tb) = (
        ask(&mut r, "a", 0, 0, true, t2),
        ask(&mut r, "b", 0, 0, true, t2),
    );
    let q = answer(&r, "a", ta);
    answer(&r, "b", tb);
    assert_eq!(q.step, 0);
    assert_eq!(r.samples_seen(), 0);
    assert_eq!(r.ledger().unwrap().shard(0).unwrap().committed.len(), 0);
    assert!(kinds(&mut r).contains(&"commit_undone"));
    // The same positions may now commit again (the workers kept their batches).
    lease(&mut r, "a", 2, t2);
    lease(&mut r, "b", 2, t2);
    let holder = |r: &Machine, s| r.ledger().unwrap().holder(s).unwrap().to_string();
    let (h0, h1) = (holder(&r, 0), holder(&r, 1));
    vote(&mut r, &h0, &q, &[(0, &[0, 1])], vec![], t2);
    let other = if h0 == "a" { "b" } else { "a" };
    let consumed: &[(u64, &[u64])] = if h1 == other { &[(1, &[0])] } else { &[] };
    assert!(
        vote(&mut r, other, &q, consumed, vec![], t2)
            .unwrap()
            .commit
    );

    // A different dataset is refused.
    let e = Machine::resume(cfg(), String::new(), shards(4), back, t2)
        .err()
        .unwrap();
    assert!(e.contains("3 shards") && e.contains("4"), "{e}");
}

#[test]
fn resampled_draws_by_weight_and_ends_on_steps() {
    let mut c = cfg();
    c.resampled = true;
    c.min_workers = 1;
    c.max_steps = Some(2);
    c.shards_per_worker = 64;
    let t = Instant::now();
    let mut m = Machine::new(c, String::new(), "r".into(), shards(4), t);
    join(&mut m, "a", 0, t);
    let l = lease(&mut m, "a", 64, t);
    assert_eq!(l.len(), 64);
    // Shard 0 weighs 3 of 6: about half the draws (a loose bound; the draw is seeded).
    let zeros = l.iter().filter(|x| x.shard == 0).count();
    assert!((20..=44).contains(&zeros), "{zeros}");
    assert!(l.iter().all(|x| x.skip.is_empty()));
    let q = ask_now(&mut m, "a", 0, t);
    // Positions may repeat across steps in resampled mode.
    assert!(
        vote(&mut m, "a", &q, &[(0, &[0, 1])], vec![], t)
            .unwrap()
            .commit
    );
    let q = ask_now(&mut m, "a", 1, t);
    assert!(
        vote(&mut m, "a", &q, &[(0, &[0, 1])], vec![], t)
            .unwrap()
            .commit
    );
    assert_eq!(m.samples_seen(), 4);
    assert!(m.ledger().is_none() && m.snapshot().ledger.is_none());
    assert_eq!(action(&ask_now(&mut m, "a", 2, t)), StepAction::Finish);
}

#[test]
fn status_reports_members_ranks_and_progress() {
    let (mut m, t, q) = two_training(2);
    lease(&mut m, "a", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0, 1, 2])], vec![rep(0, 0, 5)], t);
    vote(&mut m, "b", &q, &[], vec![], t);
    let s = m.status(ms(t, 250));
    assert_eq!(s.run_id, "run-test");
    assert_eq!(s.state, "training");
    assert_eq!(s.step, 1);
    assert_eq!((s.epoch_samples_done, s.epoch_samples_total), (3, 5));
    assert_eq!(s.workers.len(), 2);
    assert_eq!(s.workers[1].rank, 1);
    assert_eq!(s.workers[0].last_heartbeat_ms_ago, 250);
    assert_eq!(s.last_loss, 2.5);
}

/// Both members vote that step `q.step` had a non-finite loss; the decision.
fn vote_non_finite(m: &mut Machine, q: &QuorumResponse, t: Instant) -> CommitResponse {
    let quorum_id = q.quorum.as_ref().unwrap().quorum_id;
    let bad = |id: &str| CommitRequest {
        worker_id: id.into(),
        quorum_id,
        step: q.step,
        ok: false,
        error: "non-finite loss: NaN".into(),
        non_finite: true,
        ..Default::default()
    };
    m.vote(bad("a"), t);
    m.vote(bad("b"), t).unwrap()
}

/// The next quorum of members "a" and "b" (a retry after a dropped step, or the next step).
fn next_quorum(m: &mut Machine, t: Instant) -> QuorumResponse {
    let step = m.step();
    let (ta, tb) = (ask(m, "a", step, 0, true, t), ask(m, "b", step, 0, true, t));
    answer(m, "b", tb);
    answer(m, "a", ta)
}

#[test]
fn non_finite_steps_are_dropped_and_too_many_in_a_row_fail_the_run() {
    let (mut m, t, q) = two_training(2);
    let streak = |m: &mut Machine| -> Vec<u64> {
        let events = m.take_outbox().events;
        events.iter().filter(|e| e.kind == "step_non_finite").map(|e| e.fields["consecutive"].as_u64().unwrap()).collect()
    };
    // Two in a row (cfg(): the limit is 3): dropped, counted, nothing committed.
    let d = vote_non_finite(&mut m, &q, t);
    assert!(!d.commit && d.reason.contains("non-finite loss"), "{d:?}");
    let q = next_quorum(&mut m, t);
    assert!(!vote_non_finite(&mut m, &q, t).commit);
    assert_eq!(streak(&mut m), [1, 2]);
    assert_eq!(m.step(), 0);
    // A committed step ends the streak.
    let q = next_quorum(&mut m, t);
    lease(&mut m, "a", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0])], vec![], t);
    assert!(vote(&mut m, "b", &q, &[], vec![], t).unwrap().commit);
    assert_eq!(m.step(), 1);
    // A failure that is not numerical does not count.
    let q = next_quorum(&mut m, t);
    let quorum_id = q.quorum.as_ref().unwrap().quorum_id;
    let timeout = CommitRequest { worker_id: "a".into(), quorum_id, step: 1, error: "all-gather timed out".into(), ..Default::default() };
    m.vote(timeout, t);
    assert!(!vote(&mut m, "b", &q, &[], vec![], t).unwrap().commit);
    assert_eq!(streak(&mut m), Vec::<u64>::new());
    // Three in a row fail the run with an error that says what to change.
    for expected in 1..=3 {
        let q = next_quorum(&mut m, t);
        assert!(!vote_non_finite(&mut m, &q, t).commit);
        let events = m.take_outbox().events;
        let counts: Vec<u64> = events.iter().filter(|e| e.kind == "step_non_finite").map(|e| e.fields["consecutive"].as_u64().unwrap()).collect();
        assert_eq!(counts, [expected]);
        assert_eq!(events.iter().any(|e| e.kind == "failed"), expected == 3, "{expected}");
    }
    match m.phase() {
        Phase::Failed(e) => assert!(e.contains("3 consecutive") && e.contains("train.max_non_finite_steps"), "{e}"),
        other => panic!("run not failed: {other:?}"),
    }
    assert_eq!(m.step(), 1);
}

/// `ask` with the history a worker reports: the quorum id its last applied step committed in.
fn ask_with_history(m: &mut Machine, id: &str, step: u64, commit_quorum: u64, now: Instant) -> u64 {
    let req = QuorumRequest { worker_id: id.into(), step, epoch: 0, has_data: true, commit_quorum, known_quorum: 0 };
    m.request_quorum(&req, now).unwrap()
}

/// The coordinator persisted step 0's commit and died before "b" and "c" heard of it; only
/// "a" applied it. "b" and "c" come back first, so the commit is taken back and step 0 runs
/// again with another batch. When "a" comes back at step 1 it is at the coordinator's step but
/// on the abandoned history: it must heal, not train on as if it agreed.
#[test]
fn a_worker_on_a_taken_back_commit_heals_even_at_the_same_step() {
    let t = Instant::now();
    let mut m = Machine::new(cfg(), String::new(), "run-test".into(), shards(4), t);
    for id in ["a", "b"] {
        join(&mut m, id, 0, t);
    }
    let (ta, tb) = (ask_with_history(&mut m, "a", 0, 0, t), ask_with_history(&mut m, "b", 0, 0, t));
    let q = answer(&m, "a", ta);
    answer(&m, "b", tb);
    lease(&mut m, "a", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0])], vec![], t);
    assert!(vote(&mut m, "b", &q, &[], vec![], t).unwrap().commit);
    let first_commit = q.quorum.as_ref().unwrap().quorum_id;
    let saved = m.snapshot();
    assert_eq!(saved.commit_quorum, first_commit);

    // Restart. "b" and "c" (say "b" restarted as "c" too) are at step 0 with no commit.
    let t2 = ms(t, 1000);
    let mut r = Machine::resume(cfg(), String::new(), shards(4), saved.clone(), t2).unwrap();
    let mut disk = saved;
    r.take_changes();
    r.take_outbox();
    join(&mut r, "b", 0, t2);
    join(&mut r, "c", 0, t2);
    let (tb, tc) = (ask_with_history(&mut r, "b", 0, 0, t2), ask_with_history(&mut r, "c", 0, 0, t2));
    let redo = answer(&r, "b", tb);
    answer(&r, "c", tc);
    assert_eq!(redo.step, 0, "the unapplied commit is taken back");
    journal_keeps_up(&mut r, &mut disk);
    assert!(disk.last_commit.is_none() && disk.ledger.as_ref().unwrap().shards.is_empty());
    let out = r.take_outbox();
    assert!(out.events.iter().any(|e| e.kind == "commit_undone"));
    assert_eq!(out.rewind_metrics, Some(0), "its metrics line goes too");
    // Step 0 again, with another sample, under a new quorum.
    lease(&mut r, "b", 1, t2);
    vote(&mut r, "b", &redo, &[(0, &[1])], vec![], t2);
    assert!(vote(&mut r, "c", &redo, &[], vec![], t2).unwrap().commit);
    let second_commit = redo.quorum.as_ref().unwrap().quorum_id;
    assert_ne!(second_commit, first_commit);

    // "a" returns at step 1 from the first history; "b" and "c" are at step 1 from the second.
    join(&mut r, "a", 1, t2);
    let tickets = [
        ask_with_history(&mut r, "b", 1, second_commit, t2),
        ask_with_history(&mut r, "c", 1, second_commit, t2),
        ask_with_history(&mut r, "a", 1, first_commit, t2),
    ];
    let answers: Vec<QuorumResponse> =
        ["b", "c", "a"].iter().zip(tickets).map(|(id, t)| answer(&r, id, t)).collect();
    assert!(answers.iter().all(|a| a.step == 1 && a.commit_quorum == second_commit), "{answers:?}");
    assert_eq!(answers[0].heal_from, "", "b is up to date");
    assert_eq!(answers[1].heal_from, "", "c is up to date");
    assert_eq!(answers[2].heal_from, "b:1", "a heals from an up-to-date member");
}

/// A worker that restarts its data feed asks for a fresh lease: the shards the coordinator
/// still counts as its own go back to the pool (committed positions kept) instead of holding
/// the lease cap forever.
#[test]
fn a_fresh_lease_request_returns_the_workers_old_leases() {
    let (mut m, t, q) = two_training(2);
    let held = lease(&mut m, "a", 2, t);
    assert_eq!(held.len(), 2);
    vote(&mut m, "a", &q, &[(held[0].shard, &[0, 1])], vec![], t);
    assert!(vote(&mut m, "b", &q, &[], vec![], t).unwrap().commit);
    m.take_outbox();
    // At the cap (2 shards per worker), a plain request gets nothing ...
    assert!(lease(&mut m, "a", 1, t).is_empty());
    // ... a fresh one releases both and leases again, skipping what was committed.
    let req = LeaseRequest { worker_id: "a".into(), epoch: 0, want: 2, shard_reports: vec![], fresh: true };
    let again = m.lease(&req, t).unwrap().leases;
    assert_eq!(again.len(), 2);
    let first = again.iter().find(|l| l.shard == held[0].shard).unwrap();
    assert_eq!((first.skip[0].start, first.skip[0].end), (0, 2));
    let events = m.take_outbox().events;
    let released: Vec<&Event> = events.iter().filter(|e| e.kind == "leases_released").collect();
    assert_eq!(released.len(), 1, "{events:?}");
    assert_eq!(released[0].fields["released_shards"].as_array().unwrap().len(), 2);
}

#[test]
fn fresh_workers_alone_do_not_restart_a_trained_run_from_initialisation() {
    // Two committed steps, then the coordinator restarts and only fresh workers come.
    let (mut m, t, q) = two_training(3);
    lease(&mut m, "a", 1, t);
    lease(&mut m, "b", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0])], vec![], t);
    assert!(vote(&mut m, "b", &q, &[(1, &[0])], vec![], t).unwrap().commit);
    let (ta, tb) = (ask(&mut m, "a", 1, 0, true, t), ask(&mut m, "b", 1, 0, true, t));
    let q = answer(&m, "a", ta);
    answer(&m, "b", tb);
    vote(&mut m, "a", &q, &[(0, &[1])], vec![], t);
    assert!(vote(&mut m, "b", &q, &[(1, &[1])], vec![], t).unwrap().commit);
    assert_eq!(m.step(), 2);
    let t2 = ms(t, 1000);
    let mut r = Machine::resume(cfg(), String::new(), shards(3), m.snapshot(), t2).unwrap();
    join(&mut r, "c", 0, t2);
    join(&mut r, "d", 0, t2);
    ask(&mut r, "c", 0, 0, true, t2);
    ask(&mut r, "d", 0, 0, true, t2);
    match r.phase() {
        Phase::Failed(e) => assert!(e.contains("every live worker is fresh") && e.contains("--resume latest"), "{e}"),
        other => panic!("the run went on as {other:?}: a model from initialisation would overwrite the trained one"),
    }
    assert_eq!(r.step(), 2, "the run state is left as it was, for --resume");
}

#[test]
fn an_epoch_without_a_single_sample_fails_the_run_naming_the_data() {
    let t = Instant::now();
    let mut m = Machine::new(cfg(), String::new(), "run-test".into(), shards(2), t);
    join(&mut m, "a", 0, t);
    join(&mut m, "b", 0, t);
    assert_eq!(lease(&mut m, "a", 1, t).len(), 1);
    assert_eq!(lease(&mut m, "b", 1, t).len(), 1);
    // Shard 0 cannot be opened; shard 1 has 3 samples, all without a caption.
    let failed = ShardReport { shard: 0, epoch: 0, failed: "cannot open shard /d/0.tar: not found".into(), ..Default::default() };
    let skipped = ShardReport {
        shard: 1,
        epoch: 0,
        samples: 3,
        skipped: vec![0, 1, 2],
        skipped_by_reason: [("missing_caption".to_string(), 3)].into(),
        ..Default::default()
    };
    for (id, r) in [("a", failed), ("b", skipped)] {
        m.lease(&LeaseRequest { worker_id: id.into(), epoch: 0, want: 0, shard_reports: vec![r], fresh: false }, t).unwrap();
    }
    let ta = ask(&mut m, "a", 0, 0, false, t);
    let tb = ask(&mut m, "b", 0, 0, false, t);
    let Phase::Failed(reason) = m.phase().clone() else { panic!("phase {:?}", m.phase()) };
    for part in ["epoch 0 ended without a single sample", "data.train", "2 shards (first: /d/0.tar)", "1 failed", "/d/0.tar: cannot open", "3 samples were skipped", "missing_caption: 3"] {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
    for (id, ticket) in [("a", ta), ("b", tb)] {
        assert_eq!(m.poll_quorum(id, ticket), Err(MachineError::RunFailed(reason.clone())));
    }
    let outbox = m.take_outbox();
    let kinds: Vec<_> = outbox.events.iter().map(|e| e.kind).collect();
    assert!(kinds.ends_with(&["epoch_end", "failed"]), "{kinds:?}");
    assert_eq!(outbox.audits.len(), 1, "the epoch's audit is still written");
}

#[test]
fn exactly_one_worker_is_told_to_write_the_final_checkpoint() {
    let mut c = cfg();
    c.max_steps = Some(1);
    c.step_timeout = Duration::from_secs(1);
    let t = Instant::now();
    let mut m = Machine::new(c, String::new(), "run-test".into(), shards(4), t);
    for id in ["a", "b", "c"] {
        join(&mut m, id, 0, t);
    }
    let tickets: Vec<u64> = ["a", "b", "c"].iter().map(|id| ask(&mut m, id, 0, 0, true, t)).collect();
    let q = answer(&m, "a", tickets[0]);
    let ranks: Vec<u32> = q.quorum.as_ref().unwrap().members.iter().map(|m| m.rank).collect();
    assert_eq!(ranks, [0, 1, 2], "ranks are unique and dense");
    for id in ["a", "b", "c"] {
        vote(&mut m, id, &q, &[], vec![], t);
    }
    assert_eq!(m.step(), 1);
    // "a" is behind (it restarted from step 0): it must not be the writer although it joined first.
    let ta = ask(&mut m, "a", 0, 0, true, t);
    let tb = ask(&mut m, "b", 1, 0, true, t);
    // "c" is slow: the quorum forms without it once the step timeout passed, and it is
    // answered later, from the finished phase.
    m.tick(ms(t, 2_000));
    let fa = answer(&m, "a", ta);
    let fb = answer(&m, "b", tb);
    let tc = ask(&mut m, "c", 1, 0, true, ms(t, 2_010));
    let fc = answer(&m, "c", tc);
    let writers: Vec<String> = [&fa, &fb, &fc]
        .iter()
        .map(|r| {
            assert_eq!(action(r), StepAction::Finish);
            let fq = r.quorum.as_ref().expect("FINISH carries the final quorum");
            fq.members.iter().find(|m| m.rank == 0).unwrap().worker_id.clone()
        })
        .collect();
    assert_eq!(writers, ["b", "b", "b"], "one writer, up to date, named in every FINISH answer");
    let fq = fc.quorum.unwrap();
    assert!(fq.members.iter().all(|m| m.worker_id != "c"), "the straggler is not in the final quorum");
}

/// The member list goes out once per membership: a worker that names the quorum it holds gets
/// TRAIN answers without it, and one that does not (or holds an older quorum) gets it whole.
#[test]
fn a_worker_holding_the_quorum_is_not_sent_its_member_list_again() {
    let (mut m, t, q) = two_training(3);
    let id = q.quorum.as_ref().unwrap().quorum_id;
    assert_eq!(q.quorum.as_ref().unwrap().members.len(), 2);
    lease(&mut m, "a", 1, t);
    vote(&mut m, "a", &q, &[(0, &[0])], vec![], t);
    assert!(vote(&mut m, "b", &q, &[], vec![], t).unwrap().commit);
    let asking = |m: &mut Machine, who: &str, known_quorum: u64| {
        let req = QuorumRequest { worker_id: who.into(), step: 1, epoch: 0, has_data: true, commit_quorum: id, known_quorum };
        m.request_quorum(&req, t).unwrap()
    };
    let (ta, tb) = (asking(&mut m, "a", id), asking(&mut m, "b", id - 1));
    let (qa, qb) = (answer(&m, "a", ta), answer(&m, "b", tb));
    assert_eq!((action(&qa), qa.step), (StepAction::Train, 1));
    let (la, lb) = (qa.quorum.unwrap(), qb.quorum.unwrap());
    assert_eq!((la.quorum_id, la.step, la.members.len()), (id, 1, 0), "a holds quorum {id}");
    assert_eq!((lb.quorum_id, lb.members.len()), (id, 2), "b holds an older one");
}

/// The run state of a due checkpoint, and of the final one, goes to rank 0 alone: the only
/// member that writes it (a copy per member would be the state times the world size).
#[test]
fn only_rank_0_is_sent_the_run_state_to_write() {
    let mut c = cfg();
    c.checkpoint_every = 1;
    c.max_steps = Some(1);
    let t = Instant::now();
    let mut m = Machine::new(c, String::new(), "run-test".into(), shards(2), t);
    join(&mut m, "a", 0, t);
    join(&mut m, "b", 0, t);
    let (ta, tb) = (ask(&mut m, "a", 0, 0, true, t), ask(&mut m, "b", 0, 0, true, t));
    let q = answer(&m, "a", ta);
    answer(&m, "b", tb);
    assert_eq!(q.quorum.as_ref().unwrap().members[0].worker_id, "a");
    lease(&mut m, "b", 1, t);
    assert!(vote(&mut m, "a", &q, &[], vec![], t).is_none(), "a waits for b's vote");
    let to_b = vote(&mut m, "b", &q, &[(0, &[0])], vec![], t).unwrap();
    let to_a = m.poll_commit(q.quorum.as_ref().unwrap().quorum_id, 0, "a").unwrap();
    assert!(to_a.commit && to_b.commit);
    assert!(to_b.run_state.is_empty());
    let state: SavedState = serde_json::from_slice(&to_a.run_state).unwrap();
    assert_eq!((state.step, state.samples_seen), (1, 1));
    // max_steps reached: FINISH, with the state for the final checkpoint to its writer only.
    let (ta, tb) = (ask(&mut m, "a", 1, 0, true, t), ask(&mut m, "b", 1, 0, true, t));
    let (fa, fb) = (answer(&m, "a", ta), answer(&m, "b", tb));
    assert_eq!((action(&fa), action(&fb)), (StepAction::Finish, StepAction::Finish));
    assert_eq!(fa.quorum.as_ref().unwrap().members[0].worker_id, "a");
    assert!(!fa.run_state.is_empty() && fb.run_state.is_empty());
    // A late joiner is told to finish too, without the state: it writes nothing.
    join(&mut m, "c", 0, t);
    let tc = ask(&mut m, "c", 0, 0, false, t);
    let fc = answer(&m, "c", tc);
    assert_eq!(action(&fc), StepAction::Finish);
    assert!(fc.run_state.is_empty());
    let told: Vec<(&str, u32)> = fc.quorum.as_ref().unwrap().members.iter().map(|m| (m.worker_id.as_str(), m.rank)).collect();
    assert_eq!(told, [("a", 0)], "the writer alone: c is not in the final quorum");

    // A coordinator restarted after the run finished keeps its writer: b, back, writes nothing.
    let saved = m.snapshot();
    assert_eq!(saved.final_writer.as_deref(), Some("a"));
    let t2 = ms(t, 1000);
    let mut c2 = cfg();
    c2.max_steps = Some(1);
    let mut r = Machine::resume(c2, String::new(), shards(2), saved, t2).unwrap();
    assert_eq!(r.phase(), &Phase::Finished);
    join(&mut r, "b", 1, t2);
    let tb = ask(&mut r, "b", 1, 0, false, t2);
    let fb = answer(&r, "b", tb);
    assert_eq!(action(&fb), StepAction::Finish);
    assert!(fb.run_state.is_empty(), "b was not the writer");
    assert_eq!(fb.quorum.as_ref().unwrap().members[0].worker_id, "a");
    join(&mut r, "a", 1, t2);
    let ta = ask(&mut r, "a", 1, 0, false, t2);
    assert!(!answer(&r, "a", ta).run_state.is_empty(), "the writer itself, back, may write again");
}
