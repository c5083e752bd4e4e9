//! The loader's live counters: samples, bytes, skips by reason and failed shards.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::samples::SkipReason;

/// A shard that ended early (could not be opened, or broke part way).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedShard {
    /// Index in the shard list.
    pub shard: usize,
    /// The shard's URL.
    pub url: String,
    /// Why it ended.
    pub reason: SkipReason,
    /// The error.
    pub error: String,
    /// Samples (groups) read before it ended: a resume would start here.
    pub samples_read: u64,
}

/// Counters shared by the workers; read them any time with [`Counters::snapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    pub(super) samples: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) shards: AtomicU64,
    skipped: Mutex<BTreeMap<SkipReason, u64>>,
    failed: Mutex<Vec<FailedShard>>,
}

/// A point-in-time copy of the [`Counters`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CountersSnapshot {
    /// Examples decoded and handed on.
    pub samples: u64,
    /// Shard bytes read.
    pub bytes: u64,
    /// Shards finished (read to the end or failed).
    pub shards: u64,
    /// Skips by reason.
    pub skipped: BTreeMap<SkipReason, u64>,
    /// Shards that ended early, in the order they failed.
    pub failed_shards: Vec<FailedShard>,
}

impl Counters {
    /// Copy the current values.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            samples: self.samples.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            shards: self.shards.load(Ordering::Relaxed),
            skipped: self.skipped.lock().map(|m| m.clone()).unwrap_or_default(),
            failed_shards: self.failed.lock().map(|v| v.clone()).unwrap_or_default(),
        }
    }

    /// Count a skip and warn, rate-limited per reason: the first 5, then the 10th, 100th, ...
    pub fn skip(&self, reason: SkipReason, shard_url: &str, key: &str, detail: &str) {
        let n = match self.skipped.lock() {
            Ok(mut m) => {
                let c = m.entry(reason).or_insert(0);
                *c += 1;
                *c
            }
            Err(_) => return,
        };
        if n <= 5 || is_power_of_ten(n) {
            tracing::warn!(
                reason = reason.name(),
                shard = shard_url,
                key,
                count = n,
                "skipping: {detail}"
            );
        }
    }

    pub(super) fn fail_shard(&self, f: FailedShard) {
        tracing::warn!(reason = f.reason.name(), shard = %f.url, samples_read = f.samples_read, "shard failed: {}", f.error);
        self.skip_silently(f.reason);
        if let Ok(mut v) = self.failed.lock() {
            v.push(f);
        }
    }

    fn skip_silently(&self, reason: SkipReason) {
        if let Ok(mut m) = self.skipped.lock() {
            *m.entry(reason).or_insert(0) += 1;
        }
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_of_ten() {
        assert!(is_power_of_ten(1) && is_power_of_ten(10) && is_power_of_ten(1000));
        assert!(!is_power_of_ten(20) && !is_power_of_ten(6) && !is_power_of_ten(0));
    }
}
