//! Sets of sample indices stored as sorted, disjoint, closed-open ranges. A shard of 10,000
//! samples consumed in order is one range, so the ledger stays small however long the epoch.

use serde::{Deserialize, Serialize};

/// A set of `u64` indices as sorted, non-overlapping, non-adjacent `[start, end)` ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

// Reading goes through `from_ranges`, so a hand-edited state file cannot break the invariants.
impl From<Vec<(u64, u64)>> for RangeSet {
    fn from(ranges: Vec<(u64, u64)>) -> Self {
        Self::from_ranges(ranges)
    }
}

impl From<RangeSet> for Vec<(u64, u64)> {
    fn from(set: RangeSet) -> Self {
        set.ranges
    }
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Build from ranges in any order, overlapping or not (empty ranges are ignored).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = Self::new();
        for (s, e) in ranges {
            set.insert_range(s, e);
        }
        set
    }

    /// The ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Whether no index is in the set.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many indices the set holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: u64) -> bool {
        // First range whose end is past `index`: the only one that can hold it.
        let i = self.ranges.partition_point(|&(_, e)| e <= index);
        self.ranges.get(i).is_some_and(|&(s, _)| s <= index)
    }

    /// The least index of `[start, end)` in the set, if any.
    pub fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        self.ranges.get(i).filter(|&&(s, _)| s < end).map(|&(s, _)| s.max(start))
    }

    /// Add one index.
    pub fn insert(&mut self, index: u64) {
        self.insert_range(index, index.saturating_add(1));
    }

    /// Add `[start, end)`, merging with neighbours it overlaps or touches.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        let last = self.ranges.partition_point(|&(s, _)| s <= end);
        let (mut s, mut e) = (start, end);
        if first < last {
            s = s.min(self.ranges[first].0);
            e = e.max(self.ranges[last - 1].1);
        }
        self.ranges.splice(first..last, [(s, e)]);
    }

    /// Remove `[start, end)`.
    pub fn remove_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &(s, e) in &self.ranges {
            if e <= start || s >= end {
                out.push((s, e));
                continue;
            }
            if s < start {
                out.push((s, start));
            }
            if e > end {
                out.push((end, e));
            }
        }
        self.ranges = out;
    }

    /// Add every index of `other`.
    pub fn union_with(&mut self, other: &RangeSet) {
        for &(s, e) in &other.ranges {
            self.insert_range(s, e);
        }
    }

    /// Remove every index of `other`.
    pub fn subtract(&mut self, other: &RangeSet) {
        for &(s, e) in &other.ranges {
            self.remove_range(s, e);
        }
    }

    /// How many indices the two sets share.
    pub fn intersection_len(&self, other: &RangeSet) -> u64 {
        let (mut i, mut j, mut n) = (0, 0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (self.ranges[i], other.ranges[j]);
            let (s, e) = (a.0.max(b.0), a.1.min(b.1));
            if s < e {
                n += e - s;
            }
            if a.1 < b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        n
    }

    /// Whether the set is exactly `[0, total)`.
    pub fn is_exactly(&self, total: u64) -> bool {
        if total == 0 {
            return self.ranges.is_empty();
        }
        self.ranges == [(0, total)]
    }

    /// The largest index plus one (0 when empty).
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, |&(_, e)| e)
    }
}

/// `indices` in order as runs of consecutive ascending values, `[start, end)` each: a batch's
/// positions in a shard are mostly consecutive, so a thousand voters' tens of thousands of
/// positions become about one run per voter and shard.
pub fn runs(indices: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut rest = indices;
    std::iter::from_fn(move || {
        let (&start, tail) = rest.split_first()?;
        let len = tail
            .iter()
            .zip(1u64..)
            .take_while(|&(&i, k)| start.checked_add(k) == Some(i))
            .count();
        rest = &tail[len..];
        // Saturating: a run holding u64::MAX ends there, one short (callers refuse such an index).
        Some((start, start.saturating_add(len as u64 + 1)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_merge_touching_and_overlapping_ranges() {
        let mut s = RangeSet::new();
        for i in [5, 3, 4, 10, 0] {
            s.insert(i);
        }
        assert_eq!(s.ranges(), &[(0, 1), (3, 6), (10, 11)]);
        s.insert_range(1, 3);
        assert_eq!(s.ranges(), &[(0, 6), (10, 11)]);
        s.insert_range(2, 12);
        assert_eq!(s.ranges(), &[(0, 12)]);
        assert_eq!(s.len(), 12);
        assert!(s.is_exactly(12) && !s.is_exactly(13));
        assert!(s.contains(0) && s.contains(11) && !s.contains(12));
    }

    #[test]
    fn remove_and_intersect() {
        let mut s = RangeSet::from_ranges([(0, 10), (20, 30)]);
        s.remove_range(5, 25);
        assert_eq!(s.ranges(), &[(0, 5), (25, 30)]);
        let t = RangeSet::from_ranges([(3, 27)]);
        assert_eq!(s.intersection_len(&t), 2 + 2);
        let mut u = s.clone();
        u.union_with(&t);
        assert_eq!(u.ranges(), &[(0, 30)]);
        u.subtract(&RangeSet::from_ranges([(0, 1), (29, 40)]));
        assert_eq!(u.ranges(), &[(1, 29)]);
        assert_eq!(u.end(), 29);
        assert!(RangeSet::new().is_exactly(0));
    }

    #[test]
    fn first_in_finds_the_least_shared_index() {
        let s = RangeSet::from_ranges([(3, 5), (8, 10)]);
        assert_eq!(s.first_in(0, 3), None);
        assert_eq!(s.first_in(0, 4), Some(3));
        assert_eq!(s.first_in(4, 20), Some(4));
        assert_eq!(s.first_in(5, 8), None);
        assert_eq!(s.first_in(6, 9), Some(8));
        assert_eq!(s.first_in(10, 12), None);
        assert_eq!(s.first_in(7, 7), None);
    }

    #[test]
    fn runs_split_at_every_break_in_order() {
        let r: Vec<_> = runs(&[4, 5, 6, 9, 2, 3, 3, u64::MAX]).collect();
        assert_eq!(r, [(4, 7), (9, 10), (2, 4), (3, 4), (u64::MAX, u64::MAX)]);
        assert_eq!(runs(&[]).count(), 0);
    }

    #[test]
    fn serialises_as_pairs() {
        let s = RangeSet::from_ranges([(0, 3), (7, 9)]);
        assert_eq!(serde_json::to_string(&s).unwrap(), "[[0,3],[7,9]]");
        let back: RangeSet = serde_json::from_str("[[7,9],[0,2],[1,3]]").unwrap();
        assert_eq!(back, s);
    }
}
