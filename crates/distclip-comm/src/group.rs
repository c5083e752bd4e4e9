//! The ring of one quorum and its collectives.
//!
//! Rank `r` sends to its right neighbour `r + 1` and receives from its left neighbour `r - 1`
//! (mod W) on one data channel each way. A buffer of `n` elements is cut into W blocks
//! ([`block_range`]) and each block into pieces of `chunk_bytes`; the ring moves one block per
//! step, piece by piece, so that a piece is forwarded as soon as it has been received and added,
//! while later pieces are still on the wire.
//!
//! Sum order, and why ranks agree bit for bit: in the reduce-scatter phase block `b` is summed
//! once, along the ring, ending at rank `b`; the all-gather phase then copies that one result to
//! every rank. No rank adds the same block in a different order.

use std::ops::Range;

use distclip_proto::v1::{DType, FrameKind, OpenChannelRequest, TensorChunk};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use crate::server::{ChannelKey, DATA_ALPN, connect_client, request, stale_quorum_of};
use crate::wire::{HEADER_LEN, Header, Rx, Tx};
use crate::{CommError, CommOptions, PROTOCOL_VERSION, PeerId, PeerServer, Transport};

/// The membership of the ring: which quorum, this worker's rank, and every member's data-plane
/// address (`host:port` of its [`PeerServer`]) in rank order.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// The quorum id from the coordinator; every message of the group carries it.
    pub quorum_id: u64,
    /// This worker's rank: `peers[rank]` is its own address.
    pub rank: usize,
    /// Data-plane addresses in rank order.
    pub peers: Vec<String>,
}

/// The block of `n` elements that rank `rank` of `world` owns in [`Group::reduce_scatter_sum`]
/// (and in the ring algorithms): the first `n % world` ranks get `n / world + 1` elements, the
/// others `n / world`, in rank order. A rank's block is empty when `n < world` and
/// `rank >= n`.
pub fn block_range(n: usize, world: usize, rank: usize) -> Range<usize> {
    let (base, rem) = (n / world, n % world);
    let start = rank * base + rank.min(rem);
    start..start + base + usize::from(rank < rem)
}

/// The ring of one quorum. Every rank must call the same collectives in the same order with
/// matching arguments; the sequence numbers on the wire check it. After any error the group is
/// broken for good (its channels are closed, so the neighbours fail too) and a new quorum must
/// connect a new group.
pub struct Group {
    quorum_id: u64,
    rank: usize,
    peers: Vec<String>,
    opts: CommOptions,
    links: tokio::sync::Mutex<Links>,
    /// Set by [`Group::abort`]: why the group's collectives stop now.
    abort: tokio::sync::watch::Sender<Option<String>>,
}

/// How a bounded wait of a collective ended.
enum Bounded<T> {
    Done(T),
    TimedOut,
    Aborted(String),
}

struct Links {
    tx: Option<Tx>,
    rx: Option<Rx>,
    op_seq: u64,
    broken: Option<String>,
}

/// What a running collective needs to label frames and errors.
struct Op {
    name: String,
    seq: u64,
}

