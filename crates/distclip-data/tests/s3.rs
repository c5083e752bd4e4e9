//! Reading shards from a real S3 API server on loopback (no mocks of S3): `s3s-fs`, started in
//! this test process on `127.0.0.1:0` over a temporary folder, with static credentials that it
//! checks (SigV4). The client is object_store's `AmazonS3Builder`, configured the way a user
//! configures distclip (endpoint, allow-http, path-style, region, keys).
//!
//! Faults are real too: a loopback TCP proxy cuts the first response mid-body, a missing key
//! gives a 404, and wrong credentials give a 403.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use distclip_data::loader::{Loader, LoaderConfig, Order, ShardTask};
use distclip_data::source::SourceError;
use distclip_data::stats::{StatsOptions, data_stats_with};
use distclip_data::writer::{TarWriter, encode_jpeg};
use distclip_data::{
    Augment, RetryPolicy, SamplePos, ShardList, ShardOpener, SkipReason, TransformConfig,
};
use object_store::ObjectStoreExt;

const BUCKET: &str = "distclip-test";
const ACCESS: &str = "distclip-access";
const SECRET: &str = "distclip-secret-key";

/// An s3s-fs server on its own runtime; dropping it stops the server and removes the folder.
struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

impl S3Server {
    fn start(name: &str) -> S3Server {
        let root = std::env::temp_dir().join(format!("distclip-s3-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // s3s-fs keeps each bucket as a folder under its root.
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let fs = s3s_fs::FileSystem::new(&root).unwrap();
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS, SECRET));
        let service = builder.build();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            use hyper_util::rt::{TokioExecutor, TokioIo};
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = http.serve_connection(TokioIo::new(socket), service).await;
                });
            }
        });
        S3Server {
            addr,
            root,
            runtime: Some(runtime),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Store settings as a user passes them (object_store config keys).
fn options(endpoint: &str, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("aws_endpoint", endpoint.to_string()),
        ("aws_allow_http", "true".into()),
        ("aws_virtual_hosted_style_request", "false".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_access_key_id", ACCESS.into()),
        ("aws_secret_access_key", secret.into()),
    ]
}

/// Upload objects through the S3 API (signed PUTs), as a user's tooling would.
fn put(endpoint: &str, objects: &[(String, Vec<u8>)]) {
    let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name(BUCKET);
    for (k, v) in options(endpoint, SECRET) {
        builder = builder.with_config(k.parse().unwrap(), v);
    }
    let store = builder.build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (key, data) in objects {
        let path = object_store::path::Path::from(key.as_str());
        rt.block_on(store.put(&path, data.clone().into())).unwrap();
    }
}

/// A shard of `n` synthetic samples keyed `{seed}{i:04}`.
fn shard(n: usize, seed: u64) -> Vec<u8> {
    use rand::SeedableRng;
    let mut w = TarWriter::new(Vec::new()).with_mtime(Some(0));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..n {
        let (px, labels) = distclip_data::synth::draw(&mut rng, 24);
        let jpg = encode_jpeg(&px, 24, 24, 90).unwrap();
        let caption = labels.caption();
        w.write_sample(
            &format!("{seed}{i:04}"),
            &[("jpg", &jpg), ("txt", caption.as_bytes())],
        )
        .unwrap();
    }
    w.finish().unwrap()
}

fn opener(endpoint: &str, secret: &str) -> ShardOpener {
    ShardOpener::new(RetryPolicy::fast(2)).with_options(options(endpoint, secret))
}

fn loader_cfg(order: Order) -> LoaderConfig {
    LoaderConfig {
        threads: 2,
        batch_size: 4,
        order,
        shuffle: false,
        prefetch: 2,
        transform: TransformConfig {
            image_size: 16,
            augment: Augment::None,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn shards_stream_from_a_real_s3_server() {
    let server = S3Server::start("read");
    let endpoint = server.endpoint();
    put(
        &endpoint,
        &[
            ("laion/00000.tar".into(), shard(3, 1)),
            ("laion/00001.tar".into(), shard(5, 2)),
        ],
    );
    let list = Arc::new(
        ShardList::parse(&format!(
            "s3://{BUCKET}/laion/{{00000..00001}}.tar::s3://{BUCKET}/laion/missing.tar"
        ))
        .unwrap(),
    );

    // The whole spec through the loader: every sample once, with its key and position; the
    // missing object is a failed shard, reported with its URL.
    let loader = Loader::new(
        list.clone(),
        opener(&endpoint, SECRET),
        loader_cfg(Order::Epoch),
    )
    .unwrap();
    let counters = loader.counters();
    let batches: Vec<_> = loader.map(|b| b.unwrap()).collect();
    let mut got: Vec<(SamplePos, String)> = batches
        .iter()
        .flat_map(|b| b.positions.iter().copied().zip(b.keys.iter().cloned()))
        .collect();
    got.sort();
    let want: Vec<(SamplePos, String)> = (0..3)
        .map(|i| (SamplePos { shard: 0, index: i }, format!("1{i:04}")))
        .chain((0..5).map(|i| (SamplePos { shard: 1, index: i }, format!("2{i:04}"))))
        .collect();
    assert_eq!(got, want);
    let b = &batches[0];
    assert_eq!((b.images.len(), b.tokens.len()), (4 * 3 * 16 * 16, 4 * 77));
    let mut finished: Vec<(usize, u64, bool)> = batches
        .iter()
        .flat_map(|b| {
            b.finished
                .iter()
                .map(|s| (s.shard, s.samples, s.failed.is_some()))
        })
        .collect();
    finished.sort();
    assert_eq!(finished, [(0, 3, false), (1, 5, false), (2, 0, true)]);
    let snap = counters.snapshot();
    assert_eq!((snap.samples, snap.shards), (8, 3));
    assert_eq!(snap.skipped, [(SkipReason::ShardOpenFailed, 1)].into());
    let f = &snap.failed_shards[0];
    assert_eq!((f.shard, f.reason), (2, SkipReason::ShardOpenFailed));
    assert!(f.error.contains("missing.tar"), "{}", f.error);
    assert!(snap.bytes > 0);

    // Resume as the coordinator does: shard 1 from sample 1, with 3 already committed.
    let task = ShardTask {
        shard: 1,
        start: 1,
        // (A range past the shard's end is harmless.)
        skip: vec![3..4, 9..12],
    };
    let loader = Loader::new(
        list.clone(),
        opener(&endpoint, SECRET),
        loader_cfg(Order::Explicit(vec![task])),
    )
    .unwrap();
    let batches: Vec<_> = loader.map(|b| b.unwrap()).collect();
    let idx: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.positions.iter().map(|p| p.index))
        .collect();
    assert_eq!(idx, [1, 2, 4]);

    // The stats path over the same server agrees.
    let opts = StatsOptions {
        threads: 2,
        transform: TransformConfig {
            image_size: 16,
            augment: Augment::None,
            ..Default::default()
        },
        retry: RetryPolicy::fast(2),
        ..Default::default()
    };
    let stats = data_stats_with(list, opener(&endpoint, SECRET), &opts).unwrap();
    assert_eq!((stats.samples, stats.shards), (8, 3));
    assert_eq!(stats.skipped, [("shard_open_failed".to_string(), 1)].into());
}

#[test]
fn not_found_and_wrong_credentials_are_reported_not_retried_forever() {
    let server = S3Server::start("errors");
    let endpoint = server.endpoint();
    put(&endpoint, &[("a/0.tar".into(), shard(2, 3))]);
    let url = format!("s3://{BUCKET}/a/0.tar");
    // The right keys read it.
    let mut body = Vec::new();
    opener(&endpoint, SECRET)
        .open(&url)
        .unwrap()
        .read_to_end(&mut body)
        .unwrap();
    assert_eq!(body, shard(2, 3));
    // 404: final, so tried once although the policy allows two.
    match opener(&endpoint, SECRET).open(&format!("s3://{BUCKET}/a/404.tar")) {
        Err(SourceError::Open {
            url,
            attempts,
            not_found,
            cannot_heal,
            ..
        }) => assert_eq!(
            (url.ends_with("a/404.tar"), attempts, not_found, cannot_heal),
            (true, 1, true, true)
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a missing object opened"),
    }
    // Wrong secret: the server refuses the signature (403), final too, and the error says so.
    match opener(&endpoint, "not-the-secret").open(&url) {
        Err(SourceError::Open {
            attempts,
            not_found,
            cannot_heal,
            message,
            ..
        }) => {
            assert_eq!((attempts, not_found, cannot_heal), (1, false, true));
            assert!(
                message.contains("SignatureDoesNotMatch") || message.contains("403"),
                "{message}"
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("wrong credentials were accepted"),
    }
}

/// A TCP proxy that forwards to `upstream` and cuts its first connection after `cut` response
/// bytes (a reset mid-body), recording every request head it forwards.
struct CutProxy {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<u8>>>,
}

fn cut_proxy(upstream: SocketAddr, cut: usize) -> CutProxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let log = log.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(k) = c_in.read(&mut buf) {
                    if k == 0 || s_out.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..k]);
                }
                let _ = s_out.shutdown(Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            let limit = if n == 0 { cut } else { usize::MAX };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut sent = 0;
                while let Ok(k) = s_in.read(&mut buf) {
                    let k = k.min(limit - sent);
                    if k == 0 || c_out.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    sent += k;
                }
                // The connection dies as a reset one does: both directions, mid-response.
                let _ = c_out.shutdown(Shutdown::Both);
                let _ = s_in.shutdown(Shutdown::Both);
            });
        }
    });
    CutProxy { addr, requests }
}

