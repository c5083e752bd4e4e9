//! The gRPC coordinator on 127.0.0.1:0 driven by fake workers over real tonic clients: join,
//! quorum, lease, commit, epoch end, finish, leave. The fake workers "read" shard `s` as
//! `s + 3` samples, so the test knows every position and can check exactly-once itself.

use distclip_config::RunConfig;
use distclip_coordinator::{Coordinator, CoordinatorOptions, RunOutcome, ShardInfo};
use distclip_proto::v1::coordinator_client::CoordinatorClient;
use distclip_proto::v1::{
    CommitRequest, HeartbeatRequest, JoinRequest, LeaseRequest, LeaveRequest, QuorumRequest,
    ShardIndices, ShardReport, StatusRequest, StepAction, StepMetrics,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TOKEN: &str = "s3cret-run-token";
const SHARDS: u64 = 6;
const GUARD: Duration = Duration::from_secs(60);

type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

#[derive(Clone)]
struct Auth(Option<String>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("ascii token"),
            );
        }
        Ok(req)
    }
}

async fn client(addr: &str, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    CoordinatorClient::with_interceptor(channel, Auth(token.map(str::to_owned)))
}

fn shards() -> Vec<ShardInfo> {
    (0..SHARDS)
        .map(|i| ShardInfo {
            url: format!("/nonexistent/shards/{i:03}.tar"),
            weight: 1.0,
        })
        .collect()
}

fn samples_of(shard: u64) -> u64 {
    shard + 3
}

fn run_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distclip-coord-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// What one fake worker committed: (epoch, shard, index) triples.
type Consumed = Vec<(u64, u64, u64)>;

