use super::*;
use crate::samples::SkipReason;
use crate::samples::tests::tar_of;
use crate::source::RetryPolicy;
use crate::source::testing::memory_opener;
use crate::transform::tests::jpeg;
use std::collections::HashSet;

/// `shards` shards of `per` samples each in an in-memory store, keys `s{shard}_{i}`.
fn dataset(shards: usize, per: usize) -> (Arc<ShardList>, ShardOpener) {
    let img = jpeg(12, 10, 3);
    let mut objects = Vec::new();
    for s in 0..shards {
        let names: Vec<(String, Vec<u8>)> = (0..per)
            .flat_map(|i| {
                [
                    (format!("s{s}_{i}.jpg"), img.clone()),
                    (
                        format!("s{s}_{i}.txt"),
                        format!("caption {s} {i}").into_bytes(),
                    ),
                ]
            })
            .collect();
        let members: Vec<(&str, &[u8])> = names
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        objects.push((format!("d/{s:03}.tar"), tar_of(&members)));
    }
    let refs: Vec<(&str, Vec<u8>)> = objects
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let (opener, _) = memory_opener(&refs, RetryPolicy::fast(2));
    let spec = format!("memory:///d/{{000..{:03}}}.tar", shards - 1);
    (Arc::new(ShardList::parse(&spec).unwrap()), opener)
}

