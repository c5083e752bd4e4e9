//! The step loop of DESIGN.md ("One training step") with the coordinator's votes around each
//! step: load this step's micro-batches, ask for a quorum, heal when behind, enter the quorum's
//! ring, run the step, vote, and apply it when the quorum commits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distclip_comm::{CommOptions, Group, PeerServer};
use distclip_data::Batch;
use distclip_proto::v1 as pb;

use super::control::{Heartbeat, Link};
use super::feed::{Feed, FeedSource, consumed, report};
use super::rank0::Rank0;
use super::ring::{self, Ring};
use super::{WorkerError, heal};
use crate::{CollectiveError, LocalBatch, StepError, Trainer};

/// How the step loop ended.
pub(super) enum End {
    /// The coordinator answered FINISH.
    Finished {
        /// This worker writes the final checkpoint and evaluation: rank 0 of the quorum the
        /// coordinator answered FINISH with (exactly one worker of the run).
        final_writer: bool,
        /// The run state to store with the final checkpoint (sent to the writer only).
        run_state: Vec<u8>,
    },
    /// [`super::WorkerOptions::leave`] was set.
    Left,
}

/// What a quorum answer asks of the loop.
enum Answer {
    /// Ask again (after waiting, moving to the next epoch, or a refusal).
    Again,
    /// The loop is over.
    End(End),
    /// Train this step in this quorum (its member list filled in).
    Train(pb::QuorumResponse, pb::Quorum),
}

/// The worker's connections and duties, fixed for the run.
pub(super) struct Context<'a> {
    pub(super) rt: &'a tokio::runtime::Runtime,
    pub(super) server: &'a PeerServer,
    pub(super) comm: &'a CommOptions,
    pub(super) heartbeat: &'a Heartbeat,
    pub(super) worker_id: &'a str,
    pub(super) leave: &'a AtomicBool,
    /// What each epoch's feed is built from.
    pub(super) feeds: FeedSource,
    /// The state a healing peer pulls: refreshed whenever this worker enters a new quorum.
    pub(super) snapshot: Arc<Mutex<Option<Vec<u8>>>>,
    /// `train.accum_freq`: micro-batches per step.
    pub(super) accum: usize,
    /// `log.every_steps`.
    pub(super) log_every: u64,
}

/// The loop and the state it carries from one step to the next.
pub(super) struct StepLoop<'a> {
    pub(super) ctx: Context<'a>,
    pub(super) link: Link,
    pub(super) trainer: Trainer,
    pub(super) rank0: Rank0,
    pub(super) epoch: u64,
    pub(super) feed: Option<Feed>,
    /// This step's micro-batches (`train.accum_freq` of them, fewer at the end of an epoch).
    micro: Vec<Batch>,
    /// Seconds spent loading them.
    data_s: f64,
    /// Shards read to their end, not yet reported to the coordinator.
    reports: Vec<pb::ShardReport>,
    /// The ring of the quorum this worker last trained in.
    group: Option<Arc<Group>>,
    /// Rank in the last quorum.
    pub(super) rank: usize,
    /// The quorum id under which the last applied step committed: with the step, this
    /// worker's history (QuorumRequest.commit_quorum).
    commit_quorum: u64,
    /// The last quorum sent with its member list: TRAIN answers for it come without one.
    known: Option<pb::Quorum>,
    /// Whether the data-plane health service says SERVING (in a quorum).
    serving: bool,
}

impl<'a> StepLoop<'a> {
    /// A loop before its first step.
    pub(super) fn new(ctx: Context<'a>, link: Link, trainer: Trainer, rank0: Rank0) -> Self {
        Self {
            ctx,
            link,
            trainer,
            rank0,
            epoch: 0,
            feed: None,
            micro: Vec::new(),
            data_s: 0.0,
            reports: Vec::new(),
            group: None,
            rank: 0,
            commit_quorum: 0,
            known: None,
            serving: false,
        }
    }

