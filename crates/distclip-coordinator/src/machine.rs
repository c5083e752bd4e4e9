//! The coordinator's brain: membership, per-step quorums, commit votes, epochs and the data
//! plan (the exactly-once ledger, or resampled draws), as one synchronous state machine. Every
//! call takes the current time; nothing here does I/O. Side effects to perform (events,
//! metrics lines, epoch audits, "state changed, persist it") collect in an [`Outbox`] that the
//! async shell drains after each call.
//!
//! Protocol, as a worker sees it:
//! 1. `Join` (again with the same id after any error or `known = false` from `Heartbeat`).
//!    A (re)join drops everything the worker held: its leases return to the pool, and it must
//!    discard its loader state and any uncommitted batch, then lease afresh.
//! 2. `Lease` shards of its epoch (`want` up to `shards_per_worker`, counting shards it is still
//!    reading), and report finished shards (in `Commit` or `Lease`).
//! 3. `Quorum(step, epoch, has_data)`. It forms when every live member has asked (at least
//!    `min_workers` of them), or, once `min_workers` have asked, when the oldest request is
//!    older than `cluster.step_timeout_s` (stragglers stay members and join the next one). The
//!    answer's action:
//!    - TRAIN: run `step` with the quorum (members without data run it with an empty batch,
//!      since the collectives need every rank); if `heal_from` is set, first fetch parameters
//!      and optimizer state of `step` from that peer. Then `Commit`.
//!    - WAIT: nobody has data but the epoch is not complete (a dead worker's shards are being
//!      re-leased, or shards are still being read): lease, wait for data or a shard to end
//!      (report it), then ask again.
//!    - NEXT_EPOCH: switch the loader to `epoch` (already there: nothing to do), lease, ask again.
//!    - FINISH: leave. Rank 0 of the answer's quorum (one member holding the trained model,
//!      the same for every FINISH answer) writes the final checkpoint; nobody else does.
//! 4. `Commit(quorum_id, step, ok, consumed, reports, metrics)` blocks until every member voted,
//!    one died, or voting timed out. `commit = true`: apply the update; the step is `step + 1`.
//!    `commit = false`: drop the update but keep the batch, and ask for a quorum again for the
//!    same step (the retry gets a new quorum id, even with the same members). If `Commit` itself fails (the coordinator restarted), ask `Quorum` again: the
//!    answer's step is authoritative, and a worker behind it is told to heal.

use crate::ledger::{EpochLedger, LedgerChanges, LedgerNote, LedgerState, ShardInfo, shard_order};
use crate::membership::{JoinError, JoinKind, MemberInfo, Membership};
use crate::ranges::{RangeSet, runs};
use formation::{Formation, NotYet};
pub use metrics_line::{MetricsLine, WorkerLine, Workers};
use plan::DataPlan;
use distclip_config::RunConfig;
use distclip_proto::v1::{
    CommitRequest, CommitResponse, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, RecordRequest,
    LeaseRequest, LeaseResponse, LeaveRequest, Member, Quorum, QuorumRequest, QuorumResponse,
    RunStatus, ShardReport, StepAction, WorkerStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

mod formation;
mod metrics_line;
mod plan;
mod telemetry;
mod untrusted;
#[doc(hidden)]
pub use untrusted::drive_untrusted;

/// Version of `state.json`'s layout.
pub const STATE_VERSION: u32 = 1;

/// The settings the state machine decides with, taken from the run configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineConfig {
    /// Quorums need at least this many members.
    pub min_workers: usize,
    /// Joins past this many live members are refused (0: no limit).
    pub max_workers: usize,
    /// How long the run may stay below `min_workers` before it fails.
    pub join_timeout: Duration,
    /// How often workers should heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is dead.
    pub heartbeat_timeout: Duration,
    /// Stragglers are left out of a quorum after this; a vote open this long after the first
    /// vote fails.
    pub step_timeout: Duration,
    /// Shards a worker may be reading at once.
    pub shards_per_worker: usize,
    /// Epochs to run.
    pub epochs: u64,
    /// Stop after this many steps.
    pub max_steps: Option<u64>,
    /// Seed of the shard order (plus the epoch).
    pub seed: u64,
    /// Permute shards per epoch.
    pub shuffle: bool,
    /// Draw shards with replacement; no exactly-once ledger.
    pub resampled: bool,
    /// Samples per epoch, when known (resampled epochs end on it).
    pub samples_per_epoch: Option<u64>,
    /// Optimizer steps of the whole run for the LR schedule (0: unknown).
    pub total_steps: u64,
    /// A checkpoint is due after every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Fail the run after this many consecutive steps dropped for a non-finite loss or gradient.
    pub max_non_finite_steps: u32,
}

impl MachineConfig {
    /// Derive from a validated run configuration. `samples_per_epoch` overrides the config's
    /// value when given (it may come from the shards' `sizes.json`).
    pub fn from_run(config: &RunConfig, samples_per_epoch: Option<u64>) -> Self {
        let c = &config.cluster;
        let samples_per_epoch = config.data.samples_per_epoch.or(samples_per_epoch);
        // The world size the schedule assumes: the largest the run allows if bounded, else the
        // smallest it starts with (elastic runs make any choice an estimate).
        let world = if c.max_workers > 0 {
            c.max_workers
        } else {
            c.min_workers
        }
        .max(1) as u64;
        let global_batch = (config.train.batch_size as u64).max(1)
            * (config.train.accum_freq as u64).max(1)
            * world;
        let total_steps = match (config.train.max_steps, samples_per_epoch) {
            (Some(m), _) => m,
            (None, Some(n)) => config.train.epochs * n.div_ceil(global_batch),
            (None, None) => 0,
        };
        Self {
            min_workers: c.min_workers.max(1),
            max_workers: c.max_workers,
            join_timeout: Duration::from_secs(c.join_timeout_s),
            heartbeat_interval: Duration::from_millis(c.heartbeat_interval_ms),
            heartbeat_timeout: Duration::from_millis(c.heartbeat_timeout_ms),
            step_timeout: Duration::from_secs(c.step_timeout_s),
            // 0 in the config means no limit.
            shards_per_worker: match config.data.shards_per_worker {
                0 => usize::MAX,
                n => n,
            },
            epochs: config.train.epochs,
            max_steps: config.train.max_steps,
            seed: config.train.seed,
            shuffle: config.data.shuffle,
            resampled: config.data.resampled,
            samples_per_epoch,
            total_steps,
            checkpoint_every: config.log.checkpoint_every,
            max_non_finite_steps: config.train.max_non_finite_steps.max(1),
        }
    }
}

/// Errors a worker's call can get. Each maps to a gRPC status in the shell.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MachineError {
    /// The worker is not a member (never joined, expired, or the coordinator restarted).
    #[error("unknown worker {0:?}: join again")]
    UnknownWorker(String),
    /// A refused join.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The run failed; nothing more will happen.
    #[error("the run failed: {0}")]
    RunFailed(String),
    /// A blocking call whose wait was ended by something else (a newer request, expiry).
    #[error("{0}")]
    Superseded(String),
}

/// The run's phase.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// No quorum yet, or fewer than `min_workers` members.
    Waiting,
    /// Quorums are forming and steps committing.
    Training,
    /// Epochs or `max_steps` done.
    Finished,
    /// The run cannot go on (for example below `min_workers` past the join timeout).
    Failed(String),
}

