//! Deterministic randomness that must not change between builds: the coordinator's shard order
//! and resampled draws, which a restarted coordinator replays, and the loader's per-worker seeds.
//! One generator (SplitMix64, <https://prng.di.unimi.it/splitmix64.c>) and one weighted draw,
//! so the coordinator and the loader cannot drift apart. Nothing here depends on an external
//! RNG crate's version.

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The next output of the SplitMix64 generator with `state`, advancing it.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, n)` (multiply-shift: no modulo; the bias is below 2^-64 · n).
pub fn below(state: &mut u64, n: u64) -> u64 {
    ((u128::from(splitmix64(state)) * u128::from(n)) >> 64) as u64
}

/// A uniform draw in `[0, 1)` with 53 random bits.
pub fn unit(state: &mut u64) -> f64 {
    (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// One seed from several parts (run seed, epoch, worker, a stream tag, ...): each part is folded
/// in and stirred by a SplitMix64 step, so seeds that differ in any part are unrelated.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h = GOLDEN;
    for &p in parts {
        h ^= p;
        h = splitmix64(&mut h);
    }
    h
}

/// Draws with replacement in proportion to weights (OpenCLIP's `--dataset-resampled` with
/// `--train-data-upsampling-factors`).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedDraw {
    /// Running sums of the weights.
    cumulative: Vec<f64>,
}

impl WeightedDraw {
    /// Weights in shard order; they should be positive and finite (callers check, naming the
    /// shard).
    pub fn new(weights: impl IntoIterator<Item = f64>) -> Self {
        let mut acc = 0.0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        Self { cumulative }
    }

    /// The sum of the weights.
    pub fn total(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// The index drawn by `u`, a uniform number in `[0, 1)`; `None` when there is nothing to
    /// draw from (no weights, or their sum is not positive).
    pub fn pick(&self, u: f64) -> Option<usize> {
        let total = self.total();
        if self.cumulative.is_empty() || total.is_nan() || total <= 0.0 {
            return None;
        }
        let x = u * total;
        Some(self.cumulative.partition_point(|&c| c <= x).min(self.cumulative.len() - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // First outputs of splitmix64.c seeded with 0.
        let mut s = 0;
        let got: Vec<u64> = (0..4).map(|_| splitmix64(&mut s)).collect();
        assert_eq!(got, [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F, 0xF88B_B8A8_724C_81EC]);
    }

    #[test]
    fn below_and_unit_stay_in_range() {
        let mut s = 7;
        for n in [1u64, 2, 3, 10, 1 << 40] {
            for _ in 0..1000 {
                assert!(below(&mut s, n) < n);
            }
        }
        let mut hits = [0u32; 4];
        for _ in 0..4000 {
            let u = unit(&mut s);
            assert!((0.0..1.0).contains(&u));
            hits[(u * 4.0) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (900..1100).contains(&h)), "{hits:?}");
    }

    #[test]
    fn mix_separates_every_part() {
        let base = mix(&[1, 2, 3]);
        assert_ne!(base, mix(&[1, 2, 4]));
        assert_ne!(base, mix(&[2, 1, 3]));
        assert_ne!(base, mix(&[1, 2]));
        assert_eq!(base, mix(&[1, 2, 3]));
        // One part: a SplitMix64 step from GOLDEN ^ part.
        let mut h = GOLDEN ^ 5;
        assert_eq!(mix(&[5]), splitmix64(&mut h));
    }

    #[test]
    fn weighted_draw_follows_the_weights() {
        let d = WeightedDraw::new([1.0, 0.0, 3.0]);
        assert_eq!(d.total(), 4.0);
        assert_eq!(d.pick(0.0), Some(0));
        assert_eq!(d.pick(0.2499), Some(0));
        // A zero weight is never drawn: its interval is empty.
        assert_eq!(d.pick(0.25), Some(2));
        assert_eq!(d.pick(0.999_999), Some(2));
        let mut s = 11;
        let mut counts = [0u32; 3];
        for _ in 0..8000 {
            counts[d.pick(unit(&mut s)).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((1800..2200).contains(&counts[0]), "{counts:?}");
        assert_eq!(WeightedDraw::new([]).pick(0.5), None);
        assert_eq!(WeightedDraw::new([0.0, 0.0]).pick(0.5), None);
    }
}