    /// Train until the coordinator says the run is finished or the worker is asked to leave.
    pub(super) fn run(&mut self) -> Result<End, WorkerError> {
        loop {
            // Between steps: what was loaded but not committed goes back with the leases
            // (committed positions are skipped when a shard is leased again).
            if self.ctx.leave.load(Ordering::Relaxed) {
                tracing::warn!(step = self.trainer.step(), "asked to stop: leaving the run after the last committed step");
                self.set_serving(false);
                return Ok(End::Left);
            }
            self.load()?;
            let answer = self.ask_quorum()?;
            let (q, quorum) = match self.answer(answer)? {
                Answer::Again => continue,
                Answer::End(end) => return Ok(end),
                Answer::Train(q, quorum) => (q, quorum),
            };
            if !q.heal_from.is_empty() && !self.heal(&q) {
                continue;
            }
            self.enter(&quorum);
            self.train(&q, &quorum)?;
        }
    }

    /// grpc.health.v1 on the data-plane port: SERVING while in a quorum (probes, load
    /// balancers); a step's quorum round trip does not count as leaving it.
    fn set_serving(&mut self, on: bool) {
        if on != self.serving {
            self.serving = on;
            self.ctx.rt.block_on(self.ctx.server.set_serving(on));
        }
    }

    fn set_state(&self, state: &str) {
        self.ctx.heartbeat.set_state(self.trainer.step(), state);
    }

    /// Fill this step's micro-batches from the epoch's feed (started if needed). With no batch
    /// left, report the shards finished last at once: the epoch can only end once every shard
    /// is reported, and there is no commit to carry them.
    fn load(&mut self) -> Result<(), WorkerError> {
        let feed = match &mut self.feed {
            Some(f) if f.epoch == self.epoch => f,
            slot => slot.insert(Feed::start(self.epoch, &self.ctx.feeds)?),
        };
        if self.micro.is_empty() {
            self.ctx.heartbeat.set_state(self.trainer.step(), "loading");
            let t = Instant::now();
            // The loader's last batch of an epoch may hold no examples, only the summaries of
            // shards finished last: keep those for the coordinator and look further.
            while self.micro.len() < self.ctx.accum {
                let Some(b) = feed.next_batch()? else { break };
                self.reports.extend(b.finished.iter().map(|s| report(self.epoch, s)));
                if !b.is_empty() {
                    self.micro.push(b);
                }
            }
            self.data_s = t.elapsed().as_secs_f64();
        }
        if self.micro.is_empty() && !self.reports.is_empty() {
            let req = pb::LeaseRequest {
                worker_id: self.ctx.worker_id.to_owned(),
                epoch: self.epoch,
                want: 0,
                shard_reports: std::mem::take(&mut self.reports),
                fresh: false,
            };
            self.link.call(self.ctx.rt, "reporting finished shards", self.trainer.step(), |mut c| {
                let req = req.clone();
                async move { c.lease(req).await }
            })?;
        }
        Ok(())
    }

    fn ask_quorum(&mut self) -> Result<pb::QuorumResponse, WorkerError> {
        self.set_state("quorum");
        let req = pb::QuorumRequest {
            worker_id: self.ctx.worker_id.to_owned(),
            step: self.trainer.step(),
            epoch: self.epoch,
            has_data: !self.micro.is_empty(),
            commit_quorum: self.commit_quorum,
            known_quorum: self.known.as_ref().map_or(0, |k| k.quorum_id),
        };
        let q = self.link.call(self.ctx.rt, "quorum", self.trainer.step(), |mut c| {
            let req = req.clone();
            async move { c.quorum(req).await }
        })?;
        if self.link.take_rejoined() {
            // The restarted coordinator does not know this worker's leases: read from fresh
            // ones. What was loaded but not committed goes back to the pool (committed
            // positions are skipped when a shard is leased again).
            self.feed = None;
            self.micro.clear();
            self.reports.clear();
        }
        Ok(q)
    }

