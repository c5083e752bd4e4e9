//! Who is in the run: workers join (or rejoin with the same id), heartbeat, leave, or expire
//! when silent past the heartbeat timeout. Time is passed in, so tests need no sleeps.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One live worker.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberInfo {
    /// Id chosen by the worker.
    pub worker_id: String,
    /// Data-plane address.
    pub peer_address: String,
    /// Device description.
    pub device: String,
    /// Threads, for status.
    pub threads: u32,
    /// Join order: ranks follow it (after `rank_hint`), so they are deterministic and stable
    /// across quorums.
    pub seq: u64,
    /// The rank the worker's launcher gave it, if any: ranks follow hints first.
    pub rank_hint: Option<u32>,
    /// Last step the worker said it reached.
    pub step: u64,
    /// Free-form state from heartbeats ("training", "healing", ...).
    pub state: String,
    /// Last time anything was heard from it.
    pub last_seen: Instant,
    /// Seconds of its last committed step.
    pub last_step_s: f64,
}

/// How a join went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// A worker id not seen among the live members.
    New,
    /// A live member joined again (it reconnected): same rank order, fresh state.
    Rejoin,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// `max_workers` live members already.
    #[error("the run is full: {max} workers (cluster.max_workers) are members already")]
    Full {
        /// The limit.
        max: usize,
    },
    /// An empty worker id.
    #[error("worker_id must not be empty: choose one such as host-pid-random")]
    EmptyId,
}

/// The live members.
#[derive(Debug, Clone)]
pub struct Membership {
    members: BTreeMap<String, MemberInfo>,
    next_seq: u64,
    timeout: Duration,
    max_workers: usize,
}

impl Membership {
    /// No members yet. `max_workers` 0 means no limit.
    pub fn new(heartbeat_timeout: Duration, max_workers: usize) -> Self {
        Self {
            members: BTreeMap::new(),
            next_seq: 0,
            timeout: heartbeat_timeout,
            max_workers,
        }
    }

    /// Admit a worker, or refresh a live one that joined again.
    pub fn join(
        &mut self,
        worker_id: &str,
        peer_address: &str,
        device: &str,
        threads: u32,
        step: u64,
        now: Instant,
    ) -> Result<JoinKind, JoinError> {
        if worker_id.is_empty() {
            return Err(JoinError::EmptyId);
        }
        if let Some(m) = self.members.get_mut(worker_id) {
            m.peer_address = peer_address.to_string();
            m.device = device.to_string();
            m.threads = threads;
            m.step = step;
            m.last_seen = now;
            return Ok(JoinKind::Rejoin);
        }
        if self.max_workers != 0 && self.members.len() >= self.max_workers {
            return Err(JoinError::Full {
                max: self.max_workers,
            });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.members.insert(
            worker_id.to_string(),
            MemberInfo {
                worker_id: worker_id.to_string(),
                peer_address: peer_address.to_string(),
                device: device.to_string(),
                threads,
                seq,
                rank_hint: None,
                step,
                state: "joined".into(),
                last_seen: now,
                last_step_s: 0.0,
            },
        );
        Ok(JoinKind::New)
    }

    /// A heartbeat: false if the worker is not a member (it must join again).
    pub fn heartbeat(&mut self, worker_id: &str, step: u64, state: &str, now: Instant) -> bool {
        match self.members.get_mut(worker_id) {
            Some(m) => {
                m.last_seen = now;
                m.step = step;
                m.state = state.to_string();
                true
            }
            None => false,
        }
    }

    /// Any call from a worker proves it alive.
    pub fn touch(&mut self, worker_id: &str, now: Instant) -> bool {
        self.members
            .get_mut(worker_id)
            .map(|m| m.last_seen = now)
            .is_some()
    }

    /// Remove a member (it left).
    pub fn remove(&mut self, worker_id: &str) -> Option<MemberInfo> {
        self.members.remove(worker_id)
    }

    /// Remove and return the members silent for longer than the heartbeat timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<MemberInfo> {
        let dead: Vec<String> = self
            .members
            .values()
            .filter(|m| now.saturating_duration_since(m.last_seen) > self.timeout)
            .map(|m| m.worker_id.clone())
            .collect();
        dead.iter()
            .filter_map(|id| self.members.remove(id))
            .collect()
    }