impl Group {
    /// Join the ring of `spec.quorum_id`: open a data channel to the right neighbour and wait
    /// for the left one's, both within the server's timeout. Peers may start in any order; a
    /// peer that is not listening yet is retried until the timeout. A world of one needs no
    /// network.
    pub async fn connect(server: &PeerServer, spec: GroupSpec) -> Result<Group, CommError> {
        let opts = server.inner.opts.clone();
        let w = spec.peers.len();
        if w == 0 || spec.rank >= w || w > u32::MAX as usize {
            return Err(CommError::InvalidOptions {
                detail: format!("rank {} is not within the {} peer addresses of quorum {}", spec.rank, w, spec.quorum_id),
            });
        }
        let me = PeerId { rank: Some(spec.rank), addr: spec.peers[spec.rank].clone() };
        let op = format!("connect to quorum {}", spec.quorum_id);
        server.inner.enter_quorum(spec.quorum_id, spec.rank as u32).map_err(|current| CommError::StaleQuorum {
            op: op.clone(),
            peer: me,
            ours: current,
            theirs: spec.quorum_id,
        })?;
        let mut links = Links { tx: None, rx: None, op_seq: 0, broken: None };
        if w > 1 {
            let left = (spec.rank + w - 1) % w;
            let right = (spec.rank + 1) % w;
            let key = ChannelKey { quorum_id: spec.quorum_id, from_rank: left as u32 };
            let incoming = server.inner.take_channel(key);
            let deadline = Instant::now() + opts.timeout;
            let left_peer = PeerId { rank: Some(left), addr: spec.peers[left].clone() };
            let accept = async {
                match timeout_at(deadline, incoming).await {
                    Ok(Ok(rx)) => Ok(rx),
                    Ok(Err(_)) => Err(CommError::StaleQuorum {
                        op: op.clone(),
                        peer: left_peer.clone(),
                        ours: spec.quorum_id,
                        theirs: spec.quorum_id + 1,
                    }),
                    Err(_) => Err(CommError::Timeout {
                        op: op.clone(),
                        peer: left_peer.clone(),
                        what: "its data channel to this worker".into(),
                        timeout: opts.timeout,
                    }),
                }
            };
            let result = tokio::try_join!(open_tx(&spec, right, &opts, deadline, &op), accept);
            match result {
                Ok((tx, rx)) => {
                    links.tx = Some(tx);
                    links.rx = Some(rx);
                }
                Err(e) => {
                    server.inner.cancel_channel(key);
                    return Err(e);
                }
            }
        }
        Ok(Group {
            quorum_id: spec.quorum_id,
            rank: spec.rank,
            peers: spec.peers,
            opts,
            links: tokio::sync::Mutex::new(links),
            abort: tokio::sync::watch::Sender::new(None),
        })
    }

    /// Stop the group from another task: the collective running now, and every later one,
    /// fails with [`CommError::Broken`] naming `cause`. For a peer that went silent without
    /// closing its connection (a cut link), which would otherwise hold the others until the
    /// timeout; the coordinator tells the workers when it gave up on the quorum.
    pub fn abort(&self, cause: &str) {
        self.abort.send_replace(Some(cause.to_owned()));
    }

    /// Await `fut` within the group's timeout, unless the group is aborted first.
    async fn bounded<F: std::future::Future>(&self, fut: F) -> Bounded<F::Output> {
        let mut aborted = self.abort.subscribe();
        if let Some(cause) = aborted.borrow_and_update().clone() {
            return Bounded::Aborted(cause);
        }
        tokio::select! {
            r = timeout(self.opts.timeout, fut) => match r {
                Ok(v) => Bounded::Done(v),
                Err(_) => Bounded::TimedOut,
            },
            _ = aborted.changed() => Bounded::Aborted(aborted.borrow().clone().unwrap_or_default()),
        }
    }

    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the ring.
    pub fn world_size(&self) -> usize {
        self.peers.len()
    }

    /// The quorum this ring belongs to.
    pub fn quorum_id(&self) -> u64 {
        self.quorum_id
    }