impl Phase {
    /// The name used in `RunStatus.state`.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Training => "training",
            Phase::Finished => "finished",
            Phase::Failed(_) => "failed",
        }
    }
}

/// One line for `events.jsonl` (the shell adds the time).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// join, rejoin, leave, death, quorum, commit_failed, commit_refused, commit_undone,
    /// step_reset, epoch_end, failed_shard, ledger_conflict, report_ignored, checksum_mismatch,
    /// resume, resume_from_checkpoint, checkpoint_due, checkpoint, checkpoint_failed,
    /// checkpoint_corrupt, eval, finish, failed.
    pub kind: &'static str,
    /// Details, including the run's step, epoch and quorum id when it happened.
    pub fields: serde_json::Map<String, Value>,
}

impl Event {
    /// The `events.jsonl` line: `time` (Unix seconds), `kind`, then the fields.
    pub fn line(&self, time: f64) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("time".into(), time.into());
        m.insert("kind".into(), self.kind.into());
        m.extend(self.fields.clone());
        Value::Object(m)
    }
}

/// Side effects to perform after a call, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Lines for `events.jsonl`.
    pub events: Vec<Event>,
    /// Lines for `metrics.jsonl`, one per committed step or evaluation.
    pub metrics: Vec<MetricsLine>,
    /// Epoch audits for `ledger/epoch-N.json`.
    pub audits: Vec<(u64, Value)>,
    /// The persistent state changed: journal it before answering.
    pub state_changed: bool,
    /// A commit was taken back: drop the `metrics.jsonl` lines of this step and later ones
    /// before appending `metrics`.
    pub rewind_metrics: Option<u64>,
}

/// The positions of the last committed step, kept so that a commit persisted but applied by
/// no live worker (the coordinator died before answering) can be taken back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitDelta {
    /// The step that committed.
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Samples it counted.
    pub samples: u64,
    /// Positions per shard.
    pub positions: Vec<(u64, RangeSet)>,
    /// The commit quorum before this commit, restored when it is taken back.
    #[serde(default)]
    pub prev_commit_quorum: u64,
}

/// What `state.json` holds: enough to resume mid-epoch with nothing lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    /// Layout version ([`STATE_VERSION`]).
    pub version: u32,
    /// The run's id.
    pub run_id: String,
    /// Shards in the expanded spec (a resumed run must see the same dataset).
    pub num_shards: u64,
    /// Steps committed (the next step's index).
    pub step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Last quorum id handed out.
    pub quorum_id: u64,
    /// Samples committed over the run.
    pub samples_seen: u64,
    /// Samples committed in this epoch.
    pub epoch_samples: u64,
    /// Whether the run finished.
    pub finished: bool,
    /// The exactly-once ledger of the current epoch (absent in resampled mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerState>,
    /// The last commit's positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<CommitDelta>,
    /// The quorum id under which the last step committed (0: unknown, accept any history).
    #[serde(default)]
    pub commit_quorum: u64,
    /// The worker told to write the final checkpoint, once the run finished: a coordinator
    /// restarted after it left must not make another worker write it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_writer: Option<String>,
}

/// The final quorum as `worker` is told it: the writer (rank 0) and `worker` itself with its
/// rank, which is all a finishing worker needs; the whole list to every member would be a
/// million entries at a thousand workers.
fn finish_view(q: &Quorum, worker: &str) -> Quorum {
    let members = q
        .members
        .iter()
        .enumerate()
        .filter(|(i, m)| *i == 0 || m.worker_id == worker)
        .map(|(_, m)| m.clone())
        .collect();
    Quorum { quorum_id: q.quorum_id, step: q.step, members }
}

/// One line of the state journal: [`SavedState`] without its ledger, and the ledger's changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateChanges {
    /// The scalars (its `ledger` is always `None`).
    #[serde(flatten)]
    pub state: SavedState,
    /// The ledger's changed shards (absent in resampled mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerChanges>,
}

impl SavedState {
    /// Bring this state up to date with journal lines, in order.
    pub fn apply(&mut self, lines: impl IntoIterator<Item = StateChanges>) {
        type Shards = BTreeMap<u64, crate::ledger::ShardState>;
        let by_index = |l: LedgerState, mut map: Shards| -> (LedgerState, Shards) {
            for s in &l.shards {
                // A shard whose progress was taken back is untouched again: snapshots leave it out.
                if s.has_progress() {
                    map.insert(s.shard, s.clone());
                } else {
                    map.remove(&s.shard);
                }
            }
            (LedgerState { shards: Vec::new(), ..l }, map)
        };
        let mut ledger = self.ledger.take().map(|l| by_index(l, Shards::new()));
        for line in lines {
            *self = line.state;
            ledger = line.ledger.map(|changes| {
                let kept = match ledger.take() {
                    Some((old, map)) if !changes.fresh && old.epoch == changes.state.epoch => map,
                    _ => Shards::new(),
                };
                by_index(changes.state, kept)
            });
        }
        self.ledger = ledger.map(|(l, map)| LedgerState { shards: map.into_values().collect(), ..l });
    }
}

#[derive(Debug, Clone)]
struct Pending {
    ticket: u64,
    step: u64,
    commit_quorum: u64,
    /// The quorum whose member list the worker holds.
    known_quorum: u64,
    epoch: u64,
    has_data: bool,
    since: Instant,
}

#[derive(Debug)]
struct Round {
    quorum: Quorum,
    /// The quorum's member ids: a vote's membership check must not scan a thousand members.
    voters: std::collections::HashSet<String>,
    epoch: u64,
    first_vote: Option<Instant>,
    votes: BTreeMap<String, CommitRequest>,
    decided: bool,
}

/// The coordinator state machine. See the module docs for the protocol.
pub struct Machine {
    cfg: MachineConfig,
    run_id: String,
    config_toml: String,
    shards: Vec<ShardInfo>,
    members: Membership,
    step: u64,
    epoch: u64,
    quorum_id: u64,
    samples_seen: u64,
    epoch_samples: u64,
    data: DataPlan,
    phase: Phase,
    below_min_since: Option<Instant>,
    pending: BTreeMap<String, Pending>,
    answers: BTreeMap<String, (u64, QuorumResponse)>,
    round: Option<Round>,
    prev_members: Option<Vec<(String, String)>>,
    /// Decided steps by (quorum id, step), with the rank-0 member (the only one sent the run
    /// state of a due checkpoint: a copy per member would be the state times the world size).
    decisions: VecDeque<((u64, u64), String, CommitResponse)>,
    last_commit: Option<CommitDelta>,
    next_ticket: u64,
    /// Bumped whenever a blocked call may have its answer (quorum formed, vote decided,
    /// member gone, run ended), so the shell knows when to wake waiters.
    generation: u64,
    last_loss: f64,
    samples_per_s: f64,
    checkpoints: CheckpointPlan,
    /// Steps dropped in a row for a non-finite loss or gradient (reset by a commit).
    non_finite_streak: u32,
    /// The quorum id under which the last step committed (0: unknown).
    commit_quorum: u64,
    /// The newest quorum whose step was dropped (0: none), for heartbeat answers.
    abandoned_quorum: u64,
    /// The members told FINISH first, rank 0 being the one worker that writes the final
    /// checkpoint; later FINISH answers carry it too, so no other worker writes.
    final_quorum: Option<Quorum>,
    outbox: Outbox,
    telemetry: telemetry::Telemetry,
}

