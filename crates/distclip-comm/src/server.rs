//! The per-process data-plane server: one TCP port that serves gRPC (`distclip.v1.Peer` and
//! `grpc.health.v1`) and accepts framed TCP data channels. In plaintext they are told apart by
//! their first four bytes; under TLS this server does the handshake itself and tells them apart
//! by the protocol the caller asked for in it (ALPN: `h2` or [`DATA_ALPN`]), then hands gRPC
//! connections, already decrypted, to tonic.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use distclip_proto::v1::peer_client::PeerClient;
use distclip_proto::v1::peer_server::{Peer, PeerServer as PeerService};
use distclip_proto::v1::{
    DType, FetchStateRequest, FrameKind, OpenChannelRequest, OpenChannelResponse, StateChunk, TensorChunk,
    TransferAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::wire::{HEADER_LEN, Header, MAGIC, Rx};
use crate::{CommError, CommOptions, PROTOCOL_VERSION, Transport};

/// A worker's state serialised on demand for a joining peer.
pub(crate) type StateProvider = Arc<dyn Fn() -> Result<Vec<u8>, String> + Send + Sync>;

/// Metadata key on a refusal that carries the server's current quorum id.
pub(crate) const QUORUM_METADATA_KEY: &str = "x-distclip-quorum";

/// The ALPN protocol of a framed TCP data channel under TLS (gRPC asks for `h2`).
pub(crate) const DATA_ALPN: &[u8] = b"distclip-dcf1";

/// HTTP/2 windows large enough that flow control does not throttle the gRPC transport.
const H2_STREAM_WINDOW: u32 = 8 << 20;
const H2_CONN_WINDOW: u32 = 16 << 20;

/// A data channel is identified by the quorum and the rank that sends on it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct ChannelKey {
    pub quorum_id: u64,
    pub from_rank: u32,
}

enum Slot {
    /// The local group is waiting for this channel.
    Waiting(tokio::sync::oneshot::Sender<Rx>),
    /// The peer connected before the local group asked for it.
    Ready(Rx),
}

struct State {
    /// Newest quorum this worker has entered; channels of older ones are refused.
    quorum_id: u64,
    /// This worker's rank in `quorum_id`, once it connected a group there.
    rank: Option<u32>,
    tickets: HashMap<u64, (ChannelKey, Transport)>,
    slots: HashMap<ChannelKey, Slot>,
    ticket_counter: u64,
}

pub(crate) struct Inner {
    pub opts: CommOptions,
    state: Mutex<State>,
    provider: RwLock<Option<StateProvider>>,
    random: RandomState,
}

/// The data-plane server of one worker process: serves collectives' channels to the worker's
/// groups and its state to joining peers. Dropping it stops serving.
pub struct PeerServer {
    pub(crate) inner: Arc<Inner>,
    local_addr: SocketAddr,
    health: tonic_health::server::HealthReporter,
    accept_task: tokio::task::JoinHandle<()>,
    grpc_task: tokio::task::JoinHandle<()>,
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.grpc_task.abort();
    }
}

