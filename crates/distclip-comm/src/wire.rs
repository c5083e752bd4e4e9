//! Frames on a data channel and the two transports that carry them: a plain TCP stream, or a
//! gRPC `Transfer` client stream of `TensorChunk` messages. The layout is documented in
//! `proto/distclip/v1/peer.proto`.

use distclip_proto::v1::{DType, FrameKind, TensorChunk};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// The TCP frames and the f32 payloads are little-endian on the wire and copied to and from
// sockets without conversion, which is only right on little-endian hosts.
#[cfg(target_endian = "big")]
compile_error!("distclip-comm sends f32 tensors in native byte order; add byte swapping for big-endian hosts");

/// "DCF1" read as a little-endian u32: the first four bytes of a TCP data channel.
pub(crate) const MAGIC: [u8; 4] = *b"DCF1";
pub(crate) const HEADER_LEN: usize = 48;

/// One frame header (the payload follows it on TCP, or sits in the same message on gRPC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: FrameKind,
    pub dtype: DType,
    pub quorum_id: u64,
    pub op_seq: u64,
    pub step: u32,
    pub piece: u32,
    /// Payload length in bytes.
    pub len: u64,
    /// Hello: the ticket. Length frames: the announced total. Otherwise 0.
    pub aux: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as i32 as u8;
        b[5] = self.dtype as i32 as u8;
        b[8..16].copy_from_slice(&self.quorum_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.op_seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.step.to_le_bytes());
        b[28..32].copy_from_slice(&self.piece.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.aux.to_le_bytes());
        b
    }

    /// Parse a header; anything malformed is an error message, never a panic.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        if b[0..4] != MAGIC {
            return Err(format!("bad frame magic {:02x?} (not a distclip data channel)", &b[0..4]));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(a)
        };
        let kind = FrameKind::try_from(b[4] as i32).map_err(|_| format!("unknown frame kind {}", b[4]))?;
        let dtype = DType::try_from(b[5] as i32).map_err(|_| format!("unknown dtype {}", b[5]))?;
        Ok(Header {
            kind,
            dtype,
            quorum_id: u64_at(8),
            op_seq: u64_at(16),
            step: u32_at(24),
            piece: u32_at(28),
            len: u64_at(32),
            aux: u64_at(40),
        })
    }

    fn from_chunk(c: &TensorChunk) -> Result<Header, String> {
        Ok(Header {
            kind: FrameKind::try_from(c.kind).map_err(|_| format!("unknown frame kind {}", c.kind))?,
            dtype: DType::try_from(c.dtype).map_err(|_| format!("unknown dtype {}", c.dtype))?,
            quorum_id: c.quorum_id,
            op_seq: c.op_seq,
            step: c.step,
            piece: c.piece,
            len: c.data.len() as u64,
            aux: c.ticket_or_len,
        })
    }

    pub fn to_chunk(self, data: Vec<u8>) -> TensorChunk {
        TensorChunk {
            quorum_id: self.quorum_id,
            op_seq: self.op_seq,
            step: self.step,
            piece: self.piece,
            dtype: self.dtype as i32,
            kind: self.kind as i32,
            ticket_or_len: self.aux,
            data,
        }
    }
}