fn cfg(threads: usize, seed: u64) -> LoaderConfig {
    LoaderConfig {
        threads,
        batch_size: 4,
        seed,
        shuffle_buffer: 8,
        shuffle_initial: 4,
        prefetch: 2,
        transform: TransformConfig {
            image_size: 8,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn run(
    list: &Arc<ShardList>,
    opener: &ShardOpener,
    cfg: LoaderConfig,
) -> (Vec<Batch>, CountersSnapshot) {
    let loader = Loader::new(list.clone(), opener.clone(), cfg).unwrap();
    let counters = loader.counters();
    let batches: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
    (batches, counters.snapshot())
}

#[test]
fn every_sample_exactly_once_per_epoch() {
    let (list, opener) = dataset(5, 7);
    let (batches, counts) = run(&list, &opener, cfg(3, 1));
    let positions: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
    assert_eq!(positions.len(), 35);
    let unique: HashSet<_> = positions.iter().copied().collect();
    let want: HashSet<_> = (0..5)
        .flat_map(|s| (0..7).map(move |i| SamplePos { shard: s, index: i }))
        .collect();
    assert_eq!(unique, want);
    assert_eq!(
        batches.iter().map(Batch::len).collect::<Vec<_>>(),
        [4, 4, 4, 4, 4, 4, 4, 4, 3]
    );
    assert_eq!(
        (counts.samples, counts.shards, counts.skipped.len()),
        (35, 5, 0)
    );
    let b = &batches[0];
    assert_eq!((b.images.len(), b.tokens.len()), (4 * 3 * 8 * 8, 4 * 77));
    // Keys and tokens travel with their positions.
    for (k, p) in b.keys.iter().zip(&b.positions) {
        assert_eq!(k, &format!("s{}_{}", p.shard, p.index));
    }
}

#[test]
fn same_seed_same_batches_different_seed_different_order() {
    let (list, opener) = dataset(6, 5);
    let (a, _) = run(&list, &opener, cfg(3, 42));
    let (b, _) = run(&list, &opener, cfg(3, 42));
    assert_eq!(a, b);
    let (c, _) = run(&list, &opener, cfg(3, 43));
    let order = |v: &[Batch]| {
        v.iter()
            .flat_map(|b| b.positions.clone())
            .collect::<Vec<_>>()
    };
    assert_ne!(order(&a), order(&c));
    let mut next_epoch = cfg(3, 42);
    next_epoch.epoch = 1;
    let (d, _) = run(&list, &opener, next_epoch);
    assert_ne!(order(&a), order(&d));
    // Without shuffling, one thread reads the shards in spec order.
    let mut plain = cfg(1, 0);
    plain.shuffle = false;
    let (e, _) = run(&list, &opener, plain);
    let o = order(&e);
    assert_eq!(
        &o[..6],
        &(0..5)
            .map(|i| SamplePos { shard: 0, index: i })
            .chain([SamplePos { shard: 1, index: 0 }])
            .collect::<Vec<_>>()[..]
    );
}

#[test]
fn explicit_tasks_resume_mid_shard() {
    let (list, opener) = dataset(3, 6);
    let mut c = cfg(2, 0);
    c.order = Order::Explicit(vec![
        ShardTask::from_index(2, 4),
        ShardTask::from_index(0, 5),
    ]);
    let (batches, _) = run(&list, &opener, c);
    let mut got: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
    got.sort();
    let p = |shard, index| SamplePos { shard, index };
    assert_eq!(got, [p(0, 5), p(2, 4), p(2, 5)]);
    let mut bad = cfg(1, 0);
    bad.order = Order::Explicit(vec![ShardTask::new(3)]);
    assert!(matches!(
        Loader::new(list, opener, bad),
        Err(LoaderError::Config(_))
    ));
}

#[test]
fn resampled_mode_draws_shards_with_replacement_by_weight() {
    let (list, opener) = dataset(3, 2);
    let mut list = (*list).clone();
    list.shards[2].weight = 0.000_001;
    let list = Arc::new(list);
    let epoch = Loader::new(list.clone(), opener.clone(), cfg(1, 0))
        .err()
        .unwrap();
    assert!(epoch.to_string().contains("resampled"), "{epoch}");
    let mut c = cfg(2, 9);
    c.order = Order::Resampled {
        shards_per_epoch: Some(20),
    };
    let (batches, counts) = run(&list, &opener, c.clone());
    let positions: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
    assert_eq!((positions.len(), counts.shards), (40, 20));
    let shards: HashSet<usize> = positions.iter().map(|p| p.shard).collect();
    assert_eq!(shards, HashSet::from([0, 1]));
    // Repeated draws of a sample are augmented differently.
    let per = 3 * 8 * 8;
    let mut images: std::collections::HashMap<SamplePos, HashSet<Vec<u32>>> =
        Default::default();
    for b in &batches {
        for (i, p) in b.positions.iter().enumerate() {
            let img = b.images[i * per..(i + 1) * per]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            images.entry(*p).or_default().insert(img);
        }
    }
    assert!(
        images.values().any(|v| v.len() > 1),
        "every repeat had the same crop"
    );
    let (again, _) = run(&list, &opener, c);
    assert_eq!(batches, again);
    // Endless mode keeps going.
    let mut endless = cfg(2, 9);
    endless.order = Order::Resampled {
        shards_per_epoch: None,
    };
    let loader = Loader::new(list, opener, endless).unwrap();
    assert_eq!(
        loader
            .take(30)
            .filter(|b| b.as_ref().unwrap().len() == 4)
            .count(),
        30
    );
}

#[test]
fn more_threads_than_shards_and_drop_mid_epoch() {
    let (list, opener) = dataset(2, 3);
    let (batches, _) = run(&list, &opener, cfg(5, 0));
    assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), 6);
    let mut c = cfg(2, 0);
    c.keep_partial = false;
    let (batches, _) = run(&list, &opener, c);
    // The partial batch's examples are dropped; its shard summaries are not.
    assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), [4, 0]);
    assert_eq!(batches.iter().map(|b| b.finished.len()).sum::<usize>(), 2);
    // Dropping the loader early stops the workers (their sends fail) without hanging.
    let loader = Loader::new(list, opener, cfg(2, 0)).unwrap();
    drop(loader);
}