/// Where checkpoints go and what a fresh worker loads, as the shell set them up.
#[derive(Debug, Clone, Default)]
struct CheckpointPlan {
    dir: String,
    resume_from: String,
}

impl Machine {
    /// A fresh run over `shards`, starting at `now`.
    pub fn new(
        cfg: MachineConfig,
        config_toml: String,
        run_id: String,
        shards: Vec<ShardInfo>,
        now: Instant,
    ) -> Self {
        let data = DataPlan::for_epoch(&cfg, &shards, 0, 0);
        Self {
            members: Membership::new(cfg.heartbeat_timeout, cfg.max_workers),
            cfg,
            run_id,
            config_toml,
            shards,
            step: 0,
            epoch: 0,
            quorum_id: 0,
            samples_seen: 0,
            epoch_samples: 0,
            data,
            phase: Phase::Waiting,
            below_min_since: Some(now),
            pending: BTreeMap::new(),
            answers: BTreeMap::new(),
            round: None,
            prev_members: None,
            decisions: VecDeque::new(),
            last_commit: None,
            next_ticket: 1,
            generation: 0,
            last_loss: f64::NAN,
            samples_per_s: 0.0,
            checkpoints: CheckpointPlan::default(),
            non_finite_streak: 0,
            commit_quorum: 0,
            abandoned_quorum: 0,
            final_quorum: None,
            outbox: Outbox::default(),
            telemetry: Default::default(),
        }
    }

    /// Continue a run from its saved state. Leases are not saved: workers rejoin and lease
    /// again, with skip ranges covering everything committed.
    pub fn resume(
        cfg: MachineConfig,
        config_toml: String,
        shards: Vec<ShardInfo>,
        saved: SavedState,
        now: Instant,
    ) -> Result<Self, String> {
        if saved.version != STATE_VERSION {
            return Err(format!(
                "layout version {} is not {STATE_VERSION}",
                saved.version
            ));
        }
        if saved.num_shards != shards.len() as u64 {
            return Err(format!(
                "the run was started on {} shards but the dataset spec now expands to {}; pass the same --data",
                saved.num_shards,
                shards.len()
            ));
        }
        let mut m = Self::new(cfg, config_toml, saved.run_id.clone(), shards, now);
        m.step = saved.step;
        m.epoch = saved.epoch;
        m.quorum_id = saved.quorum_id;
        m.samples_seen = saved.samples_seen;
        m.epoch_samples = saved.epoch_samples;
        m.last_commit = saved.last_commit;
        m.commit_quorum = saved.commit_quorum;
        m.data = DataPlan::for_epoch(&m.cfg, &m.shards, m.epoch, 0);
        let exact = m.data.ledger().is_some();
        if let (true, Some(state)) = (exact, &saved.ledger)
            && state.epoch == m.epoch
        {
            let order = shard_order(m.shards.len(), m.cfg.seed, m.epoch, m.cfg.shuffle);
            m.data = DataPlan::Exact(EpochLedger::restore(state, &m.shards, order).map_err(|e| e.0)?);
        }
        // Finished is re-judged under the (possibly extended) configuration, so a finished
        // run can be continued with more epochs or steps.
        if m.cfg.max_steps.is_some_and(|n| m.step >= n) || m.epoch >= m.cfg.epochs {
            m.phase = Phase::Finished;
            // The writer was chosen before the restart: it alone is told to write (it may
            // have left; a straggler is then told to finish and writes nothing).
            m.final_quorum = saved.final_writer.map(|w| Quorum {
                quorum_id: m.quorum_id,
                step: m.step,
                members: vec![Member { worker_id: w, rank: 0, ..Default::default() }],
            });
        }
        m.event("resume", json!({"samples_seen": m.samples_seen}));
        Ok(m)
    }

    /// Everything to persist in `state.json`.
    pub fn snapshot(&self) -> SavedState {
        SavedState {
            ledger: self.data.ledger().map(EpochLedger::state),
            ..self.snapshot_without_ledger()
        }
    }

    /// What changed since the last call, for one journal line: the scalars of [`SavedState`]
    /// in full, and of the ledger only the shards that changed. Taking a [`Machine::snapshot`]
    /// should go with a call, so the next line starts from that snapshot.
    pub fn take_changes(&mut self) -> StateChanges {
        let state = self.snapshot_without_ledger();
        let ledger = self.data.ledger_mut().map(EpochLedger::take_changes);
        StateChanges { state, ledger }
    }

    fn snapshot_without_ledger(&self) -> SavedState {
        SavedState {
            version: STATE_VERSION,
            run_id: self.run_id.clone(),
            num_shards: self.shards.len() as u64,
            step: self.step,
            epoch: self.epoch,
            quorum_id: self.quorum_id,
            samples_seen: self.samples_seen,
            epoch_samples: self.epoch_samples,
            finished: self.phase == Phase::Finished,
            ledger: None,
            last_commit: self.last_commit.clone(),
            commit_quorum: self.commit_quorum,
            final_writer: self.final_quorum.as_ref().and_then(|q| q.members.first()).map(|m| m.worker_id.clone()),
        }
    }

    /// Where workers write checkpoints, and the checkpoint a worker without state loads
    /// (empty: none, a fresh run or a restart whose workers hold their state).
    pub fn set_checkpoints(&mut self, dir: String, resume_from: String) {
        self.checkpoints = CheckpointPlan { dir, resume_from };
    }

    /// The run state to store in a checkpoint taken now, as JSON. Every worker applies the
    /// committed steps before the checkpoint is written, so there is no last commit to undo.
    pub fn checkpoint_state(&self) -> Vec<u8> {
        let mut s = self.snapshot();
        s.last_commit = None;
        // Workers resumed from the checkpoint start a history of their own, and a run resumed
        // from it chooses its own final writer.
        s.commit_quorum = 0;
        s.final_writer = None;
        // A struct of numbers, strings and vectors always serialises.
        serde_json::to_vec(&s).unwrap_or_default()
    }