#[test]
fn a_response_cut_mid_body_resumes_with_a_ranged_get() {
    let server = S3Server::start("resume");
    let endpoint = server.endpoint();
    let data = shard(6, 4);
    assert!(data.len() > 6000, "the shard must outlast the cut");
    put(&endpoint, &[("r/0.tar".into(), data.clone())]);
    // About 3 KB of the first response get through (headers, then part of the body).
    let proxy = cut_proxy(server.addr, 3000);
    let proxied = format!("http://{}", proxy.addr);
    let list = Arc::new(ShardList::parse(&format!("s3://{BUCKET}/r/0.tar")).unwrap());
    let loader = Loader::new(list, opener(&proxied, SECRET), loader_cfg(Order::Epoch)).unwrap();
    let counters = loader.counters();
    let batches: Vec<_> = loader.map(|b| b.unwrap()).collect();
    let idx: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.positions.iter().map(|p| p.index))
        .collect();
    assert_eq!(idx, (0..6).collect::<Vec<u64>>());
    let snap = counters.snapshot();
    assert!(snap.failed_shards.is_empty(), "{:?}", snap.failed_shards);
    // The same bytes as an uninterrupted read (the tar reader stops at the end-of-archive
    // blocks, before the record padding, so compare with a direct read, not the file size).
    let direct = Loader::new(
        Arc::new(ShardList::parse(&format!("s3://{BUCKET}/r/0.tar")).unwrap()),
        opener(&endpoint, SECRET),
        loader_cfg(Order::Epoch),
    )
    .unwrap();
    let direct_counters = direct.counters();
    let direct_batches: Vec<_> = direct.map(|b| b.unwrap()).collect();
    assert_eq!(batches, direct_batches);
    assert_eq!(snap.samples, 6);
    assert_eq!(snap.bytes, direct_counters.snapshot().bytes);
    // The second request asked for the rest only.
    let heads = String::from_utf8_lossy(&proxy.requests.lock().unwrap()).to_lowercase();
    assert_eq!(
        heads.matches("get /distclip-test/r/0.tar").count(),
        2,
        "{heads}"
    );
    let range = heads
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .unwrap_or_else(|| panic!("no ranged GET: {heads}"));
    let from: u64 = range
        .trim()
        .trim_end_matches('-')
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(from > 0 && from < data.len() as u64, "range {range}");
}