    fn coordinator_error(&self, message: String) -> WorkerError {
        WorkerError::Coordinator { url: self.link.url.clone(), message }
    }

    /// Act on a quorum answer; for TRAIN, take its epoch, fill in its member list and find
    /// this worker's rank.
    fn answer(&mut self, mut q: pb::QuorumResponse) -> Result<Answer, WorkerError> {
        match pb::StepAction::try_from(q.action).unwrap_or(pb::StepAction::Unspecified) {
            pb::StepAction::Finish => {
                self.set_serving(false);
                let me = q.quorum.as_ref().and_then(|fq| fq.members.iter().find(|m| m.worker_id == self.ctx.worker_id));
                let final_writer = me.is_some_and(|m| m.rank == 0);
                if let Some(me) = me {
                    self.rank = me.rank as usize;
                }
                return Ok(Answer::End(End::Finished { final_writer, run_state: q.run_state }));
            }
            pb::StepAction::NextEpoch => {
                // Sent to every member when one of them is behind; a worker already on the
                // new epoch keeps its feed and what it has loaded.
                if q.epoch != self.epoch {
                    tracing::info!("epoch {} complete; starting epoch {}", self.epoch, q.epoch);
                    self.epoch = q.epoch;
                    self.feed = None;
                    self.micro.clear();
                }
                return Ok(Answer::Again);
            }
            pb::StepAction::Wait => {
                self.set_serving(false);
                // Shards may come back to the pool (a holder died): read them with a new loader.
                if self.feed.as_ref().is_some_and(|f| f.ended) {
                    self.feed = None;
                }
                std::thread::sleep(Duration::from_millis(100));
                return Ok(Answer::Again);
            }
            pb::StepAction::Train => {}
            pb::StepAction::Unspecified => {
                return Err(self.coordinator_error(format!("quorum answered an unknown action {}", q.action)));
            }
        }
        self.epoch = q.epoch;
        let mut quorum = q.quorum.take().ok_or_else(|| self.coordinator_error("quorum answer without a quorum".into()))?;
        match &self.known {
            Some(k) if quorum.members.is_empty() && k.quorum_id == quorum.quorum_id => quorum.members = k.members.clone(),
            _ => self.known = Some(quorum.clone()),
        }
        self.rank = quorum
            .members
            .iter()
            .position(|m| m.worker_id == self.ctx.worker_id)
            .ok_or_else(|| self.coordinator_error(format!("quorum {} does not list this worker", quorum.quorum_id)))?;
        Ok(Answer::Train(q, quorum))
    }

    /// Heal from the peer the answer names; false when that failed and the loop should ask
    /// for a quorum again.
    fn heal(&mut self, q: &pb::QuorumResponse) -> bool {
        self.set_state("healing");
        self.set_serving(false);
        let before = self.trainer.checksum();
        if let Err(e) = heal::heal(self.ctx.rt, &mut self.trainer, &q.heal_from, self.ctx.comm, q.step) {
            // The source can die after the quorum formed: asking again drops this step on
            // every rank, and the next quorum names a live source. The worker keeps its
            // history unless the attempt loaded a peer's state of another step.
            tracing::warn!("{e}; asking the coordinator for a quorum again");
            if self.trainer.checksum() != before {
                self.commit_quorum = 0;
            }
            return false;
        }
        self.commit_quorum = q.commit_quorum;
        true
    }

    /// Enter `quorum`: when it is new, share the state peers heal from and connect its ring.
    fn enter(&mut self, quorum: &pb::Quorum) {
        if self.group.as_ref().is_none_or(|g| g.quorum_id() != quorum.quorum_id) {
            self.group = None;
            if let Ok(mut s) = self.ctx.snapshot.lock() {
                *s = Some(self.trainer.state_bytes());
            }
            self.group = ring::connect(self.ctx.rt, self.ctx.server, quorum, self.rank);
        }
        self.ctx.heartbeat.set_group(self.group.clone());
    }

