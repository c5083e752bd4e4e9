//! The coordinator's HTTP endpoint as Prometheus sees it: bind with an HTTP address on port 0,
//! drive the run over real gRPC calls, and scrape `/metrics` with a plain HTTP/1.1 request.

use distclip_config::RunConfig;
use distclip_coordinator::{Coordinator, CoordinatorOptions, ShardInfo};
use distclip_proto::v1::coordinator_client::CoordinatorClient;
use distclip_proto::v1::{
    CommitRequest, JoinRequest, LeaseRequest, LeaveRequest, QuorumRequest, ShardIndices,
    ShardReport, StepAction, StepMetrics,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path`; the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no body: {raw}"));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

/// `/metrics` as series -> value, checking the status and that every line is a comment or a
/// `name{labels} value` sample.
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}\n{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
            (k.to_owned(), v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_members_and_a_committed_step() {
    let dir = std::env::temp_dir().join(format!("distclip-coord-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = RunConfig::load(
        None,
        &[
            "data.train=/nonexistent/{0..1}.tar".into(),
            "train.batch_size=3".into(),
            "train.max_steps=1".into(),
            "cluster.min_workers=1".into(),
            "data.shuffle=false".into(),
        ],
    )
    .unwrap();
    let shards = (0..2)
        .map(|i| ShardInfo { url: format!("/nonexistent/{i}.tar"), weight: 1.0 })
        .collect();
    let mut opts = CoordinatorOptions::new(config, shards, &dir);
    opts.http_listen = Some("127.0.0.1:0".into());
    let coord = Coordinator::bind(opts).await.unwrap();
    let http = coord.http_addr().expect("an HTTP endpoint was asked for");
    assert_ne!(http.port(), 0);
    let written = std::fs::read_to_string(dir.join("coordinator.http")).unwrap();
    assert_eq!(written.trim(), http.to_string());
    let grpc = coord.local_addr();
    let server = tokio::spawn(coord.run(std::future::pending()));

    let (status, body) = get(http, "/healthz").await;
    assert!(status.contains(" 200 "), "{status} {body}");
    let m = scrape(http).await;
    assert_eq!(m["distclip_workers"], 0.0);
    assert_eq!(m["distclip_step"], 0.0);
    assert_eq!(m["distclip_run_finished"], 0.0);
    assert!(!m.contains_key("distclip_loss"), "no loss before the first commit");

    let mut c = CoordinatorClient::connect(format!("http://{grpc}")).await.unwrap();
    c.join(JoinRequest { worker_id: "w0".into(), peer_address: "w0:1".into(), ..Default::default() })
        .await
        .unwrap();
    let m = scrape(http).await;
    assert_eq!(m["distclip_workers"], 1.0);
    let age = r#"distclip_worker_last_heartbeat_age_seconds{worker="w0",rank=""}"#;
    assert!((0.0..5.0).contains(&m[age]), "{m:?}");

    // One step of three samples from shard 0, which holds four (one of them bad).
    let leases = c
        .lease(LeaseRequest { worker_id: "w0".into(), epoch: 0, want: 1, shard_reports: vec![], fresh: false })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(leases[0].shard, 0);
    let q = c
        .quorum(QuorumRequest { worker_id: "w0".into(), step: 0, epoch: 0, has_data: true, commit_quorum: 0, known_quorum: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.action, StepAction::Train as i32);
    let mut report = ShardReport { shard: 0, epoch: 0, samples: 4, skipped: vec![3], ..Default::default() };
    report.skipped_by_reason.insert("decode".into(), 1);
    let d = c
        .commit(CommitRequest {
            worker_id: "w0".into(),
            quorum_id: q.quorum.as_ref().unwrap().quorum_id,
            step: 0,
            ok: true,
            error: String::new(),
            consumed: vec![ShardIndices { shard: 0, indices: vec![0, 1, 2] }],
            shard_reports: vec![report],
            metrics: Some(StepMetrics {
                loss: 2.25,
                lr: 0.0005,
                logit_scale: 14.5,
                grad_norm: 1.5,
                samples: 3,
                data_s: 0.25,
                compute_s: 1.0,
                comm_s: 0.125,
                step_s: 1.5,
                params_checksum: String::new(),
            }),
            non_finite: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.commit, "{}", d.reason);

    let m = scrape(http).await;
    let expect = [
        ("distclip_step", 1.0),
        ("distclip_samples_total", 3.0),
        ("distclip_loss", 2.25),
        ("distclip_learning_rate", 0.0005),
        ("distclip_logit_scale", 14.5),
        ("distclip_grad_norm", 1.5),
        ("distclip_samples_per_second", 2.0),
        ("distclip_quorum_id", 1.0),
        ("distclip_world_size", 1.0),
        ("distclip_steps_dropped_total", 0.0),
        (r#"distclip_skipped_samples_total{reason="decode"}"#, 1.0),
        (r#"distclip_worker_step_seconds{worker="w0",rank="0"}"#, 1.5),
        (r#"distclip_worker_data_wait_seconds{worker="w0",rank="0"}"#, 0.25),
        (r#"distclip_worker_compute_seconds{worker="w0",rank="0"}"#, 1.0),
        (r#"distclip_worker_communication_seconds{worker="w0",rank="0"}"#, 0.125),
        (r#"distclip_worker_samples_per_second{worker="w0",rank="0"}"#, 2.0),
    ];
    for (series, value) in expect {
        assert_eq!(m.get(series), Some(&value), "{series} in {m:?}");
    }

    // max_steps = 1: the next quorum finishes the run, and /metrics says so.
    let q = c
        .quorum(QuorumRequest { worker_id: "w0".into(), step: 1, epoch: 0, has_data: true, commit_quorum: 0, known_quorum: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.action, StepAction::Finish as i32);
    let m = scrape(http).await;
    assert_eq!(m["distclip_run_finished"], 1.0);
    c.leave(LeaveRequest { worker_id: "w0".into(), reason: "finished".into() }).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("coordinator did not exit")
        .unwrap()
        .unwrap();
    assert!(outcome.finished(), "{outcome:?}");
    // The endpoint goes away with the coordinator.
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
    std::fs::remove_dir_all(&dir).ok();
}