#[test]
fn a_run_directory_syncs_to_a_real_s3_server() {
    use distclip_data::remote_sync::RemoteSync;
    let server = S3Server::start("sync");
    let local = std::env::temp_dir().join(format!("distclip-s3-sync-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&local);
    std::fs::create_dir_all(local.join("checkpoints/final")).unwrap();
    // S3 parts are at least 5 MiB except the last: 6 MiB in 5 MiB parts is a 2-part upload.
    let model: Vec<u8> = (0..6u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(local.join("checkpoints/final/model.safetensors"), &model).unwrap();
    std::fs::write(local.join("config.toml"), "[model]\nname = \"tiny\"\n").unwrap();
    let good: Vec<(String, String)> =
        options(&server.endpoint(), SECRET).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let url = format!("s3://{BUCKET}/runs/one");
    let mut sync = RemoteSync::new(&url, &good).unwrap().with_multipart_bytes(5 << 20);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let report = rt.block_on(sync.sync(&local)).unwrap();
    assert_eq!((report.uploaded, report.bytes), (2, (6 << 20) + 22));
    let remote = server.root.join(BUCKET).join("runs/one");
    assert!(std::fs::read(remote.join("checkpoints/final/model.safetensors")).unwrap() == model, "model bytes differ");
    assert_eq!(std::fs::read_to_string(remote.join("config.toml")).unwrap(), "[model]\nname = \"tiny\"\n");
    // Nothing changed: nothing is sent again.
    assert_eq!(rt.block_on(sync.sync(&local)).unwrap().uploaded, 0);

    // Refused credentials fail the sync with the file and the remote named.
    let bad: Vec<(String, String)> =
        options(&server.endpoint(), "wrong-secret").into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut refused = RemoteSync::new(&url, &bad).unwrap();
    let e = rt.block_on(refused.sync(&local)).unwrap_err().to_string();
    assert!(e.contains("config.toml") || e.contains("model.safetensors"), "{e}");
    assert!(e.contains(&url), "{e}");
    std::fs::remove_dir_all(&local).unwrap();
}