/// A worker that reads leased shards in order, `batch` positions per step, and reports each
/// shard with the commit that consumes its last position.
async fn fake_worker(addr: String, id: String, batch: usize, start_step: u64) -> Consumed {
    let mut c = client(&addr, Some(TOKEN)).await;
    let joined = c
        .join(JoinRequest {
            worker_id: id.clone(),
            peer_address: format!("{id}.peer:1"),
            device: "flex".into(),
            threads: 1,
            step: start_step,
            rank_hint: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.num_shards, SHARDS);
    assert!(
        joined.config_toml.contains("batch_size = 4"),
        "{}",
        joined.config_toml
    );
    // Heartbeats on their own task, as a real worker does.
    let hb = {
        let mut c = c.clone();
        let id = id.clone();
        let period = Duration::from_millis(joined.heartbeat_interval_ms);
        tokio::spawn(async move {
            loop {
                let known = c
                    .heartbeat(HeartbeatRequest {
                        worker_id: id.clone(),
                        step: 0,
                        state: "training".into(),
                    })
                    .await;
                assert!(known.is_ok_and(|r| r.into_inner().known));
                tokio::time::sleep(period).await;
            }
        })
    };
    let (mut step, mut epoch) = (start_step, 0u64);
    // Positions still to read per leased shard, in order.
    let mut held: VecDeque<(u64, VecDeque<u64>)> = VecDeque::new();
    let mut pending: Option<(Vec<ShardIndices>, Vec<ShardReport>)> = None;
    let mut committed = Vec::new();
    // The quorum whose member list this worker holds, and the TRAIN answers that left it out.
    let (mut known, mut without_members) = (0u64, 0u64);
    loop {
        let reading = held.len() as u32;
        if reading < 2 {
            let r = c
                .lease(LeaseRequest {
                    worker_id: id.clone(),
                    epoch,
                    want: 2 - reading,
                    shard_reports: vec![],
                    fresh: false,
                })
                .await
                .unwrap()
                .into_inner();
            for l in r.leases {
                assert_eq!(l.epoch, epoch);
                let skip: Vec<(u64, u64)> = l.skip.iter().map(|r| (r.start, r.end)).collect();
                let left = (0..samples_of(l.shard))
                    .filter(|i| !skip.iter().any(|&(s, e)| (s..e).contains(i)))
                    .collect();
                held.push_back((l.shard, left));
            }
        }
        let has_data = pending.as_ref().is_some_and(|(c, _)| !c.is_empty())
            || held.iter().any(|(_, left)| !left.is_empty());
        let q = c
            .quorum(QuorumRequest {
                worker_id: id.clone(),
                step,
                epoch,
                has_data,
                commit_quorum: 0,
                known_quorum: known,
            })
            .await
            .unwrap()
            .into_inner();
        match StepAction::try_from(q.action).unwrap() {
            StepAction::Train => {
                assert_eq!(q.step, step, "no worker falls behind in this test");
                assert!(q.heal_from.is_empty());
                let members = &q.quorum.as_ref().unwrap().members;
                if members.is_empty() {
                    assert_eq!(q.quorum.as_ref().unwrap().quorum_id, known, "left out only for the quorum held");
                    without_members += 1;
                } else {
                    known = q.quorum.as_ref().unwrap().quorum_id;
                }
                // Keep the batch of a step that did not commit; otherwise take the next one.
                let (consumed, reports) = pending.take().unwrap_or_else(|| {
                    let mut groups: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
                    let mut reports = Vec::new();
                    let mut n = 0;
                    while n < batch {
                        let Some((shard, left)) = held.front_mut() else {
                            break;
                        };
                        let shard = *shard;
                        while n < batch {
                            let Some(i) = left.pop_front() else { break };
                            groups.entry(shard).or_default().push(i);
                            n += 1;
                        }
                        if left.is_empty() {
                            held.pop_front();
                            reports.push(ShardReport {
                                shard,
                                epoch,
                                samples: samples_of(shard),
                                ..Default::default()
                            });
                        }
                    }
                    (
                        groups
                            .into_iter()
                            .map(|(shard, indices)| ShardIndices { shard, indices })
                            .collect(),
                        reports,
                    )
                });
                let n: usize = consumed.iter().map(|g| g.indices.len()).sum();
                let quorum_id = q.quorum.as_ref().unwrap().quorum_id;
                let d = c
                    .commit(CommitRequest {
                        worker_id: id.clone(),
                        quorum_id,
                        step,
                        ok: true,
                        error: String::new(),
                        consumed: consumed.clone(),
                        shard_reports: reports.clone(),
                        metrics: Some(StepMetrics {
                            loss: 1.0 / (step + 1) as f64,
                            samples: n as u32,
                            step_s: 0.01,
                            ..Default::default()
                        }),
                        non_finite: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if d.commit {
                    committed.extend(
                        consumed
                            .iter()
                            .flat_map(|g| g.indices.iter().map(move |&i| (epoch, g.shard, i))),
                    );
                    step += 1;
                } else {
                    pending = Some((consumed, reports));
                }
            }
            StepAction::Wait => {}
            StepAction::NextEpoch => {
                assert!(
                    pending.is_none() && held.is_empty(),
                    "an epoch ends only when everything was consumed"
                );
                epoch = q.epoch;
            }
            StepAction::Finish => break,
            StepAction::Unspecified => panic!("unspecified action"),
        }
    }
    hb.abort();
    assert!(step - start_step < 2 || without_members > 0, "{id}: every answer carried the member list");
    c.leave(LeaveRequest {
        worker_id: id,
        reason: "finished".into(),
    })
    .await
    .unwrap();
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_fake_workers_train_two_epochs_exactly_once() {
    let dir = run_dir("grpc");
    let config = RunConfig::load(
        None,
        &[
            "data.train=/nonexistent/shards/{000..005}.tar".into(),
            "train.batch_size=4".into(),
            "train.epochs=2".into(),
            "train.seed=7".into(),
            "cluster.min_workers=3".into(),
            "cluster.heartbeat_interval_ms=200".into(),
            "cluster.heartbeat_timeout_ms=3000".into(),
            "data.shards_per_worker=2".into(),
        ],
    )
    .unwrap();
    let mut opts = CoordinatorOptions::new(config, shards(), &dir);
    opts.token = Some(TOKEN.into());
    let coord = Coordinator::bind(opts).await.unwrap();
    let addr = coord.local_addr().to_string();
    assert_eq!(
        std::fs::read_to_string(dir.join("coordinator.addr"))
            .unwrap()
            .trim(),
        addr
    );
    let server = tokio::spawn(coord.run(std::future::pending()));

    // Health: SERVING while the run waits for workers.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "distclip.v1.Coordinator".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        h.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Strangers are refused, and the token never reaches the logs.
    let mut stranger = client(&addr, None).await;
    let e = stranger.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut wrong = client(&addr, Some("guess")).await;
    assert_eq!(
        wrong
            .join(JoinRequest {
                worker_id: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let mut ok = client(&addr, Some(TOKEN)).await;
    assert_eq!(
        ok.status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .state,
        "waiting"
    );

    let workers: Vec<_> = (0..3)
        .map(|i| tokio::spawn(fake_worker(addr.clone(), format!("w{i}"), 4, 0)))
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(
            tokio::time::timeout(GUARD, w)
                .await
                .expect("worker hung")
                .unwrap(),
        );
    }
    let outcome: RunOutcome = tokio::time::timeout(GUARD, server)
        .await
        .expect("coordinator did not exit")
        .unwrap()
        .unwrap();
    assert!(outcome.finished(), "{outcome:?}");
    assert_eq!(outcome.epoch, 2);

    // Exactly once, from the workers' side: every position of both epochs, none twice.
    let per_epoch: u64 = (0..SHARDS).map(samples_of).sum();
    let distinct: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a position was committed twice");
    assert_eq!(all.len() as u64, 2 * per_epoch);
    assert_eq!(outcome.samples_seen, 2 * per_epoch);

    // And from the run directory's evidence.
    for epoch in 0..2 {
        let audit: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("ledger/epoch-{epoch}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(audit["exactly_once"], true, "{audit}");
        assert_eq!(audit["samples_committed"], per_epoch);
        assert_eq!(audit["samples_total"], per_epoch);
        assert_eq!(audit["shards"].as_array().unwrap().len(), SHARDS as usize);
    }
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        metrics
            .iter()
            .map(|m| m["samples"].as_u64().unwrap())
            .sum::<u64>(),
        2 * per_epoch
    );
    assert_eq!(metrics.len() as u64, outcome.step);
    assert!(
        metrics
            .iter()
            .enumerate()
            .all(|(i, m)| m["step"] == i as u64 && m["world_size"] == 3)
    );
    let events: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |k: &str| events.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(
        (
            count("join"),
            count("leave"),
            count("epoch_end"),
            count("finish")
        ),
        (3, 3, 2, 1)
    );
    assert_eq!(count("quorum"), 1, "one membership all run");
    assert_eq!(count("auth_refused"), 2);
    assert!(
        !std::fs::read_to_string(dir.join("events.jsonl"))
            .unwrap()
            .contains("guess")
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["finished"], true);
    assert_eq!(state["step"], outcome.step);
    assert!(
        std::fs::read_to_string(dir.join("config.toml"))
            .unwrap()
            .contains("min_workers = 3")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_the_epoch_from_state_json() {
    let dir = run_dir("restart");
    let config = RunConfig::load(
        None,
        &[
            "data.train=/nonexistent/shards/{000..005}.tar".into(),
            "train.batch_size=4".into(),
            "cluster.min_workers=2".into(),
            "cluster.heartbeat_interval_ms=200".into(),
            "cluster.heartbeat_timeout_ms=3000".into(),
            "train.max_steps=2".into(),
        ],
    )
    .unwrap();
    let opts = |config: RunConfig| CoordinatorOptions {
        token: Some(TOKEN.into()),
        ..CoordinatorOptions::new(config, shards(), &dir)
    };
    // First life: two workers commit two steps of 4 + 4 samples, then stop on max_steps.
    let coord = Coordinator::bind(opts(config.clone())).await.unwrap();
    let addr = coord.local_addr().to_string();
    let server = tokio::spawn(coord.run(std::future::pending()));
    let workers: Vec<_> = (0..2)
        .map(|i| tokio::spawn(fake_worker(addr.clone(), format!("w{i}"), 4, 0)))
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(
            tokio::time::timeout(GUARD, w)
                .await
                .expect("worker hung")
                .unwrap(),
        );
    }
    let outcome = tokio::time::timeout(GUARD, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (outcome.step, outcome.samples_seen, outcome.state.as_str()),
        (2, 16, "finished")
    );

    // Second life on the same run directory without the step limit: it resumes mid-epoch with
    // the survivors (they rejoin at step 2), and the new leases skip what was committed.
    let mut more = config.clone();
    more.train.max_steps = None;
    let coord = Coordinator::bind(opts(more)).await.unwrap();
    assert_eq!(coord.run_id(), outcome.run_id);
    let addr = coord.local_addr().to_string();
    let server = tokio::spawn(coord.run(std::future::pending()));
    let mut c = client(&addr, Some(TOKEN)).await;
    let s = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            s.state.as_str(),
            s.step,
            s.samples_seen,
            s.epoch_samples_done
        ),
        ("waiting", 2, 16, 16)
    );
    let workers: Vec<_> = (0..2)
        .map(|i| tokio::spawn(fake_worker(addr.clone(), format!("w{i}"), 4, 2)))
        .collect();
    for w in workers {
        all.extend(
            tokio::time::timeout(GUARD, w)
                .await
                .expect("worker hung")
                .unwrap(),
        );
    }
    let outcome = tokio::time::timeout(GUARD, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(outcome.finished(), "{outcome:?}");
    let per_epoch: u64 = (0..SHARDS).map(samples_of).sum();
    let distinct: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!(
        (distinct.len(), all.len() as u64),
        (per_epoch as usize, per_epoch),
        "every position once across both lives"
    );
    let audit: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ledger/epoch-0.json")).unwrap())
            .unwrap();
    assert_eq!(audit["exactly_once"], true, "{audit}");
    assert_eq!(audit["samples_committed"], per_epoch);
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(events.contains("\"kind\":\"resume\""), "{events}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A channel to `addr` (127.0.0.1) with these TLS settings.
async fn tls_channel(addr: &str, tls: &distclip_proto::tls::Tls) -> Result<Channel, String> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls.client_config("127.0.0.1"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| distclip_proto::tls::error_chain(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_the_run_and_refuses_strangers() {
    use distclip_proto::tls::{TlsFiles, certs};
    let dir = run_dir("tls");
    let files = certs::generate(&dir.join("pki"), &["127.0.0.1".into()]).unwrap();
    let config = RunConfig::load(None, &["data.train=/nonexistent/shards/{000..005}.tar".into()]).unwrap();
    let mut opts = CoordinatorOptions::new(config, shards(), &dir);
    opts.token = Some(TOKEN.into());
    opts.tls = Some(files.load().unwrap());
    let coord = Coordinator::bind(opts).await.unwrap();
    let addr = coord.local_addr().to_string();
    let server = tokio::spawn(coord.run(std::future::pending()));

    // The run's certificate and token: served, health included.
    let tls = files.load().unwrap();
    let channel = tls_channel(&addr, &tls).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "distclip.v1.Coordinator".into() })
        .await
        .unwrap();
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let mut ok = CoordinatorClient::with_interceptor(channel.clone(), Auth(Some(TOKEN.into())));
    assert_eq!(ok.status(StatusRequest {}).await.unwrap().into_inner().state, "waiting");
    // The certificate is not a substitute for the token.
    let mut tokenless = CoordinatorClient::with_interceptor(channel, Auth(None));
    assert_eq!(tokenless.status(StatusRequest {}).await.unwrap_err().code(), tonic::Code::Unauthenticated);

    // Plaintext gets no answer.
    let plain = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await;
    if let Ok(ch) = plain {
        let mut c = CoordinatorClient::with_interceptor(ch, Auth(Some(TOKEN.into())));
        assert!(c.status(StatusRequest {}).await.is_err(), "a plaintext call must fail");
    }
    // A server certificate from another CA is refused by the client, by name.
    let other = certs::generate(&dir.join("other"), &["127.0.0.1".into()]).unwrap().load().unwrap();
    let err = tls_channel(&addr, &other).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    // Without a client certificate, mutual TLS refuses the caller (at the handshake or the
    // first call, depending on the TLS version's order of messages).
    let certless = TlsFiles { mutual: false, ..files.clone() }.load().unwrap();
    if let Ok(ch) = tls_channel(&addr, &certless).await {
        let mut c = CoordinatorClient::with_interceptor(ch, Auth(Some(TOKEN.into())));
        assert!(c.status(StatusRequest {}).await.is_err(), "a caller without a certificate must be refused");
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_serving_outlives_the_run_until_shutdown() {
    let dir = run_dir("keep");
    let config = RunConfig::load(
        None,
        &[
            "data.train=/nonexistent/shards/{000..005}.tar".into(),
            "train.batch_size=4".into(),
            "cluster.min_workers=1".into(),
        ],
    )
    .unwrap();
    let mut opts = CoordinatorOptions::new(config, shards(), &dir);
    opts.token = Some(TOKEN.into());
    opts.keep_serving = true;
    opts.exit_grace = Some(Duration::from_millis(10));
    let coord = Coordinator::bind(opts).await.unwrap();
    let addr = coord.local_addr().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(coord.run(async {
        let _ = stopped.await;
    }));
    let consumed = tokio::time::timeout(GUARD, fake_worker(addr.clone(), "w0".into(), 4, 0)).await.expect("worker hung");
    assert_eq!(consumed.len() as u64, (0..SHARDS).map(samples_of).sum::<u64>());
    // The run is over and its only worker gone, yet the coordinator still answers.
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut server).await.is_err(), "it exited");
    let mut c = client(&addr, Some(TOKEN)).await;
    assert_eq!(c.status(StatusRequest {}).await.unwrap().into_inner().state, "finished");
    stop.send(()).unwrap();
    let outcome = tokio::time::timeout(GUARD, server).await.expect("no exit after shutdown").unwrap().unwrap();
    assert!(outcome.finished(), "{outcome:?}");
}