/// Like [`dataset`], but sample `i` of every shard has a zero-byte image when `bad(i)`.
fn dataset_with_bad(
    shards: usize,
    per: usize,
    bad: impl Fn(usize) -> bool,
) -> (Arc<ShardList>, ShardOpener) {
    let img = jpeg(12, 10, 3);
    let objects: Vec<(String, Vec<u8>)> = (0..shards)
        .map(|s| {
            let names: Vec<(String, Vec<u8>)> = (0..per)
                .flat_map(|i| {
                    let image = if bad(i) { Vec::new() } else { img.clone() };
                    [
                        (format!("s{s}_{i}.jpg"), image),
                        (format!("s{s}_{i}.txt"), b"c".to_vec()),
                    ]
                })
                .collect();
            let members: Vec<(&str, &[u8])> = names
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_slice()))
                .collect();
            (format!("d/{s:03}.tar"), tar_of(&members))
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = objects
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let (opener, _) = memory_opener(&refs, RetryPolicy::fast(2));
    let spec = format!("memory:///d/{{000..{:03}}}.tar", shards - 1);
    (Arc::new(ShardList::parse(&spec).unwrap()), opener)
}

fn all_positions(batches: &[Batch]) -> Vec<SamplePos> {
    let mut v: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
    v.sort();
    v
}

#[test]
fn skip_ranges_are_not_yielded_and_the_summary_accounts_for_every_index() {
    let (list, opener) = dataset_with_bad(2, 8, |i| i == 5);
    let mut c = cfg(2, 0);
    c.order = Order::Explicit(vec![
        ShardTask {
            shard: 1,
            start: 1,
            skip: vec![2..4, 6..7],
        },
        ShardTask::new(0),
    ]);
    let (batches, counts) = run(&list, &opener, c);
    let p = |shard, index| SamplePos { shard, index };
    let want: Vec<SamplePos> = [0, 1, 2, 3, 4, 6, 7]
        .map(|i| p(0, i))
        .into_iter()
        .chain([1, 4, 7].map(|i| p(1, i)))
        .collect();
    assert_eq!(all_positions(&batches), want);
    let mut summaries: Vec<ShardSummary> =
        batches.iter().flat_map(|b| b.finished.clone()).collect();
    summaries.sort_by_key(|s| s.shard);
    let summary = |shard, skipped: Vec<u64>| ShardSummary {
        shard,
        samples: 8,
        skipped_by_reason: [("zero_byte_member".to_owned(), skipped.len() as u64)].into(),
        skipped,
        failed: None,
    };
    // Index 5 is bad in both shards: skipped as bad in each, since neither task excluded it.
    assert_eq!(summaries, [summary(0, vec![5]), summary(1, vec![5])]);
    assert_eq!(counts.skipped, [(SkipReason::ZeroByteMember, 2)].into());
}

#[test]
fn a_summary_follows_the_last_example_of_its_shard() {
    let (list, opener) = dataset_with_bad(6, 5, |i| i % 4 == 1);
    for (threads, shuffle, keep_partial) in
        [(1, false, true), (3, true, true), (2, true, false)]
    {
        let mut c = cfg(threads, 7);
        c.shuffle = shuffle;
        c.keep_partial = keep_partial;
        c.batch_size = 3;
        let (batches, _) = run(&list, &opener, c);
        let mut seen: HashSet<usize> = HashSet::new();
        for (i, b) in batches.iter().enumerate() {
            for s in &b.finished {
                assert!(seen.insert(s.shard), "shard {} summarised twice", s.shard);
                assert_eq!((s.samples, &s.skipped, &s.failed), (5, &vec![1], &None));
                // No example of a finished shard comes later.
                let later = batches[i + 1..]
                    .iter()
                    .flat_map(|b| &b.positions)
                    .filter(|p| p.shard == s.shard)
                    .count();
                assert_eq!(later, 0, "shard {} has examples after its summary", s.shard);
            }
        }
        assert_eq!(seen.len(), 6);
        let delivered: usize = batches.iter().map(Batch::len).sum();
        assert_eq!(delivered, 6 * 4);
        // Only the last batch may be empty (it then carries the last summaries).
        let empty: Vec<usize> = (0..batches.len())
            .filter(|&i| batches[i].is_empty())
            .collect();
        assert!(
            empty.is_empty() || empty == [batches.len() - 1],
            "{empty:?}"
        );
    }
    // Without the partial batch, its summaries still arrive, in a batch with no examples.
    let (list, opener) = dataset(2, 3);
    let mut c = cfg(1, 0);
    c.keep_partial = false;
    c.shuffle = false;
    let (batches, _) = run(&list, &opener, c);
    assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), [4, 0]);
    let shards = |b: &Batch| b.finished.iter().map(|s| s.shard).collect::<Vec<_>>();
    assert_eq!(
        (shards(&batches[0]), shards(&batches[1])),
        (vec![0], vec![1])
    );
}

