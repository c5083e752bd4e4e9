//! Collectives on loopback rings of W = 1..4, each rank a task with its own server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::{CommError, CommOptions, Group, GroupSpec, PeerServer, Transport, block_range, fetch_state};

fn opts(transport: Transport) -> CommOptions {
    // 64-byte pieces: the test lengths span many pieces per block.
    CommOptions { timeout: Duration::from_secs(10), chunk_bytes: 64, max_chunk_bytes: 1 << 16, token: None, transport, tls: None }
}

async fn servers(w: usize, o: &CommOptions) -> Vec<PeerServer> {
    let mut out = Vec::new();
    for _ in 0..w {
        out.push(PeerServer::bind("127.0.0.1:0".parse().unwrap(), o.clone()).await.unwrap());
    }
    out
}

fn addrs(servers: &[PeerServer]) -> Vec<String> {
    servers.iter().map(|s| s.local_addr().to_string()).collect()
}

async fn ring(servers: &[PeerServer], quorum_id: u64) -> Vec<Group> {
    let peers = addrs(servers);
    let groups = join_all(
        servers.iter().enumerate().map(|(rank, s)| Group::connect(s, GroupSpec { quorum_id, rank, peers: peers.clone() })),
    )
    .await;
    groups.into_iter().map(|g| g.unwrap()).collect()
}

/// Integer-valued inputs, so every summation order gives the exact same float.
fn input(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((rank * 7 + i * 3) % 11) as f32 - 5.0).collect()
}

fn plain_sum(w: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (0..w).map(|r| input(r, n)[i]).sum()).collect()
}