    /// Concatenation of every rank's `local` in rank order. Every rank passes the same length.
    pub async fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let w = self.world_size();
        let n = local.len();
        let mut out = vec![0f32; n * w];
        out[self.rank * n..(self.rank + 1) * n].copy_from_slice(local);
        let (mut links, op) = self.begin("all_gather").await?;
        let result = self.ring(&mut links, &op, &mut out, false, true).await;
        self.finish(&mut links, result)?;
        Ok(out)
    }

    /// Sum `buf` over all ranks, in place; the result is bit-identical on every rank. Ring
    /// algorithm: reduce-scatter then all-gather, chunked and pipelined; every rank sends and
    /// receives `2 (W-1)/W · 4 n` bytes. Every rank passes the same length.
    pub async fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let (mut links, op) = self.begin("all_reduce_sum").await?;
        let result = self.ring(&mut links, &op, buf, true, true).await;
        self.finish(&mut links, result)
    }

    /// Sum `buf` over all ranks and return this rank's block of the sum: elements
    /// [`block_range`]`(buf.len(), W, rank)` (the first `n % W` ranks hold one element more).
    /// Every rank passes the same length.
    pub async fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>, CommError> {
        let mut work = buf.to_vec();
        let (mut links, op) = self.begin("reduce_scatter_sum").await?;
        let result = self.ring(&mut links, &op, &mut work, true, false).await;
        self.finish(&mut links, result)?;
        Ok(work[block_range(buf.len(), self.world_size(), self.rank)].to_vec())
    }

    /// Copy `root`'s `buf` to every rank (other ranks' contents are replaced; lengths may
    /// differ). Pipelined along the ring from the root.
    pub async fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        if root >= self.world_size() {
            return Err(CommError::InvalidArgument {
                op: "broadcast".into(),
                detail: format!("root {root} is not a rank of this group of {}", self.world_size()),
            });
        }
        let (mut links, op) = self.begin("broadcast").await?;
        let result = self.broadcast_ring(&mut links, &op, buf, root).await;
        self.finish(&mut links, result)
    }

    /// Start a collective under the group's lock: refuse it on a broken group, and number it.
    async fn begin(&self, name: &str) -> Result<(tokio::sync::MutexGuard<'_, Links>, Op), CommError> {
        let mut links = self.links.lock().await;
        if let Some(cause) = &links.broken {
            return Err(CommError::Broken { quorum_id: self.quorum_id, cause: cause.clone() });
        }
        links.op_seq += 1;
        let op = Op { name: format!("{name} #{} (quorum {})", links.op_seq, self.quorum_id), seq: links.op_seq };
        Ok((links, op))
    }

    /// End a collective: a failure breaks the group and closes its channels, so the neighbours
    /// fail fast instead of waiting for their timeout.
    fn finish(&self, links: &mut Links, result: Result<(), CommError>) -> Result<(), CommError> {
        if let Err(e) = &result {
            tracing::warn!(error = %e, "collective failed; closing the group's channels");
            links.broken = Some(e.to_string());
            links.tx = None;
            links.rx = None;
        }
        result
    }

    fn peer(&self, rank: usize) -> PeerId {
        PeerId { rank: Some(rank), addr: self.peers[rank].clone() }
    }

    fn left(&self) -> PeerId {
        self.peer((self.rank + self.world_size() - 1) % self.world_size())
    }

    fn right(&self) -> PeerId {
        self.peer((self.rank + 1) % self.world_size())
    }

    async fn send(&self, tx: &mut Tx, op: &Op, h: Header, payload: &[u8]) -> Result<(), CommError> {
        match self.bounded(tx.send(h, payload)).await {
            Bounded::Done(Ok(())) => Ok(()),
            Bounded::Done(Err(detail)) => Err(CommError::Connection { op: op.name.clone(), peer: self.right(), detail }),
            Bounded::Aborted(cause) => Err(CommError::Broken { quorum_id: self.quorum_id, cause }),
            Bounded::TimedOut => Err(CommError::Timeout {
                op: op.name.clone(),
                peer: self.right(),
                what: format!("taking step {} piece {}", h.step, h.piece),
                timeout: self.opts.timeout,
            }),
        }
    }

    /// The next header from the left neighbour, checked against what this op expects.
    async fn recv_header(&self, rx: &mut Rx, op: &Op, kind: FrameKind, dtype: DType, step: u32, piece: u32) -> Result<Header, CommError> {
        let what = || format!("step {step} piece {piece}");
        let h = match self.bounded(rx.header(self.opts.max_chunk_bytes)).await {
            Bounded::Done(Ok(h)) => h,
            Bounded::Aborted(cause) => return Err(CommError::Broken { quorum_id: self.quorum_id, cause }),
            Bounded::Done(Err(detail)) => {
                return Err(if detail.starts_with("the peer aborted") {
                    CommError::Refused { op: op.name.clone(), peer: self.left(), detail }
                } else if detail.contains("exceeds the limit") || detail.contains("unknown") || detail.contains("magic") {
                    CommError::Protocol { op: op.name.clone(), peer: self.left(), detail }
                } else {
                    CommError::Connection { op: op.name.clone(), peer: self.left(), detail }
                });
            }
            Bounded::TimedOut => {
                return Err(CommError::Timeout { op: op.name.clone(), peer: self.left(), what: what(), timeout: self.opts.timeout });
            }
        };
        if h.quorum_id != self.quorum_id {
            return Err(CommError::StaleQuorum { op: op.name.clone(), peer: self.left(), ours: self.quorum_id, theirs: h.quorum_id });
        }
        let bad = |detail: String| Err(CommError::Protocol { op: op.name.clone(), peer: self.left(), detail });
        if h.op_seq != op.seq {
            return bad(format!(
                "frame of op #{} while this rank runs op #{}: ranks must call the same collectives in the same order",
                h.op_seq, op.seq
            ));
        }
        if h.kind != kind || h.dtype != dtype || h.step != step || h.piece != piece {
            return bad(format!(
                "got {:?} {:?} step {} piece {}, expected {kind:?} {dtype:?} {}: ranks called different collectives or lengths",
                h.kind,
                h.dtype,
                h.step,
                h.piece,
                what()
            ));
        }
        Ok(h)
    }

    async fn recv_payload(&self, rx: &mut Rx, op: &Op, dst: &mut [u8]) -> Result<(), CommError> {
        match self.bounded(rx.payload(dst)).await {
            Bounded::Done(Ok(())) => Ok(()),
            Bounded::Done(Err(detail)) => Err(CommError::Connection { op: op.name.clone(), peer: self.left(), detail }),
            Bounded::Aborted(cause) => Err(CommError::Broken { quorum_id: self.quorum_id, cause }),
            Bounded::TimedOut => Err(CommError::Timeout {
                op: op.name.clone(),
                peer: self.left(),
                what: "the rest of a frame".into(),
                timeout: self.opts.timeout,
            }),
        }
    }

    /// Ring reduce-scatter (`rs`) and/or all-gather (`ag`) over `buf`, in place.
    ///
    /// Step numbering: reduce-scatter step t sends block r-1-t and receives block r-2-t, adding
    /// it to the local one, so that after W-1 steps rank r holds the full sum of block r.
    /// All-gather step t sends block r-t and stores the received block r-1-t. The block received
    /// at one step is the block sent at the next, so each piece goes from receiver to sender
    /// through a channel as soon as it is ready; the sender hands it back after sending since the
    /// receiver writes the same block again in a later step.
    async fn ring(&self, links: &mut Links, op: &Op, buf: &mut [f32], rs: bool, ag: bool) -> Result<(), CommError> {
        let w = self.world_size();
        if w == 1 {
            return Ok(());
        }
        let (r, n, pe) = (self.rank as isize, buf.len(), self.opts.piece_elems());
        let m = |x: isize| x.rem_euclid(w as isize) as usize;
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        if rs {
            for t in 0..w as isize - 1 {
                sends.push(m(r - 1 - t));
                recvs.push((m(r - 2 - t), true));
            }
        }
        if ag {
            for t in 0..w as isize - 1 {
                sends.push(m(r - t));
                recvs.push((m(r - 1 - t), false));
            }
        }
        let steps = sends.len();
        // Every piece of every block as its own `&mut`, so pieces can move between the sender
        // and the receiver without copies or locks.
        let mut table: Vec<Vec<Option<&mut [f32]>>> = Vec::with_capacity(w);
        let mut rest = buf;
        for b in 0..w {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(block_range(n, w, b).len());
            rest = tail;
            table.push(head.chunks_mut(pe).map(Some).collect());
        }
        let counts: Vec<usize> = table.iter().map(Vec::len).collect();
        let first: Vec<&mut [f32]> = table[sends[0]].iter_mut().filter_map(Option::take).collect();
        let (Some(tx), Some(rx)) = (links.tx.as_mut(), links.rx.as_mut()) else {
            return Err(CommError::Broken { quorum_id: self.quorum_id, cause: "channels closed".into() });
        };
        let (fwd_tx, mut fwd_rx) = tokio::sync::mpsc::unbounded_channel::<&mut [f32]>();
        let (ret_tx, mut ret_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, usize, &mut [f32])>();
        let lost = || CommError::Broken { quorum_id: self.quorum_id, cause: "internal: ring pipeline lost a piece".into() };

        let sender = async {
            let mut first = first.into_iter();
            for (s, &blk) in sends.iter().enumerate() {
                for k in 0..counts[blk] {
                    let piece = if s == 0 { first.next() } else { fwd_rx.recv().await };
                    let piece = piece.ok_or_else(lost)?;
                    let h = Header {
                        kind: FrameKind::Data,
                        dtype: DType::F32,
                        quorum_id: self.quorum_id,
                        op_seq: op.seq,
                        step: s as u32,
                        piece: k as u32,
                        len: (piece.len() * 4) as u64,
                        aux: 0,
                    };
                    self.send(tx, op, h, bytemuck::cast_slice(piece)).await?;
                    let _ = ret_tx.send((blk, k, piece));
                }
            }
            Ok::<(), CommError>(())
        };
        let receiver = async {
            let mut scratch = vec![0f32; pe.min(n)];
            for (s, &(blk, reduce)) in recvs.iter().enumerate() {
                for k in 0..counts[blk] {
                    let piece = loop {
                        if let Some(p) = table[blk][k].take() {
                            break p;
                        }
                        let (b, i, p) = ret_rx.recv().await.ok_or_else(lost)?;
                        table[b][i] = Some(p);
                    };
                    let h = self.recv_header(rx, op, FrameKind::Data, DType::F32, s as u32, k as u32).await?;
                    if h.len != (piece.len() * 4) as u64 {
                        return Err(CommError::Protocol {
                            op: op.name.clone(),
                            peer: self.left(),
                            detail: format!(
                                "piece of {} bytes where {} were expected: ranks passed buffers of different lengths",
                                h.len,
                                piece.len() * 4
                            ),
                        });
                    }
                    if reduce {
                        let inc = &mut scratch[..piece.len()];
                        self.recv_payload(rx, op, bytemuck::cast_slice_mut(inc)).await?;
                        for (a, b) in piece.iter_mut().zip(inc.iter()) {
                            *a += *b;
                        }
                    } else {
                        self.recv_payload(rx, op, bytemuck::cast_slice_mut(piece)).await?;
                    }
                    if s + 1 < steps {
                        fwd_tx.send(piece).map_err(|_| lost())?;
                    }
                }
            }
            Ok::<(), CommError>(())
        };
        tokio::try_join!(sender, receiver)?;
        Ok(())
    }

    async fn broadcast_ring(&self, links: &mut Links, op: &Op, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        let w = self.world_size();
        if w == 1 {
            return Ok(());
        }
        let (Some(tx), Some(rx)) = (links.tx.as_mut(), links.rx.as_mut()) else {
            return Err(CommError::Broken { quorum_id: self.quorum_id, cause: "channels closed".into() });
        };
        let forward = (self.rank + 1) % w != root;
        let header = |kind, piece: usize, len: usize, aux: u64| Header {
            kind,
            dtype: DType::U8,
            quorum_id: self.quorum_id,
            op_seq: op.seq,
            step: 0,
            piece: piece as u32,
            len: len as u64,
            aux,
        };
        if self.rank == root {
            self.send(tx, op, header(FrameKind::Length, 0, 0, buf.len() as u64), &[]).await?;
            for (k, chunk) in buf.chunks(self.opts.chunk_bytes).enumerate() {
                self.send(tx, op, header(FrameKind::Data, k, chunk.len(), 0), chunk).await?;
            }
            return Ok(());
        }
        let h = self.recv_header(rx, op, FrameKind::Length, DType::U8, 0, 0).await?;
        let total = h.aux;
        if forward {
            self.send(tx, op, h, &[]).await?;
        }
        buf.clear();
        // Grow with the data rather than trusting the announced size with one allocation.
        buf.reserve(total.min(1 << 28) as usize);
        let mut k = 0;
        while (buf.len() as u64) < total {
            let h = self.recv_header(rx, op, FrameKind::Data, DType::U8, 0, k as u32).await?;
            if h.len == 0 || buf.len() as u64 + h.len > total {
                return Err(CommError::Protocol {
                    op: op.name.clone(),
                    peer: self.left(),
                    detail: format!("piece of {} bytes does not fit the announced {total} (have {})", h.len, buf.len()),
                });
            }
            let start = buf.len();
            buf.resize(start + h.len as usize, 0);
            self.recv_payload(rx, op, &mut buf[start..]).await?;
            if forward {
                self.send(tx, op, h, &buf[start..]).await?;
            }
            k += 1;
        }
        Ok(())
    }
}