    /// A member by id.
    pub fn get(&self, worker_id: &str) -> Option<&MemberInfo> {
        self.members.get(worker_id)
    }

    /// A member by id, mutable.
    pub fn get_mut(&mut self, worker_id: &str) -> Option<&mut MemberInfo> {
        self.members.get_mut(worker_id)
    }

    /// Whether `worker_id` is a live member.
    pub fn contains(&self, worker_id: &str) -> bool {
        self.members.contains_key(worker_id)
    }

    /// Live members' ids, ascending.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Live members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no live members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Members in rank order: by rank hint, members without one last, then by join order.
    pub fn in_join_order(&self) -> Vec<&MemberInfo> {
        let mut v: Vec<&MemberInfo> = self.members.values().collect();
        v.sort_by_key(|m| (m.rank_hint.unwrap_or(u32::MAX), m.seq));
        v
    }

    /// Record the rank hint a member joined with.
    pub fn set_rank_hint(&mut self, worker_id: &str, hint: Option<u32>) {
        if let Some(m) = self.members.get_mut(worker_id) {
            m.rank_hint = hint;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_hints_order_before_join_order() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_millis(5000), 0);
        for id in ["x", "c", "a", "b"] {
            m.join(id, "h:1", "flex", 1, 0, t0).unwrap();
        }
        m.set_rank_hint("a", Some(0));
        m.set_rank_hint("b", Some(1));
        m.set_rank_hint("c", Some(2));
        let order: Vec<&str> = m.in_join_order().iter().map(|w| w.worker_id.as_str()).collect();
        assert_eq!(order, ["a", "b", "c", "x"], "hinted first, in hint order; the rest by join order");
    }

    #[test]
    fn join_rejoin_heartbeat_expire_leave() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_millis(5000), 0);
        assert_eq!(m.join("b", "h:2", "flex", 1, 0, t0), Ok(JoinKind::New));
        assert_eq!(m.join("a", "h:1", "flex", 1, 0, t0), Ok(JoinKind::New));
        // Rank order is join order, not name order.
        assert_eq!(
            m.in_join_order()
                .iter()
                .map(|x| x.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        // A rejoin keeps the join order and takes the new address.
        assert_eq!(m.join("b", "h:9", "flex", 1, 4, t0), Ok(JoinKind::Rejoin));
        assert_eq!(m.get("b").unwrap().seq, 0);
        assert_eq!(m.get("b").unwrap().peer_address, "h:9");
        assert!(m.heartbeat("a", 3, "training", t0 + Duration::from_millis(4000)));
        assert!(!m.heartbeat("zz", 0, "", t0));
        // At 5.5 s, "b" (last heard at 0) is past the 5 s timeout; "a" (at 4 s) is not.
        let dead = m.expire(t0 + Duration::from_millis(5500));
        assert_eq!(
            dead.iter()
                .map(|x| x.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(m.len(), 1);
        assert!(m.remove("a").is_some());
        assert!(m.is_empty());
        // Rejoining after expiry is a new member with a later rank.
        assert_eq!(m.join("b", "h:2", "flex", 1, 0, t0), Ok(JoinKind::New));
        assert_eq!(m.get("b").unwrap().seq, 2);
    }

    #[test]
    fn max_workers_and_empty_ids_are_refused() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_secs(5), 2);
        m.join("a", "", "", 1, 0, t0).unwrap();
        m.join("b", "", "", 1, 0, t0).unwrap();
        assert_eq!(
            m.join("c", "", "", 1, 0, t0),
            Err(JoinError::Full { max: 2 })
        );
        assert_eq!(
            m.join("a", "", "", 1, 0, t0),
            Ok(JoinKind::Rejoin),
            "a live member may rejoin when full"
        );
        assert_eq!(m.join("", "", "", 1, 0, t0), Err(JoinError::EmptyId));
    }
}