impl PeerServer {
    /// Listen on `addr` (port 0 picks a free one; see [`PeerServer::local_addr`]). Must be called
    /// inside a Tokio runtime, which then runs the server.
    pub async fn bind(addr: SocketAddr, opts: CommOptions) -> Result<PeerServer, CommError> {
        opts.validate()?;
        if let Some(t) = &opts.token {
            distclip_proto::auth::bearer(t).map_err(|detail| CommError::InvalidOptions { detail })?;
        }
        let acceptor = match &opts.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(tls.rustls_server(&[b"h2", DATA_ALPN]).map_err(|e| {
                CommError::InvalidOptions { detail: format!("TLS settings refused: {e}") }
            })?)),
            None => None,
        };
        let builder = tonic::transport::Server::builder();
        let listener = TcpListener::bind(addr).await.map_err(|source| CommError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| CommError::Bind { addr, source })?;
        let inner = Arc::new(Inner {
            opts: opts.clone(),
            state: Mutex::new(State {
                quorum_id: 0,
                rank: None,
                tickets: HashMap::new(),
                slots: HashMap::new(),
                ticket_counter: 0,
            }),
            provider: RwLock::new(None),
            random: RandomState::new(),
        });
        let (grpc_tx, grpc_rx) = tokio::sync::mpsc::unbounded_channel::<Result<Conn, std::io::Error>>();
        let accept_task = tokio::spawn(accept_loop(listener, inner.clone(), acceptor, grpc_tx));
        let limit = opts.max_chunk_bytes + 4096;
        let service = PeerService::new(Service { inner: inner.clone() })
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(grpc_rx);
        // Unauthenticated, like any health check (Kubernetes' gRPC probes send no metadata);
        // it tells nothing but whether this worker is in a quorum.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<PeerService<Service>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        health.set_service_status(crate::LIVENESS_SERVICE, tonic_health::ServingStatus::Serving).await;
        let grpc_task = tokio::spawn(async move {
            let served = builder
                .initial_stream_window_size(Some(H2_STREAM_WINDOW))
                .initial_connection_window_size(Some(H2_CONN_WINDOW))
                .tcp_nodelay(true)
                .add_service(health_service)
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "peer gRPC server stopped");
            }
        });
        Ok(PeerServer { inner, local_addr, health, accept_task, grpc_task })
    }

    /// The address peers reach this server on (with the port chosen if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What `grpc.health.v1` answers, for the whole server (`""`) and `distclip.v1.Peer`:
    /// SERVING while the worker trains in a quorum, NOT_SERVING while it waits, heals or has
    /// finished (it starts NOT_SERVING).
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
        self.health.set_service_status("", status).await;
        self.health.set_service_status("distclip.v1.Peer", status).await;
    }

    /// Set (or replace) what `FetchState` serves: a callback that serialises this worker's
    /// parameters and optimizer state. It runs on a blocking thread, once per request.
    pub fn set_state_provider(&self, f: Arc<dyn Fn() -> Result<Vec<u8>, String> + Send + Sync>) {
        // A poisoned lock only means a writer panicked mid-assignment of an Option: the value
        // is still whole, so keep serving.
        *self.inner.provider.write().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enter quorum `quorum_id` as `rank`: channels of older quorums are dropped and refused
    /// from now on. Fails with the current id if this worker is already in a newer quorum.
    pub fn enter_quorum(&self, quorum_id: u64, rank: u32) -> Result<(), u64> {
        let mut st = self.state();
        if quorum_id < st.quorum_id {
            return Err(st.quorum_id);
        }
        if quorum_id > st.quorum_id {
            st.quorum_id = quorum_id;
            st.tickets.retain(|_, (k, _)| k.quorum_id >= quorum_id);
            st.slots.retain(|k, _| k.quorum_id >= quorum_id);
        }
        st.rank = Some(rank);
        Ok(())
    }

    /// The channel `key`, now if the peer already connected, or when it does.
    pub fn take_channel(&self, key: ChannelKey) -> tokio::sync::oneshot::Receiver<Rx> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut st = self.state();
        match st.slots.remove(&key) {
            Some(Slot::Ready(ch)) => {
                let _ = tx.send(ch);
            }
            _ => {
                st.slots.insert(key, Slot::Waiting(tx));
            }
        }
        rx
    }

    /// Forget a channel the local group stopped waiting for.
    pub fn cancel_channel(&self, key: ChannelKey) {
        let mut st = self.state();
        if matches!(st.slots.get(&key), Some(Slot::Waiting(_))) {
            st.slots.remove(&key);
        }
    }

    fn deliver(&self, key: ChannelKey, ch: Rx) {
        let mut st = self.state();
        if key.quorum_id < st.quorum_id {
            return; // dropped: the sender sees the channel close
        }
        match st.slots.remove(&key) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(ch);
            }
            _ => {
                st.slots.insert(key, Slot::Ready(ch));
            }
        }
    }

    fn check_token<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(want) = &self.opts.token else { return Ok(()) };
        distclip_proto::auth::check(req.metadata(), want).map_err(|refusal| {
            Status::unauthenticated(format!(
                "{}: send the run's token as `authorization: Bearer <token>` (start every worker with the run's token)",
                refusal.as_str()
            ))
        })
    }

    /// A refusal that tells the caller which quorum this worker is in.
    fn stale(&self, theirs: u64, ours: u64) -> Status {
        let mut s = Status::failed_precondition(format!("stale quorum: the request is for quorum {theirs}, this worker is in quorum {ours}"));
        if let Ok(v) = ours.to_string().parse() {
            s.metadata_mut().insert(QUORUM_METADATA_KEY, v);
        }
        s
    }

    fn redeem(&self, ticket: u64) -> Result<(ChannelKey, Transport), String> {
        let mut st = self.state();
        let (key, transport) = st.tickets.remove(&ticket).ok_or("unknown or already used ticket")?;
        if key.quorum_id < st.quorum_id {
            return Err(format!("stale quorum: channel for quorum {}, this worker is in quorum {}", key.quorum_id, st.quorum_id));
        }
        Ok((key, transport))
    }
}