    /// Run the step, vote, and apply it if the quorum commits; rank 0 then does its duties.
    fn train(&mut self, q: &pb::QuorumResponse, quorum: &pb::Quorum) -> Result<(), WorkerError> {
        self.set_state("training");
        self.set_serving(true);
        let t = Instant::now();
        let checksum_before = format!("{:016x}", self.trainer.checksum());
        let lr = self.trainer.config().lr_at(self.trainer.step());
        let logit_scale = f64::from(self.trainer.model().logit_scale_exp());
        let mut locals: Vec<LocalBatch> =
            self.micro.iter().map(|b| LocalBatch { images: &b.images, tokens: &b.tokens, len: b.len() }).collect();
        if locals.is_empty() {
            locals.push(LocalBatch { images: &[], tokens: &[], len: 0 });
        }
        let local_len: usize = locals.iter().map(|l| l.len).sum();
        let mut comm_s = 0.0;
        let result = match &self.group {
            Some(g) => {
                let handle = self.ctx.rt.handle();
                let mut ring = Ring { group: g.as_ref(), handle, comm_s: 0.0 };
                let r = self.trainer.forward_backward_accum(&locals, &mut ring);
                comm_s = ring.comm_s;
                r
            }
            None => Err(StepError::Collective(CollectiveError::Broken("no ring for this quorum".into()))),
        };
        let compute_s = (t.elapsed().as_secs_f64() - comm_s).max(0.0);
        let (ok, error) = match &result {
            Ok(_) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        let vote = pb::CommitRequest {
            worker_id: self.ctx.worker_id.to_owned(),
            quorum_id: quorum.quorum_id,
            step: q.step,
            ok,
            error: error.clone(),
            non_finite: matches!(result, Err(StepError::NonFinite { .. })),
            consumed: consumed(&self.micro),
            shard_reports: self.reports.clone(),
            metrics: Some(pb::StepMetrics {
                loss: result.as_ref().map(|p| f64::from(p.loss())).unwrap_or(f64::NAN),
                lr,
                logit_scale,
                grad_norm: result.as_ref().map(|p| p.grad_norm()).unwrap_or(f64::NAN),
                samples: local_len as u32,
                data_s: self.data_s,
                compute_s,
                comm_s,
                step_s: t.elapsed().as_secs_f64() + self.data_s,
                params_checksum: checksum_before,
            }),
        };
        // After a coordinator restart the vote finds no open round and is refused: the step is
        // dropped and run again under the new quorum, like any failed step.
        let commit = self.link.call(self.ctx.rt, "commit", self.trainer.step(), |mut c| {
            let vote = vote.clone();
            async move { c.commit(vote).await }
        })?;
        match result {
            Ok(pending) if commit.commit => {
                let stats = self.trainer.apply(pending).map_err(|e| WorkerError::Setup(e.to_string()))?;
                self.commit_quorum = quorum.quorum_id;
                if self.rank == 0 && stats.step % self.ctx.log_every.max(1) == 0 {
                    tracing::info!(
                        step = stats.step + 1,
                        loss = stats.loss,
                        lr = stats.lr,
                        logit_scale = stats.logit_scale,
                        samples = stats.global_samples,
                        "step"
                    );
                }
                self.micro.clear();
                self.reports.clear();
                if self.rank == 0 {
                    self.rank0.after_commit(self.ctx.rt, &mut self.link.client, self.ctx.worker_id, &self.trainer, &commit.run_state);
                }
            }
            _ => {
                tracing::warn!(step = q.step, "step dropped: {}", if ok { commit.reason } else { error });
                // The ring may be out of step after a failed collective: rebuild it.
                self.group = None;
            }
        }
        Ok(())
    }
}