#[test]
fn failed_shards_are_summarised_with_the_failure() {
    let (list, opener) = dataset(2, 3);
    let mut list = (*list).clone();
    list.shards[1].url = "memory:///d/missing.tar".into();
    let mut c = cfg(1, 0);
    c.shuffle = false;
    let (batches, _) = run(&Arc::new(list), &opener, c);
    let summaries: Vec<ShardSummary> =
        batches.iter().flat_map(|b| b.finished.clone()).collect();
    assert_eq!(summaries.len(), 2);
    assert_eq!((summaries[0].shard, summaries[0].samples), (0, 3));
    assert_eq!(summaries[0].failed, None);
    assert_eq!((summaries[1].shard, summaries[1].samples), (1, 0));
    let err = summaries[1].failed.as_deref().unwrap_or_default();
    assert!(err.contains("missing.tar"), "{err}");
}

#[test]
fn fed_tasks_are_taken_as_needed_until_the_channel_closes() {
    let (list, opener) = dataset(10, 3);
    let (tx, rx) = crossbeam_channel::unbounded();
    for s in 0..10 {
        tx.send(ShardTask::new(s)).unwrap();
    }
    // A task for a shard this list does not have: reported, not fatal.
    tx.send(ShardTask::new(99)).unwrap();
    let probe = rx.clone();
    let mut c = cfg(2, 0);
    c.order = Order::Feed(rx);
    c.batch_size = 1;
    c.prefetch = 1;
    c.shuffle = false;
    let loader = Loader::new(list, opener, c).unwrap();
    drop(tx);
    let mut batches = Vec::new();
    let mut summarised = 0;
    for b in loader {
        let b = b.unwrap();
        summarised += b.finished.len();
        // Per worker at most one open task plus one finished task whose summary has not
        // reached us yet (one in its channel of 1, or one being sent): a loader that drained
        // the channel ahead of need would have taken all 11 at once.
        let taken = 11 - probe.len();
        assert!(
            taken <= summarised + 2 * 2,
            "{taken} tasks taken with {summarised} summarised"
        );
        batches.push(b);
    }
    let want: Vec<SamplePos> = (0..10)
        .flat_map(|s| (0..3).map(move |i| SamplePos { shard: s, index: i }))
        .collect();
    assert_eq!(all_positions(&batches), want);
    let mut summaries: Vec<ShardSummary> =
        batches.iter().flat_map(|b| b.finished.clone()).collect();
    summaries.sort_by_key(|s| s.shard);
    assert_eq!(summaries.len(), 11);
    assert!(
        summaries[..10]
            .iter()
            .all(|s| s.samples == 3 && s.failed.is_none())
    );
    let bad = &summaries[10];
    assert_eq!((bad.shard, bad.samples), (99, 0));
    assert!(
        bad.failed
            .as_deref()
            .unwrap_or_default()
            .contains("outside the shard list of 10"),
        "{bad:?}"
    );
    assert_eq!(probe.len(), 0);
}
