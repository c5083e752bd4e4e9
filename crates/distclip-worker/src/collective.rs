//! The collectives the step needs, behind a small synchronous, object-safe trait, so the step
//! knows nothing of the network: the gRPC ring (`distclip-comm`) plugs in through an adapter,
//! and tests run W ranks as threads of one process with [`ThreadGroup`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A failed collective. Every variant means this step cannot complete on this rank.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A rank contributed a buffer of a different length than this one.
    #[error("collective: rank {rank} contributed {got} values, this rank {expected}")]
    LengthMismatch {
        /// The rank whose buffer differs.
        rank: usize,
        /// This rank's length.
        expected: usize,
        /// The other rank's length.
        got: usize,
    },
    /// The other ranks did not arrive in time (a peer died or hangs).
    #[error("collective: timed out after {0:?} waiting for the other ranks")]
    Timeout(Duration),
    /// The group is unusable: a rank failed or left earlier.
    #[error("collective: group broken ({0})")]
    Broken(String),
    /// A transport error from a network implementation.
    #[error("collective transport: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Collective operations among the `world_size()` ranks of one step. Every rank must call the
/// same operations in the same order with buffers of equal length.
pub trait Collective {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Concatenation of every rank's `local` in rank order (all of equal length).
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError>;
    /// Replace `buf` by the element-wise sum over ranks. Implementations must give every rank
    /// bit-identical results (a fixed summation order), or the ranks' parameters drift apart.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
}

/// The trivial group of one rank: gather is a copy and reduce is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        Ok(local.to_vec())
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// One round of exchange: every rank deposits its buffer; the last to arrive publishes all.
#[derive(Debug, Default)]
struct Exchange {
    round: u64,
    slots: Vec<Option<Vec<f32>>>,
    arrived: usize,
    result: Option<Arc<Vec<Vec<f32>>>>,
    broken: Option<String>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<Exchange>,
    cv: Condvar,
}

/// W ranks of one process (one handle per thread) exchanging through shared memory: the
/// in-process stand-in for the network in tests. Sums run in rank order on every rank, so all
/// ranks get bit-identical results, as a real ring must.
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// Handles for a group of `world` ranks (index = rank), with a 60 s timeout per collective.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        Self::with_timeout(world, Duration::from_secs(60))
    }

    /// As [`ThreadGroup::new`], with the given timeout per collective.
    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(Exchange {
                slots: vec![None; world],
                ..Exchange::default()
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Exchange>, CollectiveError> {
        self.shared
            .state
            .lock()
            .map_err(|_| CollectiveError::Broken("a rank panicked during a collective".into()))
    }

    /// Deposit `data` and wait for every rank's buffer of the same round.
    fn exchange(&self, data: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>, CollectiveError> {
        let mut st = self.lock()?;
        if let Some(why) = &st.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        let round = st.round;
        st.slots[self.rank] = Some(data);
        st.arrived += 1;
        if st.arrived == self.shared.world {
            // The next round cannot complete before every rank has taken this result (each
            // must deposit again first), so one result slot is enough.
            let all: Vec<Vec<f32>> = st.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            st.result = Some(Arc::new(all));
            st.arrived = 0;
            st.round += 1;
            self.shared.cv.notify_all();
        } else {
            let deadline = Instant::now() + self.shared.timeout;
            while st.round == round && st.broken.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    st.broken = Some(format!("rank {} timed out", self.rank));
                    self.shared.cv.notify_all();
                    return Err(CollectiveError::Timeout(self.shared.timeout));
                }
                st = self
                    .shared
                    .cv
                    .wait_timeout(st, left)
                    .map_err(|_| CollectiveError::Broken("a rank panicked during a collective".into()))?
                    .0;
            }
            if let Some(why) = &st.broken {
                return Err(CollectiveError::Broken(why.clone()));
            }
        }
        st.result
            .clone()
            .ok_or_else(|| CollectiveError::Broken("result missing".into()))
    }

    fn check_lengths(&self, all: &[Vec<f32>], expected: usize) -> Result<(), CollectiveError> {
        match all.iter().enumerate().find(|(_, v)| v.len() != expected) {
            Some((rank, v)) => Err(CollectiveError::LengthMismatch {
                rank,
                expected,
                got: v.len(),
            }),
            None => Ok(()),
        }
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let all = self.exchange(local.to_vec())?;
        self.check_lengths(&all, local.len())?;
        Ok(all.iter().flatten().copied().collect())
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let all = self.exchange(buf.to_vec())?;
        self.check_lengths(&all, buf.len())?;
        buf.fill(0.0);
        for contribution in all.iter() {
            for (b, x) in buf.iter_mut().zip(contribution) {
                *b += x;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(world: usize, f: impl Fn(ThreadGroup) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|g| {
                let f = f.clone();
                std::thread::spawn(move || f(g))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn gather_concatenates_in_rank_order_and_reduce_sums() {
        let out = run(3, |mut g| {
            let r = g.rank() as f32;
            let gathered = g.all_gather(&[r, 10.0 + r]).unwrap();
            let mut buf = vec![r, 1.0];
            g.all_reduce_sum(&mut buf).unwrap();
            // A second round right after the first must not see stale data.
            let again = g.all_gather(&[100.0 + r]).unwrap();
            (gathered, buf, again)
        });
        for (gathered, buf, again) in out {
            assert_eq!(gathered, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
            assert_eq!(buf, vec![3.0, 3.0]);
            assert_eq!(again, vec![100.0, 101.0, 102.0]);
        }
    }

    #[test]
    fn unequal_lengths_are_an_error_naming_the_rank() {
        let out = run(2, |mut g| {
            let local = vec![0.0; 1 + g.rank()];
            g.all_gather(&local).map_err(|e| e.to_string())
        });
        let err = out[0].clone().unwrap_err();
        assert!(err.contains("rank 1 contributed 2 values"), "{err}");
    }

    #[test]
    fn a_missing_rank_times_out_instead_of_hanging() {
        let mut groups = ThreadGroup::with_timeout(2, Duration::from_millis(50));
        let mut g0 = groups.remove(0);
        let err = g0.all_gather(&[1.0]).unwrap_err();
        assert!(matches!(err, CollectiveError::Timeout(_)), "{err}");
        // The group is now broken for everyone.
        let err = groups[0].all_gather(&[1.0]).unwrap_err();
        assert!(matches!(err, CollectiveError::Broken(_)), "{err}");
    }

    #[test]
    fn single_process_is_the_identity() {
        let mut s = SingleProcess;
        assert_eq!(s.all_gather(&[1.0, 2.0]).unwrap(), vec![1.0, 2.0]);
        let mut b = [3.0];
        s.all_reduce_sum(&mut b).unwrap();
        assert_eq!(b, [3.0]);
        assert_eq!((s.rank(), s.world_size()), (0, 1));
    }
}