async fn check_collectives(w: usize, o: CommOptions) {
    let transport = o.transport;
    let srv = servers(w, &o).await;
    let groups = ring(&srv, 1).await;
    // 16 f32 per piece: 103 is not divisible by 2, 3 or 4 and spans several pieces per block;
    // 2 is smaller than some worlds (empty blocks); 0 is the degenerate case.
    for n in [103usize, 2, 0] {
        let want = plain_sum(w, n);
        let reduced = join_all(groups.iter().map(|g| async move {
            let mut buf = input(g.rank(), n);
            g.all_reduce_sum(&mut buf).await.map(|()| buf)
        }))
        .await;
        for r in reduced {
            assert_eq!(r.unwrap(), want, "all_reduce W={w} n={n} {transport:?}");
        }
        let gathered = join_all(groups.iter().map(|g| async move { g.all_gather(&input(g.rank(), n)).await })).await;
        let concat: Vec<f32> = (0..w).flat_map(|r| input(r, n)).collect();
        for g in gathered {
            assert_eq!(g.unwrap(), concat, "all_gather W={w} n={n}");
        }
        let scattered = join_all(groups.iter().map(|g| async move { g.reduce_scatter_sum(&input(g.rank(), n)).await })).await;
        for (rank, s) in scattered.into_iter().enumerate() {
            assert_eq!(s.unwrap(), want[block_range(n, w, rank)].to_vec(), "reduce_scatter W={w} n={n} rank {rank}");
        }
    }
    // Broadcast from the last rank: 1000 bytes (16 pieces); the others start with other contents.
    let root = w - 1;
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
    let got = join_all(groups.iter().map(|g| {
        let payload = payload.clone();
        async move {
            let mut buf = if g.rank() == root { payload } else { vec![7u8; g.rank() * 5] };
            g.broadcast(&mut buf, root).await.map(|()| buf)
        }
    }))
    .await;
    for b in got {
        assert_eq!(b.unwrap(), payload, "broadcast W={w}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectives_equal_plain_sums_for_1_to_4_ranks_over_tcp() {
    for w in 1..=4 {
        check_collectives(w, opts(Transport::Tcp)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectives_equal_plain_sums_over_grpc_streams() {
    for w in [2, 3] {
        check_collectives(w, opts(Transport::Grpc)).await;
    }
}

/// A new CA and one mutual-TLS node certificate for 127.0.0.1, in a folder of its own.
fn tls_files(name: &str) -> distclip_proto::tls::TlsFiles {
    let dir = std::env::temp_dir().join(format!("distclip-comm-tls-{name}-{}", std::process::id()));
    distclip_proto::tls::certs::generate(&dir, &["127.0.0.1".into()]).unwrap()
}

/// A data-channel hello whose ticket no server issued.
fn forged_hello() -> crate::wire::Header {
    crate::wire::Header {
        kind: distclip_proto::v1::FrameKind::Hello,
        dtype: distclip_proto::v1::DType::U8,
        quorum_id: 1,
        op_seq: 0,
        step: 0,
        piece: 0,
        len: 0,
        aux: 12345,
    }
}

/// Send [`forged_hello`] on a data channel (plaintext or TLS) and return the reason of the abort
/// frame the server must answer with.
async fn forged_hello_refusal<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&forged_hello().encode()).await.unwrap();
    s.flush().await.unwrap();
    let mut ack = [0u8; crate::wire::HEADER_LEN];
    s.read_exact(&mut ack).await.unwrap();
    let ack = crate::wire::Header::decode(&ack).unwrap();
    assert_eq!(ack.kind, distclip_proto::v1::FrameKind::Abort, "a forged ticket is refused");
    let mut msg = vec![0u8; ack.len as usize];
    s.read_exact(&mut msg).await.unwrap();
    String::from_utf8_lossy(&msg).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_carries_collectives_and_refuses_strangers() {
    let files = tls_files("run");
    // Both transports under TLS: framed TCP channels do their own handshake on the same port.
    let o = CommOptions { tls: Some(files.load().unwrap()), ..opts(Transport::Tcp) };
    check_collectives(3, o.clone()).await;
    check_collectives(2, CommOptions { transport: Transport::Grpc, ..o.clone() }).await;

    let srv = PeerServer::bind("127.0.0.1:0".parse().unwrap(), o.clone()).await.unwrap();
    let addr = srv.local_addr().to_string();
    let state = vec![5u8; 1000];
    let served = Arc::new(state.clone());
    srv.set_state_provider(Arc::new(move || Ok(served.as_ref().clone())));
    assert_eq!(fetch_state(&addr, &o).await.unwrap(), state);

    // Strangers: plaintext; a certificate from another CA; the right CA but no certificate.
    let plain = opts(Transport::Tcp);
    assert!(fetch_state(&addr, &plain).await.is_err());
    let other = CommOptions { tls: Some(tls_files("other").load().unwrap()), ..o.clone() };
    let err = fetch_state(&addr, &other).await.unwrap_err().to_string();
    assert!(err.contains("certificate"), "a server of another CA is named as such: {err}");
    let certless = distclip_proto::tls::TlsFiles { mutual: false, ..files.clone() };
    let certless = CommOptions { tls: Some(certless.load().unwrap()), ..o.clone() };
    assert!(fetch_state(&addr, &certless).await.is_err(), "mutual TLS refuses a caller without a certificate");

    // A plaintext data channel's hello is not a TLS handshake: the server closes it, not hangs.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut hello = crate::wire::MAGIC.to_vec();
    hello.resize(crate::wire::HEADER_LEN, 0);
    tokio::io::AsyncWriteExt::write_all(&mut sock, &hello).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(15), tokio::io::AsyncReadExt::read(&mut sock, &mut buf)).await;
    let n = read.expect("the server must not leave a bad handshake hanging").unwrap_or(0);
    assert!(n == 0 || buf[0] == 0x15, "closed, or a TLS alert record (0x15), got {:?}", &buf[..n]);

    // A TLS connection that asks for the data-channel protocol reaches the framed-TCP handler,
    // which checks its ticket like a plaintext one.
    let tls = files.load().unwrap();
    let sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.rustls_client(&[crate::server::DATA_ALPN]).unwrap());
    let mut s = connector.connect(tls.server_name_for("127.0.0.1").unwrap(), sock).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(crate::server::DATA_ALPN));
    assert!(forged_hello_refusal(&mut s).await.contains("unknown or already used ticket"));

    // And the run's own callers are still served.
    assert_eq!(fetch_state(&addr, &o).await.unwrap(), state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_is_bit_identical_across_ranks_on_real_floats() {
    let w = 3;
    let o = opts(Transport::Tcp);
    let srv = servers(w, &o).await;
    let groups = ring(&srv, 1).await;
    let n = 1001;
    // Non-integer values whose sum depends on the order of additions.
    let data = |r: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + r * 13) as f32 * 0.37).sin() * 10f32.powi((i % 7) as i32 - 3)).collect() };
    let out = join_all(groups.iter().map(|g| async move {
        let mut b = data(g.rank());
        g.all_reduce_sum(&mut b).await.map(|()| b)
    }))
    .await;
    let out: Vec<Vec<f32>> = out.into_iter().map(Result::unwrap).collect();
    let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out[0]), bits(&out[1]));
    assert_eq!(bits(&out[0]), bits(&out[2]));
    let inputs: Vec<Vec<f32>> = (0..w).map(data).collect();
    for (i, &got) in out[0].iter().enumerate() {
        let exact: f64 = inputs.iter().map(|x| x[i] as f64).sum();
        assert!((got as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()), "element {i}: {got} vs {exact}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_quorum_is_refused_locally_and_by_the_peer() {
    let o = opts(Transport::Tcp);
    let srv = servers(2, &o).await;
    let peers = addrs(&srv);
    // Rank 1's worker has moved on to quorum 6 (a ring of its own is enough to enter it).
    let _solo = Group::connect(&srv[1], GroupSpec { quorum_id: 6, rank: 0, peers: vec![peers[1].clone()] }).await.unwrap();
    let err = Group::connect(&srv[0], GroupSpec { quorum_id: 5, rank: 0, peers: peers.clone() }).await.err().unwrap();
    match &err {
        CommError::StaleQuorum { ours: 5, theirs: 6, peer, .. } => assert_eq!(peer.rank, Some(1)),
        other => panic!("expected a stale-quorum refusal, got {other}"),
    }
    assert!(err.to_string().contains(&peers[1]), "{err}");
    // And rank 1's own server refuses to go back to quorum 5.
    let err = Group::connect(&srv[1], GroupSpec { quorum_id: 5, rank: 1, peers }).await.err().unwrap();
    assert!(matches!(err, CommError::StaleQuorum { ours: 6, theirs: 5, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_dies_is_named_within_the_timeout() {
    let o = CommOptions { timeout: Duration::from_millis(800), ..opts(Transport::Tcp) };
    let mut srv = servers(3, &o).await;
    let peers = addrs(&srv);
    let mut groups = ring(&srv, 1).await;
    // Rank 2 dies: its group and server go away.
    drop(groups.pop());
    drop(srv.pop());
    let t = Instant::now();
    let mut buf = input(0, 103);
    let err = groups[0].all_reduce_sum(&mut buf).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(800) + Duration::from_millis(500), "took {:?}", t.elapsed());
    assert!(err.to_string().contains(&format!("rank 2 at {}", peers[2])), "{err}");
    // The group is broken from now on.
    let err = groups[0].all_gather(&[1.0]).await.unwrap_err();
    assert!(matches!(err, CommError::Broken { quorum_id: 1, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_out_with_its_name() {
    let o = CommOptions { timeout: Duration::from_millis(400), ..opts(Transport::Tcp) };
    let srv = servers(2, &o).await;
    let peers = addrs(&srv);
    let groups = ring(&srv, 1).await;
    // Rank 1 is alive but never calls the collective.
    let t = Instant::now();
    let mut buf = input(0, 103);
    let err = groups[0].all_reduce_sum(&mut buf).await.unwrap_err();
    let dt = t.elapsed();
    assert!(dt >= Duration::from_millis(400) && dt < Duration::from_millis(1500), "took {dt:?}");
    assert!(matches!(err, CommError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(&format!("rank 1 at {}", peers[1])), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_fails_connect_within_the_timeout() {
    let o = CommOptions { timeout: Duration::from_millis(500), ..opts(Transport::Tcp) };
    let srv = servers(1, &o).await;
    // A port that was free a moment ago: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let peers = vec![srv[0].local_addr().to_string(), dead.clone()];
    let t = Instant::now();
    let err = Group::connect(&srv[0], GroupSpec { quorum_id: 1, rank: 0, peers }).await.err().unwrap();
    assert!(t.elapsed() < Duration::from_millis(1500), "took {:?}", t.elapsed());
    assert!(err.to_string().contains(&format!("rank 1 at {dead}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_collectives_are_a_protocol_error_not_a_hang() {
    let o = opts(Transport::Tcp);
    let srv = servers(2, &o).await;
    let groups = ring(&srv, 1).await;
    let (a, b) = tokio::join!(
        async {
            let mut v = vec![1u8; 100];
            groups[0].broadcast(&mut v, 0).await
        },
        async {
            let mut v = vec![1f32; 100];
            groups[1].all_reduce_sum(&mut v).await
        }
    );
    let err = b.unwrap_err();
    assert!(matches!(err, CommError::Protocol { .. }), "{err}");
    // Rank 0's broadcast may have been fully buffered before rank 1 gave up; if not, it fails too.
    if let Err(e) = a {
        assert!(e.to_string().contains("rank 1"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_state_round_trip_and_refusals() {
    let token = CommOptions { token: Some("s3cret".into()), chunk_bytes: 1 << 20, max_chunk_bytes: 4 << 20, ..opts(Transport::Tcp) };
    let srv = PeerServer::bind("127.0.0.1:0".parse().unwrap(), token.clone()).await.unwrap();
    let addr = srv.local_addr().to_string();
    let err = fetch_state(&addr, &token).await.unwrap_err();
    assert!(err.to_string().contains("no state provider"), "{err}");
    // 3.5 MiB: several chunks and a partial one.
    let state: Vec<u8> = (0..(7usize << 19)).map(|i| (i % 253) as u8).collect();
    let served = Arc::new(state.clone());
    srv.set_state_provider(Arc::new(move || Ok(served.as_ref().clone())));
    assert_eq!(fetch_state(&addr, &token).await.unwrap(), state);
    // Without the token, or with another one, the server refuses.
    let err = fetch_state(&addr, &opts(Transport::Tcp)).await.unwrap_err();
    assert!(matches!(err, CommError::Refused { .. }) && err.to_string().contains("token"), "{err}");
    let wrong = CommOptions { token: Some("s3cres".into()), ..token.clone() };
    assert!(fetch_state(&addr, &wrong).await.is_err());
    // A provider's failure reaches the caller.
    srv.set_state_provider(Arc::new(|| Err("optimizer state not ready".into())));
    let err = fetch_state(&addr, &token).await.unwrap_err();
    assert!(err.to_string().contains("optimizer state not ready"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_travels_as_an_authorization_bearer_header() {
    use distclip_proto::v1::FetchStateRequest;
    use distclip_proto::v1::peer_client::PeerClient;
    let o = CommOptions { token: Some("s3cret".into()), ..opts(Transport::Tcp) };
    let srv = PeerServer::bind("127.0.0.1:0".parse().unwrap(), o).await.unwrap();
    srv.set_state_provider(Arc::new(|| Ok(vec![1, 2, 3])));
    let mut client = PeerClient::connect(format!("http://{}", srv.local_addr())).await.unwrap();
    let call = |key: &'static str, value: &'static str| {
        let mut req = tonic::Request::new(FetchStateRequest { quorum_id: 0 });
        req.metadata_mut().insert(key, value.parse().unwrap());
        req
    };
    // Exactly what a proxy or grpcurl sends (`-H 'authorization: Bearer s3cret'`) is accepted.
    let mut stream = client.fetch_state(call("authorization", "Bearer s3cret")).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().data, vec![1, 2, 3]);
    // The bare token, or the old private header, is refused, saying what to send.
    for (key, value) in [("authorization", "s3cret"), ("x-distclip-token", "s3cret")] {
        let status = client.fetch_state(call(key, value)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{key}: {value}");
        assert!(status.message().contains("authorization: Bearer"), "{}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_protects_data_channels() {
    let short = CommOptions { timeout: Duration::from_millis(700), ..opts(Transport::Tcp) };
    let with = CommOptions { token: Some("run-1".into()), ..short.clone() };
    let a = PeerServer::bind("127.0.0.1:0".parse().unwrap(), with.clone()).await.unwrap();
    let b = PeerServer::bind("127.0.0.1:0".parse().unwrap(), short).await.unwrap();
    let peers = vec![a.local_addr().to_string(), b.local_addr().to_string()];
    // b has no token, so its OpenChannel call to a is refused.
    let (ra, rb) = tokio::join!(
        Group::connect(&a, GroupSpec { quorum_id: 1, rank: 0, peers: peers.clone() }),
        Group::connect(&b, GroupSpec { quorum_id: 1, rank: 1, peers: peers.clone() })
    );
    let err = rb.err().unwrap();
    assert!(matches!(err, CommError::Refused { .. }) && err.to_string().contains("token"), "{err}");
    // a never gets b's channel and times out, naming b.
    let err = ra.err().unwrap();
    assert!(err.to_string().contains(&format!("rank 1 at {}", peers[1])), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_do_not_hurt_the_server() {
    use tokio::io::AsyncWriteExt;
    let o = opts(Transport::Tcp);
    let srv = servers(2, &o).await;
    // A data-channel hello with a forged ticket is refused with an abort frame.
    let mut s = tokio::net::TcpStream::connect(srv[0].local_addr()).await.unwrap();
    assert!(forged_hello_refusal(&mut s).await.contains("unknown or already used ticket"));
    // Bytes that are neither gRPC nor a hello.
    let mut s = tokio::net::TcpStream::connect(srv[0].local_addr()).await.unwrap();
    s.write_all(b"DCF1 this is not a header at all, just noise..........").await.unwrap();
    drop(s);
    // An oversized frame on an established channel is a protocol error for the receiver.
    let (mut w, r) = tcp_pair().await;
    let big = crate::wire::Header { kind: distclip_proto::v1::FrameKind::Data, len: 1 << 40, ..forged_hello() };
    w.write_all(&big.encode()).await.unwrap();
    let mut rx = crate::wire::Rx::Tcp(Box::new(r));
    assert!(rx.header(1 << 16).await.unwrap_err().contains("exceeds the limit"));
    // The servers still work.
    let groups = ring(&srv, 2).await;
    let out = join_all(groups.iter().map(|g| async move {
        let mut b = vec![g.rank() as f32 + 1.0; 40];
        g.all_reduce_sum(&mut b).await.map(|()| b)
    }))
    .await;
    for o in out {
        assert_eq!(o.unwrap(), vec![3.0; 40]);
    }
}

async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = tokio::join!(tokio::net::TcpStream::connect(l.local_addr().unwrap()), l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// A peer that stays connected but silent (a cut link) holds a collective until the timeout;
/// `Group::abort` from another task ends it at once, and the group stays broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_ends_a_collective_waiting_on_a_silent_peer() {
    let o = CommOptions { timeout: Duration::from_secs(30), ..opts(Transport::Tcp) };
    let srv = servers(2, &o).await;
    let groups: Vec<Arc<Group>> = ring(&srv, 1).await.into_iter().map(Arc::new).collect();
    // Rank 1 never joins the collective; rank 0 waits for its frames.
    let waiting = groups[0].clone();
    let t = Instant::now();
    let run = tokio::spawn(async move {
        let mut buf = input(0, 103);
        waiting.all_reduce_sum(&mut buf).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!run.is_finished(), "the collective ended without its peer");
    groups[0].abort("quorum 1 abandoned by the coordinator");
    let err = run.await.unwrap().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(matches!(&err, CommError::Broken { quorum_id: 1, cause } if cause.contains("abandoned")), "{err}");
    let err = groups[0].all_gather(&[1.0]).await.unwrap_err();
    assert!(matches!(err, CommError::Broken { quorum_id: 1, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_set_serving_without_a_token() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let o = CommOptions { token: Some("s3cret".into()), ..opts(Transport::Tcp) };
    let srv = PeerServer::bind("127.0.0.1:0".parse().unwrap(), o).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", srv.local_addr())).unwrap().connect().await.unwrap();
    let health = HealthClient::new(channel);
    let status = |service: &str| {
        let mut h = health.clone();
        let service = service.to_owned();
        async move { h.check(HealthCheckRequest { service }).await.unwrap().into_inner().status }
    };
    assert_eq!(status("").await, ServingStatus::NotServing as i32, "not in a quorum yet");
    assert_eq!(status(crate::LIVENESS_SERVICE).await, ServingStatus::Serving as i32, "alive all the same");
    srv.set_serving(true).await;
    assert_eq!(status("").await, ServingStatus::Serving as i32);
    assert_eq!(status("distclip.v1.Peer").await, ServingStatus::Serving as i32);
    srv.set_serving(false).await;
    assert_eq!(status("distclip.v1.Peer").await, ServingStatus::NotServing as i32);
    assert_eq!(status(crate::LIVENESS_SERVICE).await, ServingStatus::Serving as i32);
}