async fn accept_loop(
    listener: TcpListener,
    inner: Arc<Inner>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    grpc_tx: tokio::sync::mpsc::UnboundedSender<Result<Conn, std::io::Error>>,
) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let (inner, grpc_tx, acceptor) = (inner.clone(), grpc_tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let _ = sock.set_nodelay(true);
                    match acceptor {
                        Some(acceptor) => tls_connection(sock, &inner, acceptor, grpc_tx).await,
                        None => match sniff(&sock, inner.opts.timeout).await {
                            Some(true) => data_channel(sock, &inner).await,
                            Some(false) => {
                                let _ = grpc_tx.send(Ok(Conn::Plain(sock)));
                            }
                            None => {}
                        },
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning on the error.
                tracing::warn!(error = %e, "accepting a peer connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The TLS handshake of a new connection, then the protocol it asked for: a data channel, or
/// gRPC for tonic. A failed or silent handshake just closes the connection.
async fn tls_connection(
    sock: TcpStream,
    inner: &Inner,
    acceptor: tokio_rustls::TlsAcceptor,
    grpc_tx: tokio::sync::mpsc::UnboundedSender<Result<Conn, std::io::Error>>,
) {
    let limit = inner.opts.tls.as_ref().map(|t| t.handshake_timeout()).unwrap_or(inner.opts.timeout);
    let stream = match tokio::time::timeout(limit, acceptor.accept(sock)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "a data-plane TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    if stream.get_ref().1.alpn_protocol() == Some(DATA_ALPN) {
        data_channel(stream, inner).await;
    } else {
        let _ = grpc_tx.send(Ok(Conn::Tls(Box::new(stream))));
    }
}

/// Whether a new connection is a data channel (`DCF1`) rather than gRPC; `None` if it closed or
/// stayed silent.
async fn sniff(sock: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut b = [0u8; 4];
    let peeked = tokio::time::timeout(timeout, async {
        loop {
            match sock.peek(&mut b).await {
                Ok(0) | Err(_) => return None,
                Ok(n) if n >= 4 => return Some(()),
                // Fewer than 4 bytes so far: peek returns at once, so give the rest a moment.
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    })
    .await;
    match peeked {
        Ok(Some(())) => Some(b == MAGIC),
        _ => None,
    }
}

/// Authenticate a TCP data channel (plaintext or TLS) by its hello frame, acknowledge it and
/// park it for the group.
async fn data_channel<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(mut sock: S, inner: &Inner) {
    let mut b = [0u8; HEADER_LEN];
    if tokio::time::timeout(inner.opts.timeout, sock.read_exact(&mut b)).await.map(|r| r.is_ok()) != Ok(true) {
        return;
    }
    let verdict = Header::decode(&b).and_then(|h| {
        if h.kind != FrameKind::Hello {
            return Err(format!("expected a hello frame, got {:?}", h.kind));
        }
        let (key, transport) = inner.redeem(h.aux)?;
        if transport != Transport::Tcp || key.quorum_id != h.quorum_id {
            return Err("ticket was issued for another channel".into());
        }
        Ok(key)
    });
    let (ack, msg) = match &verdict {
        Ok(_) => (FrameKind::Hello, Vec::new()),
        Err(e) => (FrameKind::Abort, e.clone().into_bytes()),
    };
    let head = Header { kind: ack, dtype: DType::U8, quorum_id: 0, op_seq: 0, step: 0, piece: 0, len: msg.len() as u64, aux: 0 };
    let mut out = head.encode().to_vec();
    out.extend_from_slice(&msg);
    if sock.write_all(&out).await.is_err() || sock.flush().await.is_err() {
        return;
    }
    if let Ok(key) = verdict {
        inner.deliver(key, Rx::Tcp(Box::new(sock)));
    }
}

/// A gRPC connection handed to tonic: as accepted, or decrypted by this server's TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

struct Service {
    inner: Arc<Inner>,
}

type StateStream = Pin<Box<dyn futures::Stream<Item = Result<StateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for Service {
    async fn open_channel(&self, req: Request<OpenChannelRequest>) -> Result<Response<OpenChannelResponse>, Status> {
        self.inner.check_token(&req)?;
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "data-plane protocol version {} is not supported (this worker speaks {PROTOCOL_VERSION}); run the same distclip version on every worker",
                r.protocol_version
            )));
        }
        let transport: Transport = r.transport.parse().map_err(Status::invalid_argument)?;
        let mut st = self.inner.state();
        if r.quorum_id < st.quorum_id {
            let ours = st.quorum_id;
            drop(st);
            return Err(self.inner.stale(r.quorum_id, ours));
        }
        if r.quorum_id == st.quorum_id
            && let Some(rank) = st.rank
            && rank != r.to_rank
        {
            return Err(Status::failed_precondition(format!(
                "rank mismatch: the caller expects rank {} but this worker is rank {rank} in quorum {}; peer lists disagree",
                r.to_rank, r.quorum_id
            )));
        }
        st.ticket_counter += 1;
        let mut h = self.inner.random.build_hasher();
        h.write_u64(st.ticket_counter);
        let ticket = h.finish();
        let key = ChannelKey { quorum_id: r.quorum_id, from_rank: r.from_rank };
        st.tickets.insert(ticket, (key, transport));
        Ok(Response::new(OpenChannelResponse { ticket, max_chunk_bytes: self.inner.opts.max_chunk_bytes as u64 }))
    }

    async fn transfer(&self, req: Request<Streaming<TensorChunk>>) -> Result<Response<TransferAck>, Status> {
        self.inner.check_token(&req)?;
        let mut stream = req.into_inner();
        let first = tokio::time::timeout(self.inner.opts.timeout, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello on the transfer stream"))??
            .ok_or_else(|| Status::invalid_argument("empty transfer stream"))?;
        if first.kind != FrameKind::Hello as i32 {
            return Err(Status::invalid_argument("a transfer stream must open with a hello chunk"));
        }
        let (key, transport) = self.inner.redeem(first.ticket_or_len).map_err(Status::failed_precondition)?;
        if transport != Transport::Grpc || key.quorum_id != first.quorum_id {
            return Err(Status::failed_precondition("ticket was issued for another channel"));
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        self.inner.deliver(key, Rx::Grpc { stream: Box::new(stream), pending: Vec::new(), _done: done_tx });
        // The stream now belongs to the group; the call ends when the group drops it.
        let _ = done_rx.await;
        Ok(Response::new(TransferAck {}))
    }

    type FetchStateStream = StateStream;

    async fn fetch_state(&self, req: Request<FetchStateRequest>) -> Result<Response<StateStream>, Status> {
        self.inner.check_token(&req)?;
        let quorum_id = req.into_inner().quorum_id;
        let ours = self.inner.state().quorum_id;
        if quorum_id != 0 && quorum_id < ours {
            return Err(self.inner.stale(quorum_id, ours));
        }
        let provider = self.inner.provider.read().unwrap_or_else(|e| e.into_inner()).clone();
        let provider = provider.ok_or_else(|| Status::unavailable("this worker has no state to serve yet (no state provider set)"))?;
        let bytes = tokio::task::spawn_blocking(move || provider())
            .await
            .map_err(|e| Status::internal(format!("state provider panicked: {e}")))?
            .map_err(|e| Status::internal(format!("state provider failed: {e}")))?;
        let bytes = Arc::new(bytes);
        let total = bytes.len() as u64;
        let chunk = self.inner.opts.chunk_bytes.max(1);
        // Always at least one chunk, so an empty state still tells the caller its size.
        let stream = futures::stream::unfold(Some(0usize), move |next| {
            let bytes = bytes.clone();
            async move {
                let offset = next?;
                let end = (offset + chunk).min(bytes.len());
                let more = (end < bytes.len()).then_some(end);
                let msg = StateChunk { total_bytes: total, offset: offset as u64, data: bytes[offset..end].to_vec() };
                Some((Ok(msg), more))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A gRPC client for the peer at `addr` with this crate's limits and windows.
pub(crate) async fn connect_client(addr: &str, opts: &CommOptions) -> Result<PeerClient<Channel>, String> {
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("bad peer address `{addr}`: {e}"))?
        .connect_timeout(opts.timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(H2_STREAM_WINDOW))
        .initial_connection_window_size(Some(H2_CONN_WINDOW));
    if let Some(tls) = &opts.tls {
        let host = endpoint.uri().host().unwrap_or_default().to_owned();
        endpoint = endpoint
            .tls_config(tls.client_config(&host))
            .map_err(|e| format!("TLS settings for `{addr}`: {}", distclip_proto::tls::error_chain(&e)))?;
    }
    let channel = endpoint.connect().await.map_err(|e| distclip_proto::tls::error_chain(&e))?;
    let limit = opts.max_chunk_bytes + 4096;
    Ok(PeerClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit))
}

/// A request carrying the run's token when one is configured.
pub(crate) fn request<T>(msg: T, opts: &CommOptions) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = &opts.token
        && let Ok(v) = distclip_proto::auth::bearer(t)
    {
        req.metadata_mut().insert(distclip_proto::auth::HEADER, v);
    }
    req
}

/// The quorum id a refusal reports, if it is a stale-quorum refusal.
pub(crate) fn stale_quorum_of(status: &Status) -> Option<u64> {
    status.metadata().get(QUORUM_METADATA_KEY)?.to_str().ok()?.parse().ok()
}
