//! The one retry helper of the worker's loops: exponential backoff with a cap and an optional
//! time limit, the policy a parameter. Callers sleep for what [`Retry::next_delay`] says
//! (blocking or async, as they run), so one helper serves both.

use std::time::{Duration, Instant};

/// How a loop retries: first wait, the most it waits, and when it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Policy {
    /// The wait after the first failure; each further failure doubles it.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// Give up this long after the first failure; `None`: never.
    pub give_up_after: Option<Duration>,
}

/// Reaching the coordinator at start (it may still be starting).
pub(super) const CONNECT: Policy =
    Policy { first: Duration::from_millis(100), max: Duration::from_secs(2), give_up_after: Some(Duration::from_secs(60)) };

/// A step-loop call to the coordinator: rides out a coordinator restart.
pub(super) const COORDINATOR_OUTAGE: Policy =
    Policy { first: Duration::from_millis(100), max: Duration::from_secs(2), give_up_after: Some(Duration::from_secs(120)) };

/// A lease call that failed: the lease thread keeps asking while its loader runs.
pub(super) const LEASE_FAILED: Policy =
    Policy { first: Duration::from_millis(50), max: Duration::from_secs(2), give_up_after: None };

/// A lease answer with no shard while the epoch has more: this worker is at its lease cap,
/// and shards come back as it reports its own.
pub(super) const LEASE_AT_CAP: Policy =
    Policy { first: Duration::from_millis(50), max: Duration::from_millis(500), give_up_after: None };

/// Pulling state from a peer that has not entered the quorum yet: a steady poll.
pub(super) const HEAL_WAIT: Policy =
    Policy { first: Duration::from_millis(100), max: Duration::from_millis(100), give_up_after: Some(Duration::from_secs(60)) };

/// Pulling state from a peer that cannot be reached: it most likely died.
pub(super) const HEAL_UNREACHABLE: Policy =
    Policy { first: Duration::from_millis(100), max: Duration::from_millis(100), give_up_after: Some(Duration::from_secs(10)) };

/// The state of one retry loop under a [`Policy`].
#[derive(Debug, Clone)]
pub(super) struct Retry {
    policy: Policy,
    next: Duration,
    /// When the current run of failures began.
    since: Option<Instant>,
}

impl Retry {
    /// A loop that has not failed yet.
    pub(super) fn new(policy: Policy) -> Self {
        Self { policy, next: policy.first, since: None }
    }

    /// After a failure: how long to wait before the next try, or `None` when the policy's time
    /// is up.
    pub(super) fn next_delay(&mut self) -> Option<Duration> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if self.policy.give_up_after.is_some_and(|limit| since.elapsed() >= limit) {
            return None;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        Some(wait)
    }

    /// After a failure: wait on this thread and say true, or false when the time is up.
    pub(super) fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(d) => {
                std::thread::sleep(d);
                true
            }
            None => false,
        }
    }

    /// After a success: the next failure starts a new run (first wait, full time).
    pub(super) fn reset(&mut self) {
        self.next = self.policy.first;
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Policy =
        Policy { first: Duration::from_millis(1), max: Duration::from_millis(4), give_up_after: Some(Duration::ZERO) };

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut r = Retry::new(Policy { give_up_after: None, ..FAST });
        let waits: Vec<u128> = (0..5).map(|_| r.next_delay().unwrap().as_millis()).collect();
        assert_eq!(waits, [1, 2, 4, 4, 4]);
        r.reset();
        assert_eq!(r.next_delay(), Some(Duration::from_millis(1)));
    }

    #[test]
    fn gives_up_after_its_limit_and_starts_again_after_a_success() {
        let mut r = Retry::new(FAST);
        // A limit of zero is spent by the first failure.
        assert_eq!(r.next_delay(), None);
        assert!(!r.wait());
        r.reset();
        let mut never = Retry::new(Policy { give_up_after: Some(Duration::from_secs(3600)), ..FAST });
        assert!(never.wait());
        assert_eq!(never.next_delay(), Some(Duration::from_millis(2)));
    }
}
