//! In-process exactness of the distributed step (issue 4 item 7, the in-process half): ranks are
//! threads exchanging through `ThreadGroup`. With the same samples, W ranks give the parameters
//! of one rank holding the whole global batch, and all ranks hold bit-identical parameters
//! after every step.
//!
//! Metric, per tensor: max |a - b| / max |b|, bound 1e-5; the key third of `attn.in_proj_bias`,
//! whose exact gradient is zero, is held to the noise bound of `common::Errors::key_bias`.

mod common;

use std::sync::Arc;

use burn::tensor::Device;
use common::*;
use distclip_model::checkpoint::StateDict;
use distclip_worker::{Collective, SingleProcess, StepError, ThreadGroup, Trainer};

const TOL: f64 = 1e-5;

/// Final state dict, per-step checksums and losses of each rank, after training on the
/// fixture's 3 batches: rank r takes the next `splits[r].iter().sum()` rows of each batch, as
/// micro-batches of `splits[r]` rows (one entry: no accumulation).
fn train(splits: &[&[usize]]) -> Vec<(StateDict, Vec<u64>, Vec<f32>)> {
    let batches = Arc::new(batches());
    let splits: Vec<Vec<usize>> = splits.iter().map(|s| s.to_vec()).collect();
    let handles: Vec<_> = ThreadGroup::new(splits.len())
        .into_iter()
        .map(|mut group| {
            let batches = batches.clone();
            let splits = splits.clone();
            std::thread::spawn(move || {
                let device = Device::flex();
                let mut trainer = Trainer::new(init_model(&device), optim_config(), &device).unwrap();
                let r = group.rank();
                let start: usize = splits[..r].iter().flatten().sum();
                let mut sums = Vec::new();
                let mut losses = Vec::new();
                for b in batches.iter() {
                    assert_eq!(splits.iter().flatten().sum::<usize>(), b.len);
                    let mut first = start;
                    let micro: Vec<HostBatch> = splits[r]
                        .iter()
                        .map(|&len| {
                            first += len;
                            b.rows(first - len, len)
                        })
                        .collect();
                    let locals: Vec<_> = micro.iter().map(|m| m.local()).collect();
                    let pending = if locals.len() == 1 {
                        trainer.forward_backward(locals[0], &mut group).unwrap()
                    } else {
                        trainer.forward_backward_accum(&locals, &mut group).unwrap()
                    };
                    let stats = trainer.apply(pending).unwrap();
                    assert_eq!(stats.checksum, trainer.checksum());
                    sums.push(stats.checksum);
                    losses.push(stats.loss);
                }
                (trainer.state_dict(), sums, losses)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn assert_same_as_one_rank(splits: &[&[usize]]) {
    let reference = train(&[&[6]]).remove(0);
    let ranks = train(splits);
    for (r, (_, sums, losses)) in ranks.iter().enumerate() {
        // Identical parameters on every rank after every step.
        assert_eq!(sums, &ranks[0].1, "rank {r} diverged from rank 0 ({splits:?})");
        // The reported loss is the global one, the same on every rank.
        assert_eq!(losses, &ranks[0].2, "rank {r} reports another loss");
    }
    for (k, (a, b)) in ranks[0].2.iter().zip(&reference.2).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "step {k}: loss {a} vs {b} on one rank");
    }
    let errs = compare(&ranks[0].0, &reference.0);
    println!("{splits:?} vs [[6]]: worst tensors {:?}; key-bias max abs {:?}", &errs.relative[..3], errs.key_bias[0]);
    for (name, e) in &errs.relative {
        assert!(*e <= TOL, "{splits:?}: {name} differs from one rank by {e:e} of its scale");
    }
    let lrs: Vec<f64> = (0..3).map(|k| optim_config().lr_at(k)).collect();
    for (name, e) in &errs.key_bias {
        assert!(*e <= key_bias_bound(&lrs), "{splits:?}: {name} key bias differs by {e:e}");
    }
}

#[test]
fn two_ranks_of_three_equal_one_rank_of_six() {
    assert_same_as_one_rank(&[&[3], &[3]]);
}

#[test]
fn three_unequal_ranks_one_empty_equal_one_rank_of_six() {
    assert_same_as_one_rank(&[&[4], &[0], &[2]]);
}

#[test]
fn accumulating_three_micro_batches_equals_one_batch() {
    assert_same_as_one_rank(&[&[2, 2, 2]]);
}

#[test]
fn accumulation_across_ranks_with_an_empty_micro_batch_equals_one_batch() {
    assert_same_as_one_rank(&[&[2, 1], &[0, 3]]);
}

/// Run one step on W threads with per-rank batches; return each rank's result.
fn one_step(batches: Vec<HostBatch>) -> Vec<Result<u64, StepError>> {
    let handles: Vec<_> = ThreadGroup::new(batches.len())
        .into_iter()
        .zip(batches)
        .map(|(mut group, b)| {
            std::thread::spawn(move || {
                let device = Device::flex();
                let mut trainer = Trainer::new(init_model(&device), optim_config(), &device).unwrap();
                let before = trainer.checksum();
                let out = trainer.forward_backward(b.local(), &mut group);
                // A failed step leaves the parameters as they were.
                assert_eq!(trainer.checksum(), before);
                out.and_then(|p| trainer.apply(p)).map(|s| s.checksum)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_malformed_batch_on_one_rank_fails_the_step_on_every_rank() {
    let b = batches().remove(0);
    let mut bad = b.rows(3, 3);
    bad.tokens[5] = 10_000; // outside the fixture's vocabulary of 64
    let out = one_step(vec![b.rows(0, 3), bad]);
    assert!(matches!(&out[0], Err(StepError::PeerBatch { rank: 1 })), "{:?}", out[0]);
    let err = out[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("token id 10000"), "{err}");
}

#[test]
fn an_empty_global_batch_and_a_non_finite_loss_are_errors_not_updates() {
    let b = batches().remove(0);
    let empty = b.rows(0, 0);
    let out = one_step(vec![empty.clone(), empty]);
    assert!(out.iter().all(|r| matches!(r, Err(StepError::EmptyGlobalBatch))), "{out:?}");

    let mut poisoned = b.rows(3, 3);
    poisoned.images[0] = f32::NAN;
    let out = one_step(vec![b.rows(0, 3), poisoned]);
    for r in &out {
        assert!(matches!(r, Err(StepError::NonFinite { what: "loss", .. })), "{r:?}");
    }
}

#[test]
fn state_bytes_heal_a_joining_worker_exactly() {
    let device = Device::flex();
    let batches = batches();
    let mut a = Trainer::new(init_model(&device), optim_config(), &device).unwrap();
    let p = a.forward_backward(batches[0].local(), &mut SingleProcess).unwrap();
    a.apply(p).unwrap();
    let bytes = a.state_bytes();
    // A fresh worker (different random init) takes over the state.
    let fresh = distclip_model::ClipConfig::from_file(&fixture_dir().join("config.json")).unwrap().init(&device);
    let mut b = Trainer::from_state_bytes(fresh, optim_config(), &device, &bytes).unwrap();
    assert_eq!((b.step(), b.checksum()), (a.step(), a.checksum()));
    assert_eq!(b.optimizer(), a.optimizer());
    for t in [&mut a, &mut b] {
        let p = t.forward_backward(batches[1].local(), &mut SingleProcess).unwrap();
        t.apply(p).unwrap();
    }
    assert_eq!(a.checksum(), b.checksum(), "healed worker diverged");

    // Corrupt or foreign state is an error and changes nothing.
    let before = b.checksum();
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    assert!(matches!(b.load_state_bytes(&bad), Err(StepError::State(_))));
    assert!(matches!(b.load_state_bytes(&bytes[..100]), Err(StepError::State(_))));
    let other_cfg = r#"{"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2}}"#;
    let other = distclip_model::ClipConfig::from_json_str(other_cfg).unwrap().init(&device);
    let mut other = Trainer::new(other, optim_config(), &device).unwrap();
    let err = other.load_state_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("another model"), "{err}");
    assert_eq!(b.checksum(), before);
}

#[test]
fn a_pending_step_of_another_step_is_refused() {
    let device = Device::flex();
    let batches = batches();
    let mut t = Trainer::new(init_model(&device), optim_config(), &device).unwrap();
    let old = t.forward_backward(batches[0].local(), &mut SingleProcess).unwrap();
    let fresh = t.forward_backward(batches[0].local(), &mut SingleProcess).unwrap();
    // A dropped step leaves nothing behind: the second attempt gives the same gradients.
    assert_eq!(old.loss(), fresh.loss());
    assert_eq!(old.grad_norm(), fresh.grad_norm());
    t.apply(fresh).unwrap();
    let before = t.checksum();
    assert!(matches!(t.apply(old), Err(StepError::Stale { pending: 0, current: 1, .. })));
    assert_eq!(t.checksum(), before);
}

#[test]
fn the_model_is_saved_with_open_clip_names() {
    let device = Device::flex();
    let t = Trainer::new(init_model(&device), optim_config(), &device).unwrap();
    let dir = std::env::temp_dir().join(format!("distclip-worker-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    t.save_safetensors(&path).unwrap();
    let back = distclip_model::checkpoint::read_state_dict(&path).unwrap();
    assert_eq!(back, init_state());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gradient_buckets_do_not_change_the_result() {
    // Two ranks, once with the default 25 MB bucket (one bucket here) and once with buckets of
    // 1000 values (62 buckets, the last one partial): bit-identical parameters.
    let run = |bucket_bytes: usize| {
        let b = Arc::new(batches().remove(0));
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|mut group| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let device = Device::flex();
                    let mut t = Trainer::new(init_model(&device), optim_config(), &device)
                        .unwrap()
                        .with_bucket_bytes(bucket_bytes);
                    let mine = b.rows(3 * group.rank(), 3);
                    let p = t.forward_backward(mine.local(), &mut group).unwrap();
                    t.apply(p).unwrap().checksum
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    };
    let whole = run(distclip_worker::DEFAULT_BUCKET_BYTES);
    assert_eq!(whole[0], whole[1]);
    assert_eq!(run(4000), whole);
}