/// Present the ticket on a new framed TCP channel and wait for the receiver's acknowledgement;
/// the stream then only sends.
async fn say_hello<S>(mut s: S, hello: &Header) -> Result<Box<dyn AsyncWrite + Send + Unpin>, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    s.write_all(&hello.encode()).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut ack = [0u8; HEADER_LEN];
    s.read_exact(&mut ack).await.map_err(|e| format!("no answer to the hello: {e}"))?;
    let h = Header::decode(&ack)?;
    if h.kind != FrameKind::Hello {
        let mut msg = vec![0u8; h.len.min(4096) as usize];
        let _ = s.read_exact(&mut msg).await;
        return Err(format!("channel refused: {}", String::from_utf8_lossy(&msg)));
    }
    Ok(Box::new(s))
}

/// Open the data channel to the right neighbour: `OpenChannel` over gRPC for a ticket, then the
/// chosen transport. A peer that is not listening yet is retried until `deadline`.
async fn open_tx(spec: &GroupSpec, right: usize, opts: &CommOptions, deadline: Instant, op: &str) -> Result<Tx, CommError> {
    let addr = &spec.peers[right];
    let peer = PeerId { rank: Some(right), addr: addr.clone() };
    let timed_out = |what: &str| CommError::Timeout { op: op.into(), peer: peer.clone(), what: what.into(), timeout: opts.timeout };
    let req = OpenChannelRequest {
        quorum_id: spec.quorum_id,
        from_rank: spec.rank as u32,
        to_rank: right as u32,
        world_size: spec.peers.len() as u32,
        protocol_version: PROTOCOL_VERSION,
        transport: opts.transport.as_str().into(),
    };
    let mut backoff = std::time::Duration::from_millis(5);
    let mut last_err = String::new();
    let (mut client, ticket) = loop {
        if Instant::now() >= deadline {
            return Err(timed_out(&format!("opening a data channel; last error: {last_err}")));
        }
        let attempt = async {
            let mut client = connect_client(addr, opts).await.map_err(Err)?;
            match client.open_channel(request(req.clone(), opts)).await {
                Ok(resp) => Ok((client, resp.into_inner().ticket)),
                Err(s) if s.code() == tonic::Code::Unavailable => Err(Err(s.message().to_string())),
                Err(s) => Err(Ok(s)),
            }
        };
        match timeout_at(deadline, attempt).await {
            Ok(Ok(v)) => break v,
            // Not listening yet, or going away: retry until the deadline.
            Ok(Err(Err(e))) => last_err = e,
            Ok(Err(Ok(status))) => {
                return Err(match stale_quorum_of(&status) {
                    Some(theirs) => CommError::StaleQuorum { op: op.into(), peer, ours: spec.quorum_id, theirs },
                    None => CommError::Refused { op: op.into(), peer, detail: format!("{:?}: {}", status.code(), status.message()) },
                });
            }
            Err(_) => return Err(timed_out("opening a data channel")),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_millis(200));
    };
    let hello = Header {
        kind: FrameKind::Hello,
        dtype: DType::U8,
        quorum_id: spec.quorum_id,
        op_seq: 0,
        step: 0,
        piece: 0,
        len: 0,
        aux: ticket,
    };
    match opts.transport {
        Transport::Tcp => {
            let conn = async {
                let s = TcpStream::connect(addr.as_str()).await.map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                match &opts.tls {
                    None => say_hello(s, &hello).await,
                    Some(tls) => {
                        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                        let name = tls.server_name_for(host)?;
                        let connector = tokio_rustls::TlsConnector::from(tls.rustls_client(&[DATA_ALPN])?);
                        let s = tokio::time::timeout(tls.handshake_timeout(), connector.connect(name, s))
                            .await
                            .map_err(|_| "the TLS handshake timed out".to_string())?
                            .map_err(|e| format!("TLS handshake: {}", distclip_proto::tls::error_chain(&e)))?;
                        say_hello(s, &hello).await
                    }
                }
            };
            match timeout_at(deadline, conn).await {
                Ok(Ok(s)) => Ok(Tx::Tcp(s)),
                Ok(Err(detail)) => Err(CommError::Connection { op: op.into(), peer, detail }),
                Err(_) => Err(timed_out("accepting the data channel")),
            }
        }
        Transport::Grpc => {
            // A small queue: enough to keep HTTP/2 busy, little memory held in copies.
            let (tx, rx) = tokio::sync::mpsc::channel::<TensorChunk>(4);
            let _ = tx.send(hello.to_chunk(Vec::new())).await;
            let call_opts = opts.clone();
            let call = tokio::spawn(async move {
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                client.transfer(request(stream, &call_opts)).await.map(|_| ())
            });
            Ok(Tx::Grpc { tx, call })
        }
    }
}
