//! webdataset's sample shuffle buffer.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// webdataset's `_shuffle`: fill a buffer (two samples per step until full), yield a random
/// element once `initial` are held (swap-remove), drain at the end.
pub(super) struct Shuffle<I, T> {
    src: I,
    buf: Vec<T>,
    bufsize: usize,
    initial: usize,
    rng: ChaCha8Rng,
    exhausted: bool,
}

impl<I: Iterator<Item = T>, T> Shuffle<I, T> {
    pub(super) fn new(src: I, bufsize: usize, initial: usize, rng: ChaCha8Rng) -> Self {
        Self {
            src,
            buf: Vec::new(),
            bufsize,
            initial: initial.min(bufsize),
            rng,
            exhausted: false,
        }
    }

    fn pick(&mut self) -> Option<T> {
        if self.buf.is_empty() {
            return None;
        }
        let k = self.rng.random_range(0..self.buf.len());
        Some(self.buf.swap_remove(k))
    }
}

impl<I: Iterator<Item = T>, T> Iterator for Shuffle<I, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        while !self.exhausted {
            match self.src.next() {
                None => self.exhausted = true,
                Some(s) => {
                    self.buf.push(s);
                    if self.buf.len() < self.bufsize {
                        match self.src.next() {
                            Some(s2) => self.buf.push(s2),
                            None => self.exhausted = true,
                        }
                    }
                    if self.buf.len() >= self.initial {
                        return self.pick();
                    }
                }
            }
        }
        self.pick()
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{RawSample, SamplePos};
    use rand::SeedableRng;

    #[test]
    fn shuffle_is_a_permutation() {
        let src: Vec<RawSample> = (0..50)
            .map(|i| RawSample {
                key: i.to_string(),
                members: vec![],
                pos: SamplePos { shard: 0, index: i },
                cut: None,
                draw: 0,
            })
            .collect();
        let out: Vec<u64> = Shuffle::new(src.into_iter(), 10, 3, ChaCha8Rng::seed_from_u64(0))
            .map(|s| s.pos.index)
            .collect();
        let mut sorted = out.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(out, sorted);
    }
}
