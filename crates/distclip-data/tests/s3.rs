//! Reading shards from a real S3-compatible server on loopback (no mocks of S3).
//!
//! The server: `DISTCLIP_TEST_S3_ENDPOINT` (e.g. `http://127.0.0.1:9000`, any S3 API such as
//! `s3s-fs` or `moto_server`, credentials `test`/`test` accepted), or else a `moto_server` found
//! on `PATH`, started here on a free loopback port. With neither, the test says so and passes:
//! `.ci/run` is expected to provide one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distclip_data::stats::{StatsOptions, data_stats_with};
use distclip_data::writer::{TarWriter, encode_jpeg};
use distclip_data::{RetryPolicy, ShardList, ShardOpener, SkipReason};
use object_store::ObjectStoreExt;

struct Server {
    endpoint: String,
    child: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn server() -> Option<Server> {
    if let Ok(endpoint) = std::env::var("DISTCLIP_TEST_S3_ENDPOINT") {
        return Some(Server {
            endpoint,
            child: None,
        });
    }
    if !on_path("moto_server") {
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server {
        endpoint: format!("http://127.0.0.1:{port}"),
        child: Some(child),
    };
    // Readiness probe of an external process: bounded, then give up loudly.
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not start listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(server)
}

/// `PUT /bucket` (unsigned; moto and s3s-fs without auth accept it). An existing bucket is fine.
fn create_bucket(endpoint: &str, bucket: &str) {
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(hostport).unwrap();
    write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
}

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

#[test]
fn shards_stream_from_a_real_s3_server() {
    let Some(server) = server() else {
        eprintln!(
            "no S3 server: set DISTCLIP_TEST_S3_ENDPOINT or put moto_server on PATH; S3 test not run"
        );
        return;
    };
    let bucket = "distclip-test";
    create_bucket(&server.endpoint, bucket);
    let options = [
        ("aws_endpoint", server.endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
    ];
    let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name(bucket);
    for (k, v) in options {
        builder = builder.with_config(k.parse().unwrap(), v);
    }
    let store = builder.build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for s in 0..2u64 {
        let path = object_store::path::Path::from(format!("laion/{s:05}.tar"));
        rt.block_on(store.put(&path, shard(3, s + 1).into()))
            .unwrap();
    }
    let list = ShardList::parse(&format!(
        "s3://{bucket}/laion/{{00000..00001}}.tar::s3://{bucket}/laion/missing.tar"
    ))
    .unwrap();
    let opener = ShardOpener::new(RetryPolicy::fast(2)).with_options(options);
    let opts = StatsOptions {
        threads: 2,
        image_size: 16,
        retry: RetryPolicy::fast(2),
        ..Default::default()
    };
    let stats = data_stats_with(Arc::new(list), opener, &opts).unwrap();
    assert_eq!((stats.samples, stats.shards), (6, 3));
    assert_eq!(stats.failed_shards.len(), 1);
    let f = &stats.failed_shards[0];
    assert_eq!((f.shard, f.reason), (2, SkipReason::ShardOpenFailed));
    assert!(f.error.contains("missing.tar"), "{}", f.error);
    assert_eq!(stats.skipped, [("shard_open_failed".to_string(), 1)].into());
    assert!(stats.bytes > 0);
}