/// The sending end of a data channel (to the right neighbour).
pub(crate) enum Tx {
    /// A framed TCP channel, plaintext or TLS.
    Tcp(Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
    Grpc {
        tx: tokio::sync::mpsc::Sender<TensorChunk>,
        /// The `Transfer` call; its status explains a closed channel.
        call: tokio::task::JoinHandle<Result<(), tonic::Status>>,
    },
}

impl Tx {
    /// Send one frame. Errors are messages for the caller to wrap with the peer's name.
    pub async fn send(&mut self, h: Header, payload: &[u8]) -> Result<(), String> {
        debug_assert_eq!(h.len, payload.len() as u64);
        match self {
            Tx::Tcp(s) => {
                let head = h.encode();
                // One vectored write usually carries header and payload together; finish
                // whatever it left.
                let slices = [std::io::IoSlice::new(&head), std::io::IoSlice::new(payload)];
                let mut n = s.write_vectored(&slices).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed".into());
                }
                if n < HEADER_LEN {
                    s.write_all(&head[n..]).await.map_err(|e| e.to_string())?;
                    n = HEADER_LEN;
                }
                s.write_all(&payload[n - HEADER_LEN..]).await.map_err(|e| e.to_string())?;
                // TLS holds encrypted records until flushed (plaintext TCP: a no-op).
                s.flush().await.map_err(|e| e.to_string())?;
                Ok(())
            }
            Tx::Grpc { tx, call } => {
                if tx.send(h.to_chunk(payload.to_vec())).await.is_err() {
                    // The call ended: report its status rather than a bare "closed".
                    let detail = if call.is_finished() {
                        match call.await {
                            Ok(Err(status)) => format!("transfer stream ended: {}", status.message()),
                            Ok(Ok(())) => "transfer stream ended".into(),
                            Err(e) => format!("transfer task failed: {e}"),
                        }
                    } else {
                        "transfer stream closed".into()
                    };
                    return Err(detail);
                }
                Ok(())
            }
        }
    }
}

/// The receiving end of a data channel (from the left neighbour).
pub(crate) enum Rx {
    /// A TCP data channel; any byte stream, so that untrusted bytes can be replayed through the
    /// very same parsing ([`parse_untrusted`]).
    Tcp(Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    Grpc {
        // Boxed: the gRPC stream is far larger than a TcpStream.
        stream: Box<tonic::Streaming<TensorChunk>>,
        /// Payload of the chunk whose header was returned last.
        pending: Vec<u8>,
        /// Dropped with the receiver, which ends the server's `Transfer` handler.
        _done: tokio::sync::oneshot::Sender<()>,
    },
}

impl Rx {
    /// Read the next header. The caller checks it before reading its payload.
    pub async fn header(&mut self, max_len: usize) -> Result<Header, String> {
        let h = match self {
            Rx::Tcp(s) => {
                let mut b = [0u8; HEADER_LEN];
                s.read_exact(&mut b).await.map_err(|e| closed_or(e, "reading a frame header"))?;
                Header::decode(&b)?
            }
            Rx::Grpc { stream, pending, .. } => {
                let chunk = stream
                    .message()
                    .await
                    .map_err(|s| format!("transfer stream failed: {}", s.message()))?
                    .ok_or_else(|| "connection closed by the peer".to_string())?;
                let h = Header::from_chunk(&chunk)?;
                *pending = chunk.data;
                h
            }
        };
        if h.len > max_len as u64 {
            return Err(format!("frame of {} bytes exceeds the limit of {max_len}", h.len));
        }
        if h.kind == FrameKind::Abort {
            let mut msg = vec![0u8; h.len as usize];
            self.payload(&mut msg).await?;
            return Err(format!("the peer aborted: {}", String::from_utf8_lossy(&msg)));
        }
        Ok(h)
    }

