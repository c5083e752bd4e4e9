//! FLIP patch dropout (<https://arxiv.org/abs/2212.00794>), OpenCLIP's `PatchDropout`
//! (`transformer.py`): during training each image keeps a random subset of its patch tokens
//! (the class token always stays), applied after the positional embedding and before `ln_pre`.
//!
//! OpenCLIP draws the subset with `torch.randn(batch, tokens).topk(k)`, a uniformly random
//! k-subset per row. distclip draws the same distribution from a seed per sample ([`keep`]),
//! so a sample's subset depends on the run seed, the step and its row in the global batch and
//! not on which rank computes it: N workers × b samples still give the update of 1 × N·b.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Patches a row keeps at drop probability `prob` out of `patches`: OpenCLIP's
/// `max(1, int(num_tokens * (1 - prob)))`, computed in f64 as Python does.
pub fn kept_count(patches: usize, prob: f64) -> usize {
    ((patches as f64 * (1.0 - prob)) as usize).clamp(1, patches.max(1))
}

/// The seed of one sample's subset: run seed, step and the row in the global batch.
pub fn row_seed(seed: u64, step: u64, global_row: usize) -> u64 {
    distclip_rng::mix(&[seed, 0x5041_5443_4844_524F, step, global_row as u64])
}

/// A uniformly random `count`-subset of `0..patches` from `seed`, ascending (a partial
/// Fisher–Yates shuffle; the order of kept tokens does not change the tower's output).
pub fn keep(patches: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut all: Vec<usize> = (0..patches).collect();
    let count = count.min(patches);
    for i in 0..count {
        let j = i + distclip_rng::below(&mut state, (patches - i) as u64) as usize;
        all.swap(i, j);
    }
    let mut kept = all[..count].to_vec();
    kept.sort_unstable();
    kept
}

/// Kept patch indices `[rows, count]` for `rows` samples starting at `first_row` of the global
/// batch of `step`, as an index tensor for [`crate::Clip::encode_image_kept`].
pub fn keep_tensor(
    patches: usize,
    prob: f64,
    seed: u64,
    step: u64,
    first_row: usize,
    rows: usize,
    device: &Device,
) -> Tensor<2, Int> {
    let count = kept_count(patches, prob);
    let mut ids = Vec::with_capacity(rows * count);
    for r in 0..rows {
        ids.extend(keep(patches, count, row_seed(seed, step, first_row + r)).into_iter().map(|i| i as i64));
    }
    Tensor::from_data(TensorData::new(ids, [rows, count]), device)
}

/// Tokens `[B, 1 + N, W]` (class token first) -> `[B, 1 + K, W]`: the class token, then the
/// patches `keep` `[B, K]` names (indices into the N patches).
pub fn drop_patches(x: Tensor<3>, keep: Tensor<2, Int>) -> Tensor<3> {
    let [b, l, w] = x.dims();
    let [_, k] = keep.dims();
    let cls = x.clone().narrow(1, 0, 1);
    let patches = x.narrow(1, 1, l - 1);
    let index = keep.reshape([b, k, 1]).expand([b, k, w]);
    Tensor::cat(vec![cls, patches.gather(1, index)], 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_count_follows_python_int_truncation() {
        assert_eq!(kept_count(4, 0.5), 2);
        assert_eq!(kept_count(49, 0.5), 24); // int(24.5)
        assert_eq!(kept_count(49, 0.75), 12); // int(12.25)
        assert_eq!(kept_count(10, 0.7), 3); // 10 * 0.30000000000000004
        assert_eq!(kept_count(10, 0.9), 1); // 10 * 0.09999999999999998 = 0.999..., int 0, max 1
        assert_eq!(kept_count(3, 0.9), 1); // max(1, int(0.3))
    }

    #[test]
    fn subsets_are_distinct_sorted_and_uniform() {
        let (n, k) = (8, 3);
        let mut hits = [0usize; 8];
        for s in 0..4000u64 {
            let kept = keep(n, k, row_seed(7, 0, s as usize));
            assert_eq!(kept.len(), k);
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
            for i in kept {
                hits[i] += 1;
            }
        }
        // Each patch is kept with probability 3/8: 1500 of 4000, sd ~31.
        for h in hits {
            assert!((1350..1650).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn a_row_keeps_its_subset_whoever_computes_it() {
        let d = Device::default();
        let whole = keep_tensor(16, 0.5, 3, 9, 0, 6, &d).into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let tail = keep_tensor(16, 0.5, 3, 9, 4, 2, &d).into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        assert_eq!(&whole[4 * 8..], &tail[..]);
        let next_step = keep_tensor(16, 0.5, 3, 10, 0, 6, &d).into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        assert_ne!(whole, next_step);
    }

    #[test]
    fn drop_patches_keeps_the_class_token_and_the_named_patches() {
        let d = Device::default();
        // [1, 1 + 4, 2]: token t holds (t, 10 t).
        let x = Tensor::<3>::from_data(
            TensorData::new((0..5).flat_map(|t| [t as f32, 10.0 * t as f32]).collect::<Vec<_>>(), [1, 5, 2]),
            &d,
        );
        let keep = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 3], [1, 2]), &d);
        let y = drop_patches(x, keep).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(y, vec![0.0, 0.0, 2.0, 20.0, 4.0, 40.0]);
    }
}