    /// Take the side effects accumulated since the last call.
    pub fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.outbox)
    }

    /// The run's phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Steps committed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Last quorum id handed out.
    pub fn quorum_id(&self) -> u64 {
        self.quorum_id
    }

    /// Samples committed over the run.
    pub fn samples_seen(&self) -> u64 {
        self.samples_seen
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Live members.
    pub fn live_members(&self) -> usize {
        self.members.len()
    }

    /// The exactly-once ledger of the current epoch (None in resampled mode).
    pub fn ledger(&self) -> Option<&EpochLedger> {
        self.data.ledger()
    }

    /// Finished or failed, and every worker gone: the coordinator may exit.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Finished | Phase::Failed(_)) && self.members.is_empty()
    }

    /// Changes whenever a blocked `Quorum` or `Commit` call may have its answer.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Fail the run for a reason outside the machine (the state file cannot be written).
    pub fn fail_external(&mut self, reason: String) {
        self.fail(reason);
    }

    fn event(&mut self, kind: &'static str, fields: Value) {
        let mut map = match fields {
            Value::Object(m) => m,
            other => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        map.entry("step").or_insert(json!(self.step));
        map.entry("epoch").or_insert(json!(self.epoch));
        map.entry("quorum_id").or_insert(json!(self.quorum_id));
        self.outbox.events.push(Event { kind, fields: map });
    }

    fn fail(&mut self, reason: String) {
        if matches!(self.phase, Phase::Failed(_)) {
            return;
        }
        self.event("failed", json!({"error": reason}));
        self.phase = Phase::Failed(reason);
        self.generation += 1;
        self.outbox.state_changed = true;
    }

    /// Admit a worker (or a reconnecting one with the same id).
    pub fn join(&mut self, req: &JoinRequest, now: Instant) -> Result<JoinResponse, MachineError> {
        if let Phase::Failed(e) = &self.phase {
            return Err(MachineError::RunFailed(e.clone()));
        }
        let kind = self.members.join(
            &req.worker_id,
            &req.peer_address,
            &req.device,
            req.threads,
            req.step,
            now,
        )?;
        self.members.set_rank_hint(&req.worker_id, req.rank_hint);
        let id = req.worker_id.clone();
        if kind == JoinKind::Rejoin {
            // The worker starts over: what it held goes back to the pool, its votes and
            // requests are void.
            self.drop_worker_state(&id, &format!("worker {id} joined again"));
        }
        let name = if kind == JoinKind::New {
            "join"
        } else {
            "rejoin"
        };
        self.event(
            name,
            json!({"worker": id, "peer_address": req.peer_address, "device": req.device, "worker_step": req.step, "members": self.members.len()}),
        );
        if self.members.len() >= self.cfg.min_workers {
            self.below_min_since = None;
        }
        self.try_form(now);
        Ok(JoinResponse {
            run_id: self.run_id.clone(),
            config_toml: self.config_toml.clone(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            heartbeat_timeout_ms: self.cfg.heartbeat_timeout.as_millis() as u64,
            total_steps: self.cfg.total_steps,
            num_shards: self.shards.len() as u64,
            checkpoint_dir: self.checkpoints.dir.clone(),
            resume_from: self.checkpoints.resume_from.clone(),
        })
    }

    /// Liveness.
    pub fn heartbeat(&mut self, req: &HeartbeatRequest, now: Instant) -> HeartbeatResponse {
        HeartbeatResponse {
            known: self
                .members
                .heartbeat(&req.worker_id, req.step, &req.state, now),
            abandoned_quorum: self.abandoned_quorum,
        }
    }

    /// A checkpoint or evaluation a worker reports: an event, and for evaluations a
    /// `metrics.jsonl` line `{"step", "epoch", "eval": {...}}` whose step is the index of the
    /// last step applied before it (as on the per-step lines).
    pub fn record(&mut self, req: &RecordRequest) {
        let worker = req.worker_id.as_str();
        let after = req.step.checked_sub(1);
        if !req.checkpoint.is_empty() {
            self.event("checkpoint", json!({"worker": worker, "after_step": req.step, "path": req.checkpoint}));
        }
        if !req.checkpoint_error.is_empty() {
            self.event("checkpoint_failed", json!({"worker": worker, "after_step": req.step, "error": req.checkpoint_error}));
        }
        if req.eval_json.is_empty() {
            return;
        }
        match serde_json::from_str::<Value>(&req.eval_json) {
            Ok(results @ Value::Object(_)) => {
                self.event("eval", json!({"worker": worker, "after_step": req.step, "results": results.clone()}));
                self.outbox.metrics.push(MetricsLine::new(json!({"step": after, "epoch": self.epoch, "eval": results})));
            }
            _ => self.event(
                "record_ignored",
                json!({"worker": worker, "reason": "eval_json is not a JSON object"}),
            ),
        }
    }

    /// A worker leaves on purpose: its leases return to the pool at once.
    pub fn leave(&mut self, req: &LeaveRequest, now: Instant) {
        self.remove_member(&req.worker_id, "leave", &req.reason, now);
    }

    fn remove_member(&mut self, id: &str, kind: &'static str, reason: &str, now: Instant) {
        if self.members.remove(id).is_some() {
            self.after_removal(id, kind, reason, now);
        }
    }

    fn after_removal(&mut self, id: &str, kind: &'static str, reason: &str, now: Instant) {
        self.generation += 1;
        let released = self.drop_worker_state(
            id,
            &format!(
                "worker {id} {}: {reason}",
                if kind == "leave" { "left" } else { "died" }
            ),
        );
        self.event(kind, json!({"worker": id, "reason": reason, "released_shards": released, "members": self.members.len()}));
        self.try_form(now);
    }

    /// Void everything a worker held. Returns the shards released.
    fn drop_worker_state(&mut self, id: &str, why: &str) -> Vec<u64> {
        let released = self.data.release(id);
        self.pending.remove(id);
        self.answers.remove(id);
        let in_open_round = self
            .round
            .as_ref()
            .is_some_and(|r| !r.decided && r.quorum.members.iter().any(|m| m.worker_id == id));
        if in_open_round {
            self.decide(Some(why.to_string()));
        }
        released
    }

    /// Periodic work: expire silent workers, enforce the join timeout and vote timeouts, and
    /// form a quorum if one is due.
    pub fn tick(&mut self, now: Instant) {
        let ms = self.cfg.heartbeat_timeout.as_millis();
        for dead in self.members.expire(now) {
            self.after_removal(
                &dead.worker_id,
                "death",
                &format!("no heartbeat for {ms} ms"),
                now,
            );
        }
        if matches!(self.phase, Phase::Waiting | Phase::Training) {
            if self.members.len() < self.cfg.min_workers {
                let since = *self.below_min_since.get_or_insert(now);
                if now.saturating_duration_since(since) > self.cfg.join_timeout {
                    self.fail(format!(
                        "only {} of {} workers (cluster.min_workers) joined within {} s (cluster.join_timeout_s)",
                        self.members.len(),
                        self.cfg.min_workers,
                        self.cfg.join_timeout.as_secs()
                    ));
                }
            } else {
                self.below_min_since = None;
            }
        }
        let timed_out = self.round.as_ref().and_then(|r| {
            let first = r.first_vote?;
            (!r.decided && now.saturating_duration_since(first) > self.cfg.step_timeout).then(
                || {
                    let missing: Vec<&str> = r
                        .quorum
                        .members
                        .iter()
                        .map(|m| m.worker_id.as_str())
                        .filter(|id| !r.votes.contains_key(*id))
                        .collect();
                    format!(
                        "timed out after {} s waiting for the votes of {}",
                        self.cfg.step_timeout.as_secs(),
                        missing.join(", ")
                    )
                },
            )
        });
        if let Some(why) = timed_out {
            self.decide(Some(why));
        }
        self.try_form(now);
    }

    /// Ask for the quorum of a step. Returns a ticket to poll with [`Machine::poll_quorum`].
    pub fn request_quorum(
        &mut self,
        req: &QuorumRequest,
        now: Instant,
    ) -> Result<u64, MachineError> {
        if let Phase::Failed(e) = &self.phase {
            return Err(MachineError::RunFailed(e.clone()));
        }
        if !self.members.touch(&req.worker_id, now) {
            return Err(MachineError::UnknownWorker(req.worker_id.clone()));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let id = req.worker_id.clone();
        // A member of an open vote that asks for a new quorum instead of voting has given up
        // on the step: count it as a failed vote so nobody waits for it.
        let abandons = self.round.as_ref().is_some_and(|r| {
            !r.decided
                && r.quorum.members.iter().any(|m| m.worker_id == id)
                && !r.votes.contains_key(&id)
        });
        if abandons {
            self.decide(Some(format!(
                "worker {id} asked for a new quorum without voting on step {}",
                self.step
            )));
        }
        self.answers.remove(&id);
        let superseded = self.pending.insert(
            id,
            Pending {
                ticket,
                step: req.step,
                commit_quorum: req.commit_quorum,
                known_quorum: req.known_quorum,
                epoch: req.epoch,
                has_data: req.has_data,
                since: now,
            },
        );
        if superseded.is_some() {
            // The older request's wait ends (superseded).
            self.generation += 1;
        }
        self.try_form(now);
        Ok(ticket)
    }

    /// The answer to a quorum request, once formed. `Ok(None)`: keep waiting.
    pub fn poll_quorum(
        &self,
        worker_id: &str,
        ticket: u64,
    ) -> Result<Option<QuorumResponse>, MachineError> {
        if let Some((t, resp)) = self.answers.get(worker_id)
            && *t == ticket
        {
            return Ok(Some(resp.clone()));
        }
        if let Phase::Failed(e) = &self.phase {
            return Err(MachineError::RunFailed(e.clone()));
        }
        if !self.members.contains(worker_id) {
            return Err(MachineError::UnknownWorker(worker_id.to_string()));
        }
        match self.pending.get(worker_id) {
            Some(p) if p.ticket == ticket => Ok(None),
            _ => Err(MachineError::Superseded(format!(
                "quorum request of {worker_id} superseded by a newer one"
            ))),
        }
    }

    /// The quorum FINISH is answered with: the members in rank order, except that the first one
    /// holding the coordinator's step and history comes first, since rank 0 writes the final
    /// checkpoint and must hold the trained model.
    fn finish_quorum(&self, asked: &[(MemberInfo, Pending)]) -> Quorum {
        let mut order: Vec<&(MemberInfo, Pending)> = asked.iter().collect();
        if let Some(i) = order.iter().position(|(_, p)| self.up_to_date(p)) {
            let writer = order.remove(i);
            order.insert(0, writer);
        }
        self.quorum_of(self.step, order.into_iter().map(|(m, _)| m))
    }

    /// Members that asked for a quorum, in rank (join) order, with their requests.
    fn asking(&self) -> Vec<(MemberInfo, Pending)> {
        self.members
            .in_join_order()
            .into_iter()
            .filter_map(|m| self.pending.get(&m.worker_id).map(|p| (m.clone(), p.clone())))
            .collect()
    }

    /// The quorum of `members` for `step`, ranked in the order given.
    fn quorum_of<'a>(&self, step: u64, members: impl Iterator<Item = &'a MemberInfo>) -> Quorum {
        Quorum {
            quorum_id: self.quorum_id,
            step,
            members: members
                .enumerate()
                .map(|(rank, m)| Member {
                    worker_id: m.worker_id.clone(),
                    rank: rank as u32,
                    peer_address: m.peer_address.clone(),
                    device: m.device.clone(),
                })
                .collect(),
        }
    }

    /// FINISH for `worker`; only the writer (rank 0 of the final quorum) gets the run state.
    fn finish_answer(&self, step: u64, worker: &str) -> QuorumResponse {
        let writer = self.final_quorum.as_ref().and_then(|q| q.members.first());
        QuorumResponse {
            action: StepAction::Finish as i32,
            quorum: self.final_quorum.as_ref().map(|q| finish_view(q, worker)),
            step,
            epoch: self.epoch,
            heal_from: String::new(),
            run_state: if writer.is_some_and(|w| w.worker_id == worker) { self.checkpoint_state() } else { Vec::new() },
            commit_quorum: self.commit_quorum,
        }
    }

    fn try_form(&mut self, now: Instant) {
        match self.phase {
            Phase::Failed(_) => return,
            Phase::Finished => {
                if self.final_quorum.is_none() {
                    // Finished before this coordinator formed a quorum (a resumed finished
                    // run): the writer is among those asking now.
                    self.final_quorum = Some(self.finish_quorum(&self.asking()));
                    self.outbox.state_changed = true;
                }
                for (id, p) in std::mem::take(&mut self.pending) {
                    let answer = self.finish_answer(self.step, &id);
                    self.answers.insert(id, (p.ticket, answer));
                    self.generation += 1;
                }
                return;
            }
            _ => {}
        }
        // Never form while a vote is open: its members are blocked in Commit.
        if self.round.as_ref().is_some_and(|r| !r.decided) {
            return;
        }
        let live = self.members.len();
        let rules = self.formation_rules();
        // Runs on every request: rule out "not yet" on counts before building the list of
        // those asking (members alone have pending requests, so counting them is enough).
        let oldest = self.pending.values().map(|p| p.since).min();
        if live >= self.cfg.min_workers && formation::waiting_for_members(live, self.pending.len(), oldest, rules, now) {
            return;
        }
        let asked = self.asking();
        let requests: Vec<formation::Asking> = asked
            .iter()
            .map(|(_, p)| formation::Asking { step: p.step, commit_quorum: p.commit_quorum, since: p.since })
            .collect();
        match formation::decide(live, &requests, self.position(), rules, now) {
            Formation::NotYet(NotYet::BelowMinWorkers) => {
                self.phase = Phase::Waiting;
                return;
            }
            Formation::NotYet(_) => return,
            Formation::Form => {}
            Formation::Undo => self.undo_last_commit(),
            Formation::Fail(reason) => {
                self.fail(reason);
                return;
            }
            Formation::Reset { to, commit_quorum } => {
                self.event(
                    "step_reset",
                    json!({"from": self.step, "to": to, "reason": "no live member is at the coordinator's step and history; adopting the most advanced member's"}),
                );
                if to < self.step {
                    self.outbox.rewind_metrics = Some(to);
                }
                self.step = to;
                self.commit_quorum = commit_quorum;
                self.last_commit = None;
                self.outbox.state_changed = true;
            }
        }
        let target = self.step;

        let ids: Vec<(String, String)> = asked
            .iter()
            .map(|(m, _)| (m.worker_id.clone(), m.peer_address.clone()))
            .collect();
        if self.prev_members.as_ref() != Some(&ids) {
            self.quorum_id += 1;
            self.prev_members = Some(ids.clone());
            self.outbox.state_changed = true;
            let names: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
            self.event(
                "quorum",
                json!({"members": names, "world_size": names.len(), "quorum_id": self.quorum_id}),
            );
        }
        let requests: Vec<Pending> = asked.iter().map(|(_, p)| p.clone()).collect();
        let action = self.decide_action(target, &requests);
        if matches!(self.phase, Phase::Failed(_)) {
            // The pending requests are answered with the failure by `poll_quorum`.
            return;
        }
        let quorum = if action == StepAction::Finish {
            let q = self.finish_quorum(&asked);
            self.final_quorum = Some(q.clone());
            q
        } else {
            self.quorum_of(target, asked.iter().map(|(m, _)| m))
        };
        let heal_source = asked
            .iter()
            .find(|(_, p)| self.up_to_date(p))
            .map(|(m, _)| m.peer_address.clone())
            .unwrap_or_default();
        // The same quorum id means the same members: a worker that holds the list is not sent it
        // again. FINISH is `finish_answer`'s, as for members that ask after the run finished.
        let known = Quorum { members: Vec::new(), ..quorum.clone() };
        for (m, p) in &asked {
            self.pending.remove(&m.worker_id);
            let heal_from = if action == StepAction::Train && !self.up_to_date(p) {
                heal_source.clone()
            } else {
                String::new()
            };
            let answer = if action == StepAction::Finish {
                self.finish_answer(target, &m.worker_id)
            } else {
                QuorumResponse {
                    action: action as i32,
                    quorum: Some(if p.known_quorum == quorum.quorum_id { known.clone() } else { quorum.clone() }),
                    step: target,
                    epoch: self.epoch,
                    heal_from,
                    run_state: Vec::new(),
                    commit_quorum: self.commit_quorum,
                }
            };
            self.answers.insert(m.worker_id.clone(), (p.ticket, answer));
        }
        self.generation += 1;
        if action == StepAction::Train {
            self.phase = Phase::Training;
            self.round = Some(Round {
                voters: quorum.members.iter().map(|m| m.worker_id.clone()).collect(),
                quorum,
                epoch: self.epoch,
                first_vote: None,
                votes: BTreeMap::new(),
                decided: false,
            });
        } else {
            self.round = None;
            if action == StepAction::Finish {
                // Stragglers outside this quorum get FINISH too.
                self.try_form(now);
            }
        }
    }

    fn decide_action(&mut self, target: u64, requests: &[Pending]) -> StepAction {
        if self.cfg.max_steps.is_some_and(|m| target >= m) {
            // The epoch the run stops in gets its audit too (`complete` says whether it was
            // read to the end), so a run cut by max_steps can still be checked for losses.
            if let Some(l) = self.data.ledger()
                && self.epoch < self.cfg.epochs
            {
                self.outbox.audits.push((self.epoch, l.audit()));
            }
            self.finish("train.max_steps reached");
            return StepAction::Finish;
        }
        if self.epoch >= self.cfg.epochs {
            self.finish("train.epochs done");
            return StepAction::Finish;
        }
        let epoch_done = self.data.epoch_done(self.epoch_samples, self.cfg.samples_per_epoch);
        if epoch_done {
            let nothing_read = self.no_samples_reason();
            self.end_epoch();
            if let Some(reason) = nothing_read {
                self.fail(reason);
                return StepAction::Wait;
            }
            if self.epoch >= self.cfg.epochs {
                self.finish("train.epochs done");
                return StepAction::Finish;
            }
            return StepAction::NextEpoch;
        }
        if requests.iter().any(|p| p.epoch != self.epoch) {
            return StepAction::NextEpoch;
        }
        if requests.iter().any(|p| p.has_data) {
            StepAction::Train
        } else {
            StepAction::Wait
        }
    }

    /// Why the epoch now ending is a failure: every shard was read (or failed) and not one
    /// sample trained. Finishing "successfully" would hide a wrong path, a bucket without the
    /// data or a caption key no sample has.
    fn no_samples_reason(&self) -> Option<String> {
        let l = self.data.ledger()?;
        if self.epoch_samples > 0 {
            return None;
        }
        let failed = l.failed();
        let reasons = l.skipped_by_reason();
        let skipped: u64 = reasons.values().sum();
        let first = self.shards.first().map(|s| s.url.as_str()).unwrap_or("");
        let mut reason = format!(
            "epoch {} ended without a single sample trained: the dataset spec (data.train) has {} shards (first: {first}), \
             {} failed to open or read",
            self.epoch,
            self.shards.len(),
            failed.len()
        );
        if let Some(f) = failed.first() {
            reason.push_str(&format!(" (first: {f})"));
        }
        reason.push_str(&format!(", and {skipped} samples were skipped as bad"));
        if !reasons.is_empty() {
            let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
            reason.push_str(&format!(" ({})", list.join(", ")));
        }
        reason.push_str(
            "; check the paths or bucket, the credentials, and data.caption_key (`distclip data stats SPEC` reads a spec the way workers do)",
        );
        Some(reason)
    }

    fn finish(&mut self, reason: &str) {
        if self.phase != Phase::Finished {
            self.phase = Phase::Finished;
            self.generation += 1;
            self.outbox.state_changed = true;
            self.event(
                "finish",
                json!({"reason": reason, "samples_seen": self.samples_seen}),
            );
        }
    }

    fn end_epoch(&mut self) {
        let epoch = self.epoch;
        let mut fields = json!({"epoch": epoch, "samples": self.epoch_samples});
        if let Some(l) = self.data.ledger() {
            let audit = l.audit();
            fields["exactly_once"] = audit["exactly_once"].clone();
            fields["samples_total"] = audit["samples_total"].clone();
            fields["samples_skipped"] = audit["samples_skipped"].clone();
            fields["failed_shards"] = audit["failed_shards"].clone();
            self.outbox.audits.push((epoch, audit));
            self.telemetry.epoch_ended(l.skipped_by_reason());
        }
        self.event("epoch_end", fields);
        self.epoch += 1;
        self.epoch_samples = 0;
        self.last_commit = None;
        self.data = DataPlan::for_epoch(&self.cfg, &self.shards, self.epoch, self.data.draws());
        self.outbox.state_changed = true;
    }

    /// Whether a member asking for a quorum holds the coordinator's state: the same step, and
    /// the same history (its last step committed under the coordinator's last commit quorum;
    /// either side 0 means not known).
    fn up_to_date(&self, p: &Pending) -> bool {
        formation::up_to_date(self.position(), p.step, p.commit_quorum)
    }

    /// The coordinator's step and history, as the quorum decision sees them.
    fn position(&self) -> formation::Position {
        formation::Position {
            step: self.step,
            commit_quorum: self.commit_quorum,
            undoable: self
                .last_commit
                .as_ref()
                .is_some_and(|c| c.step + 1 == self.step && c.epoch == self.epoch),
        }
    }

    fn formation_rules(&self) -> formation::Rules {
        formation::Rules { min_workers: self.cfg.min_workers, step_timeout: self.cfg.step_timeout }
    }

    fn undo_last_commit(&mut self) {
        let Some(c) = self.last_commit.take() else {
            return;
        };
        if let Some(l) = self.data.ledger_mut() {
            l.unapply(&c.positions);
        }
        self.step = c.step;
        self.commit_quorum = c.prev_commit_quorum;
        self.outbox.rewind_metrics = Some(c.step);
        self.telemetry.samples_going_down(self.samples_seen);
        self.samples_seen = self.samples_seen.saturating_sub(c.samples);
        self.epoch_samples = self.epoch_samples.saturating_sub(c.samples);
        self.outbox.state_changed = true;
        self.event(
            "commit_undone",
            json!({"undone_step": c.step, "samples": c.samples, "reason": "the step was persisted but no live worker applied it (the coordinator stopped before answering)"}),
        );
    }

    /// Lease more shards (and take shard reports).
    pub fn lease(
        &mut self,
        req: &LeaseRequest,
        now: Instant,
    ) -> Result<LeaseResponse, MachineError> {
        if let Phase::Failed(e) = &self.phase {
            return Err(MachineError::RunFailed(e.clone()));
        }
        if !self.members.touch(&req.worker_id, now) {
            return Err(MachineError::UnknownWorker(req.worker_id.clone()));
        }
        self.apply_reports(&req.worker_id, &req.shard_reports);
        if self.phase == Phase::Finished || req.epoch != self.epoch {
            return Ok(LeaseResponse {
                leases: Vec::new(),
                exhausted: true,
            });
        }
        let spw = self.cfg.shards_per_worker;
        let (seed, epoch) = (self.cfg.seed, self.epoch);
        if req.fresh {
            let released = self.data.release(&req.worker_id);
            if !released.is_empty() {
                self.outbox.state_changed = true;
                self.event(
                    "leases_released",
                    json!({"worker": req.worker_id, "released_shards": released, "reason": "the worker restarted its data feed"}),
                );
            }
        }
        Ok(self.data.lease(&req.worker_id, req.want, spw, (seed, epoch), &self.shards))
    }

    fn apply_reports(&mut self, worker: &str, reports: &[ShardReport]) {
        for r in reports {
            if r.epoch != self.epoch {
                self.event("report_ignored", json!({"worker": worker, "shard": r.shard, "reason": format!("report for epoch {} while the run is on epoch {}", r.epoch, self.epoch)}));
                continue;
            }
            let result = self.data.report(worker, r, &self.shards);
            self.outbox.state_changed = true;
            match result {
                Ok(notes) => {
                    for n in notes {
                        match n {
                            LedgerNote::FailedShard { shard, url, error } => {
                                self.event("failed_shard", json!({"worker": worker, "shard": shard, "url": url, "error": error}))
                            }
                            LedgerNote::Conflict { shard, message } => {
                                self.event("ledger_conflict", json!({"worker": worker, "shard": shard, "message": message}))
                            }
                        }
                    }
                }
                Err(e) => self.event(
                    "report_ignored",
                    json!({"worker": worker, "shard": r.shard, "reason": e.0}),
                ),
            }
        }
    }

    /// A vote on a step. `Ok(Some)`: decided (now or earlier); `Ok(None)`: wait with
    /// [`Machine::poll_commit`].
    pub fn vote(&mut self, req: CommitRequest, now: Instant) -> Option<CommitResponse> {
        let key = (req.quorum_id, req.step);
        if let Some(d) = self.poll_commit(req.quorum_id, req.step, &req.worker_id) {
            return Some(d);
        }
        if !self.members.touch(&req.worker_id, now) {
            return Some(refuse(format!(
                "unknown worker {:?}: join again",
                req.worker_id
            )));
        }
        let Some(round) = self
            .round
            .as_mut()
            .filter(|r| !r.decided && (r.quorum.quorum_id, r.quorum.step) == key)
        else {
            return Some(refuse(format!(
                "no open vote for step {} of quorum {} (the coordinator is at step {}, quorum {}): ask for a quorum again",
                req.step, req.quorum_id, self.step, self.quorum_id
            )));
        };
        if !round.voters.contains(&req.worker_id) {
            return Some(refuse(format!(
                "worker {} is not a member of quorum {}",
                req.worker_id, req.quorum_id
            )));
        }
        round.first_vote.get_or_insert(now);
        let worker = req.worker_id.clone();
        round.votes.insert(worker.clone(), req);
        if round.votes.len() == round.quorum.members.len() {
            self.decide(None);
        }
        self.poll_commit(key.0, key.1, &worker)
    }

    /// The decision on a step, once made, as `worker` gets it.
    pub fn poll_commit(&self, quorum_id: u64, step: u64, worker: &str) -> Option<CommitResponse> {
        let (_, writer, d) = self.decisions.iter().find(|(k, _, _)| *k == (quorum_id, step))?;
        Some(if writer == worker {
            d.clone()
        } else {
            CommitResponse { commit: d.commit, reason: d.reason.clone(), run_state: Vec::new() }
        })
    }

    /// Close the open vote: `abort` says why it cannot commit; otherwise the votes decide.
    fn decide(&mut self, abort: Option<String>) {
        let Some(mut round) = self.round.take() else {
            return;
        };
        if round.decided {
            self.round = Some(round);
            return;
        }
        round.decided = true;
        let key = (round.quorum.quorum_id, round.quorum.step);
        let failed: Vec<String> = round
            .votes
            .values()
            .filter(|v| !v.ok)
            .map(|v| {
                format!(
                    "{}: {}",
                    v.worker_id,
                    if v.error.is_empty() {
                        "failed"
                    } else {
                        v.error.as_str()
                    }
                )
            })
            .collect();
        let reason = abort.or_else(|| {
            (!failed.is_empty()).then(|| format!("step failed on {}", failed.join("; ")))
        });
        let non_finite = round.votes.values().any(|v| !v.ok && v.non_finite);
        let response = match reason {
            Some(reason) => {
                self.event(
                    "commit_failed",
                    json!({"failed_step": key.1, "reason": reason}),
                );
                if non_finite {
                    self.non_finite_step(key.1, &reason);
                }
                refuse(reason)
            }
            None => match self.commit_round(&round) {
                Ok(()) => {
                    self.non_finite_streak = 0;
                    let every = self.cfg.checkpoint_every;
                    let due = every > 0 && self.step.is_multiple_of(every);
                    if due {
                        self.event("checkpoint_due", json!({"after_step": self.step}));
                    }
                    CommitResponse {
                        commit: true,
                        reason: String::new(),
                        run_state: if due { self.checkpoint_state() } else { Vec::new() },
                    }
                }
                Err(reason) => refuse(reason),
            },
        };
        if !response.commit {
            self.abandoned_quorum = self.abandoned_quorum.max(key.0);
            self.telemetry.step_dropped();
            // The retry of this step gets a new quorum id even with the same members, so its
            // vote (and any data-plane message) is never confused with the failed attempt's.
            self.prev_members = None;
        }
        let writer = round.quorum.members.first().map(|m| m.worker_id.clone()).unwrap_or_default();
        self.decisions.push_back((key, writer, response));
        self.generation += 1;
        while self.decisions.len() > 64 {
            self.decisions.pop_front();
        }
        self.round = Some(round);
    }

    /// A step dropped because its loss or gradient was not finite: an event, and the end of
    /// the run once `max_non_finite_steps` happen in a row (retrying would only repeat them).
    fn non_finite_step(&mut self, step: u64, reason: &str) {
        self.non_finite_streak += 1;
        let (streak, max) = (self.non_finite_streak, self.cfg.max_non_finite_steps);
        self.event("step_non_finite", json!({"failed_step": step, "consecutive": streak, "reason": reason}));
        if streak >= max {
            self.fail(format!(
                "{streak} consecutive steps had a non-finite loss or gradient (last, step {step}: {reason}); \
                 lower train.lr, set train.grad_clip_norm, or check the data; the limit is \
                 train.max_non_finite_steps = {max}"
            ));
        }
    }

    fn commit_round(&mut self, round: &Round) -> Result<(), String> {
        let votes: Vec<&CommitRequest> = round
            .quorum
            .members
            .iter()
            .filter_map(|m| round.votes.get(&m.worker_id))
            .collect();
        let samples = match &mut self.data {
            DataPlan::Exact(l) => {
                let voters: Vec<(&str, &[distclip_proto::v1::ShardIndices])> = votes
                    .iter()
                    .map(|v| (v.worker_id.as_str(), v.consumed.as_slice()))
                    .collect();
                match l.check(&voters) {
                    Ok(n) => {
                        for v in &votes {
                            l.apply(&v.consumed);
                        }
                        n
                    }
                    Err(e) => {
                        l.note_refused();
                        let reason = format!("commit refused (exactly once): {e}");
                        self.event(
                            "commit_refused",
                            json!({"refused_step": round.quorum.step, "reason": reason}),
                        );
                        self.outbox.state_changed = true;
                        return Err(reason);
                    }
                }
            }
            DataPlan::Resampled(_) => votes
                .iter()
                .map(|v| {
                    let n: u64 = v.consumed.iter().map(|g| g.indices.len() as u64).sum();
                    if n == 0 {
                        v.metrics.as_ref().map_or(0, |m| m.samples as u64)
                    } else {
                        n
                    }
                })
                .sum(),
        };
        for v in &votes {
            self.apply_reports(&v.worker_id, &v.shard_reports);
        }
        let mut positions: BTreeMap<u64, RangeSet> = BTreeMap::new();
        for v in &votes {
            for g in &v.consumed {
                let set = positions.entry(g.shard).or_default();
                for (start, end) in runs(&g.indices) {
                    set.insert_range(start, end);
                }
            }
        }
        let step = round.quorum.step;
        self.last_commit = Some(CommitDelta {
            step,
            epoch: round.epoch,
            samples,
            positions: positions.into_iter().collect(),
            prev_commit_quorum: self.commit_quorum,
        });
        self.commit_quorum = round.quorum.quorum_id;
        self.step = step + 1;
        self.samples_seen += samples;
        self.epoch_samples += samples;
        self.outbox.state_changed = true;
        self.metrics_line(round, &votes, samples);
        Ok(())
    }

    fn metrics_line(&mut self, round: &Round, votes: &[&CommitRequest], samples: u64) {
        let metrics: Vec<(&CommitRequest, distclip_proto::v1::StepMetrics)> = votes
            .iter()
            .map(|v| (*v, v.metrics.clone().unwrap_or_default()))
            .collect();
        self.telemetry.record_step(
            metrics.iter().map(|(v, m)| {
                let skipped = v.shard_reports.iter().map(|r| r.skipped.len() as u64).sum();
                (v.worker_id.as_str(), m, skipped)
            }),
            &self.members,
        );
        let max = |f: fn(&distclip_proto::v1::StepMetrics) -> f64| {
            metrics.iter().map(|(_, m)| f(m)).fold(0.0, f64::max)
        };
        let step_s = max(|m| m.step_s);
        let first = metrics.first().map(|(_, m)| m.clone()).unwrap_or_default();
        let mut workers = Vec::with_capacity(metrics.len());
        for (rank, (v, m)) in metrics.iter().enumerate() {
            workers.push((
                v.worker_id.clone(),
                WorkerLine {
                    comm_s: m.comm_s,
                    compute_s: m.compute_s,
                    data_s: m.data_s,
                    rank,
                    samples: m.samples,
                    samples_per_s: telemetry::samples_per_s(m),
                    step_s: m.step_s,
                },
            ));
            if let Some(member) = self.members.get_mut(&v.worker_id) {
                member.last_step_s = m.step_s;
                member.step = round.quorum.step + 1;
            }
        }
        let checksums: BTreeSet<&str> = metrics
            .iter()
            .map(|(_, m)| m.params_checksum.as_str())
            .filter(|c| !c.is_empty())
            .collect();
        if checksums.len() > 1 {
            let by_worker: BTreeMap<&str, &str> = metrics
                .iter()
                .map(|(v, m)| (v.worker_id.as_str(), m.params_checksum.as_str()))
                .collect();
            self.event(
                "checksum_mismatch",
                json!({"checked_step": round.quorum.step, "checksums": by_worker}),
            );
        }
        let samples_per_s = if step_s > 0.0 {
            samples as f64 / step_s
        } else {
            0.0
        };
        self.last_loss = first.loss;
        self.samples_per_s = samples_per_s;
        let fields = json!({
            "step": round.quorum.step,
            "epoch": round.epoch,
            "quorum_id": round.quorum.quorum_id,
            "world_size": round.quorum.members.len(),
            "loss": finite(first.loss),
            "lr": finite(first.lr),
            "logit_scale": finite(first.logit_scale),
            "grad_norm": finite(first.grad_norm),
            "samples": samples,
            "samples_seen": self.samples_seen,
            "samples_per_s": samples_per_s,
            "step_s": step_s,
            "data_s": max(|m| m.data_s),
            "compute_s": max(|m| m.compute_s),
            "comm_s": max(|m| m.comm_s),
            "params_checksum": checksums.iter().next().copied().unwrap_or(""),
        });
        self.outbox.metrics.push(MetricsLine { fields, workers: Some(Workers(workers)) });
    }

    /// The run as a whole.
    pub fn status(&self, now: Instant) -> RunStatus {
        let ranks: BTreeMap<&str, u32> = self
            .round
            .as_ref()
            .map(|r| {
                r.quorum
                    .members
                    .iter()
                    .map(|m| (m.worker_id.as_str(), m.rank))
                    .collect()
            })
            .unwrap_or_default();
        let (done, total) = match self.data.ledger() {
            Some(l) => l.progress(),
            None => (self.epoch_samples, self.cfg.samples_per_epoch.unwrap_or(0)),
        };
        RunStatus {
            run_id: self.run_id.clone(),
            state: self.phase.name().to_string(),
            step: self.step,
            total_steps: self.cfg.total_steps,
            epoch: self.epoch,
            epochs: self.cfg.epochs,
            epoch_samples_done: done,
            epoch_samples_total: total,
            samples_seen: self.samples_seen,
            quorum: self.round.as_ref().map(|r| r.quorum.clone()),
            workers: self
                .members
                .in_join_order()
                .into_iter()
                .map(|m| WorkerStatus {
                    worker_id: m.worker_id.clone(),
                    rank: ranks.get(m.worker_id.as_str()).map_or(-1, |&r| r as i32),
                    peer_address: m.peer_address.clone(),
                    device: m.device.clone(),
                    step: m.step,
                    state: m.state.clone(),
                    last_heartbeat_ms_ago: now.saturating_duration_since(m.last_seen).as_millis()
                        as u64,
                    last_step_s: m.last_step_s,
                })
                .collect(),
            last_loss: if self.last_loss.is_finite() {
                self.last_loss
            } else {
                0.0
            },
            samples_per_s: self.samples_per_s,
            failed_shards: self.ledger().map(EpochLedger::failed).unwrap_or_default(),
            error: match &self.phase {
                Phase::Failed(e) => e.clone(),
                _ => String::new(),
            },
        }
    }
}

fn refuse(reason: String) -> CommitResponse {
    CommitResponse {
        run_state: Vec::new(),
        commit: false,
        reason,
    }
}

/// JSON has no NaN: a non-finite metric is written as null.
fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

#[cfg(test)]
mod tests;