    /// Read the payload of the last header into `dst`, whose length the caller checked.
    pub async fn payload(&mut self, dst: &mut [u8]) -> Result<(), String> {
        match self {
            Rx::Tcp(s) => {
                s.read_exact(dst).await.map_err(|e| closed_or(e, "reading a frame payload"))?;
            }
            Rx::Grpc { pending, .. } => {
                if pending.len() != dst.len() {
                    return Err(format!("chunk holds {} bytes, expected {}", pending.len(), dst.len()));
                }
                dst.copy_from_slice(pending);
            }
        }
        Ok(())
    }
}

/// Parse untrusted `bytes` every way the data plane parses what a peer sends: as a TCP data
/// channel (frame after frame: header, its checks, payload, until the bytes run out or a frame
/// is refused) and as one gRPC `TensorChunk`. Returns the frames the channel accepted. The
/// entry point of the fuzz target `fuzz/fuzz_targets/frames.rs` and of a randomised unit
/// test: whatever the bytes, it must not panic, allocate more than `max_len` per frame, or
/// read without consuming.
#[doc(hidden)]
pub fn parse_untrusted(bytes: &[u8], max_len: usize) -> usize {
    use prost::Message;
    if let Ok(chunk) = TensorChunk::decode(bytes)
        && let Ok(h) = Header::from_chunk(&chunk)
    {
        // What Rx::header does with a chunk's header.
        let _ = h.len <= max_len as u64;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return 0;
    };
    rt.block_on(async {
        let mut rx = Rx::Tcp(Box::new(std::io::Cursor::new(bytes.to_vec())));
        let mut frames = 0;
        while let Ok(h) = rx.header(max_len).await {
            // Rx::header refused anything longer than max_len.
            let mut payload = vec![0u8; h.len as usize];
            if rx.payload(&mut payload).await.is_err() {
                break;
            }
            frames += 1;
        }
        frames
    })
}

fn closed_or(e: std::io::Error, what: &str) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "connection closed by the peer".into()
    } else {
        format!("{what}: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects_garbage() {
        let h = Header {
            kind: FrameKind::Data,
            dtype: DType::F32,
            quorum_id: 7,
            op_seq: 42,
            step: 3,
            piece: 9,
            len: 1 << 20,
            aux: u64::MAX,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Header::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = h.encode();
        bad[4] = 200;
        assert!(Header::decode(&bad).unwrap_err().contains("frame kind"));
        let mut bad = h.encode();
        bad[5] = 99;
        assert!(Header::decode(&bad).unwrap_err().contains("dtype"));
    }

    fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let h = Header { kind, dtype: DType::U8, quorum_id: 1, op_seq: 1, step: 0, piece: 0, len: payload.len() as u64, aux: 0 };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// A valid channel's bytes, then seeded corruptions of them (flipped bytes, cuts, huge
    /// lengths, noise): [`parse_untrusted`] accepts the valid frames and refuses the rest
    /// without a panic. The fuzz target (fuzz/) drives the same function with generated input.
    #[test]
    fn untrusted_frames_are_accepted_or_refused_never_a_panic() {
        let mut stream = frame(FrameKind::Data, &[1, 2, 3]);
        stream.extend(frame(FrameKind::Data, &[]));
        stream.extend(frame(FrameKind::Length, &[9; 100]));
        assert_eq!(parse_untrusted(&stream, 1 << 16), 3);
        // An abort frame ends the channel (its payload is the peer's message).
        let mut aborted = frame(FrameKind::Data, &[1]);
        aborted.extend(frame(FrameKind::Abort, b"bye"));
        aborted.extend(frame(FrameKind::Data, &[2]));
        assert_eq!(parse_untrusted(&aborted, 1 << 16), 1);
        // Over the limit: refused before its payload is allocated or read.
        assert_eq!(parse_untrusted(&frame(FrameKind::Data, &[0; 64]), 63), 0);

        let mut state = 7u64;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut accepted = [0usize; 4];
        for i in 0..4000 {
            let mut b = stream.clone();
            match i % 4 {
                0 => {
                    let at = next() as usize % b.len();
                    b[at] ^= (next() as u8) | 1;
                }
                1 => b.truncate(next() as usize % b.len()),
                // The length field of the first frame: anything from 0 to u64::MAX.
                2 => b[32..40].copy_from_slice(&(next() >> (next() % 64)).to_le_bytes()),
                _ => b = (0..next() % 300).map(|_| next() as u8).collect(),
            }
            let n = parse_untrusted(&b, 1 << 16);
            assert!(n <= 3, "case {i}: {n} frames from a corrupted 3-frame stream");
            accepted[i % 4] += n;
        }
        // The corruptions are not all fatal: some streams keep frames, so the loop ran.
        assert!(accepted[0] > 0 && accepted[1] > 0, "{accepted:?}");
    }
}
