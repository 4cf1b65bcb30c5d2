//! A connection after its handshake: the [`wire::Preamble`], the cluster-secret
//! handshake of `kv_core::auth` (purpose per channel), HELLO, and framed I/O in which
//! every frame's header and body carry a tag with the frame's sequence number in that
//! direction (see `wire` for the layout). Without a secret on both sides (the
//! `insecure` opt-out) the same frames go untagged.

use std::sync::atomic::{AtomicU64, Ordering};

use kv_core::auth::{
    self, ClientHandshake, ClientHello, ClusterSecret, ServerHandshake, ServerHello, ServerProof,
    SessionKey,
};
use kv_core::{Error, Result};
use parking_lot::Mutex;

use crate::sys::{iovec, Stream, Watch};
use crate::wire::{
    self, Answer, ChannelKind, ErrorCode, FrameOp, Header, Preamble, HEADER_LEN, PREAMBLE_LEN,
    TAG_LEN,
};

/// A connected, handshaken stream. `Send + Sync`: writers are serialised (the send
/// sequence number lives under the write lock); one thread reads.
#[derive(Debug)]
pub(crate) struct Channel {
    stream: Stream,
    key: Option<SessionKey>,
    /// Serialises writers and holds the next send sequence number.
    wlock: Mutex<u64>,
    /// The next receive sequence number (one reader per channel).
    recv: AtomicU64,
}

/// What the server learned from a client's handshake.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// The channel the client opened.
    pub kind: ChannelKind,
    /// The client's agent name (authenticated with the secret, when there is one).
    pub name: String,
    /// Its HELLO.
    pub hello: Header,
}

impl Channel {
    /// A channel over `stream` as if its handshake had happened (unit tests).
    #[cfg(test)]
    pub(crate) fn for_test(stream: Stream) -> Channel {
        Channel::new(stream, None)
    }

    fn new(stream: Stream, key: Option<SessionKey>) -> Channel {
        Channel {
            stream,
            key,
            wlock: Mutex::new(0),
            recv: AtomicU64::new(0),
        }
    }

    /// Shuts both directions down, waking any thread blocked on it.
    pub(crate) fn shutdown(&self) {
        self.stream.shutdown();
    }

    /// True when the peer closed or reset the connection (does not block).
    pub(crate) fn peer_closed(&self) -> bool {
        self.stream.peer_closed()
    }

    /// Sends one frame: header, `body` ([`wire::body_len`] bytes), tag.
    pub(crate) fn send(&self, h: &Header, body: &[u8], w: &mut Watch<'_>) -> Result<()> {
        let head = wire::encode_header(h);
        let mut seq = self.wlock.lock();
        let tag = self.tag(*seq, &head, body);
        let mut iov = [
            iovec(head.as_ptr() as usize as u64, HEADER_LEN as u64),
            iovec(body.as_ptr() as usize as u64, body.len() as u64),
            iovec(tag.as_ptr() as usize as u64, self.tag_len()),
        ];
        // SAFETY: the iovecs describe `head`, `body` and `tag`, borrowed for the call.
        unsafe { self.stream.send_all(&mut iov, w)? };
        *seq += 1;
        Ok(())
    }

    /// Sends a frame whose header and body are already encoded in `head`, then the bulk
    /// payload: `iov[0]` and `iov[1]` are overwritten with `head` and its tag, the rest
    /// of `iov` is the payload (the iovecs are consumed).
    ///
    /// # Safety
    ///
    /// `iov[2..]` must describe memory valid for reads for the duration of the call.
    pub(crate) unsafe fn send_parts(
        &self,
        head: &[u8],
        iov: &mut [libc::iovec],
        w: &mut Watch<'_>,
    ) -> Result<()> {
        let mut seq = self.wlock.lock();
        let tag = self.tag(*seq, head, &[]);
        iov[0] = iovec(head.as_ptr() as usize as u64, head.len() as u64);
        iov[1] = iovec(tag.as_ptr() as usize as u64, self.tag_len());
        // SAFETY: `head` and `tag` are borrowed for the call; the rest is the caller's
        // promise.
        unsafe { self.stream.send_all(iov, w)? };
        *seq += 1;
        Ok(())
    }

    fn tag_len(&self) -> u64 {
        if self.key.is_some() {
            TAG_LEN as u64
        } else {
            0
        }
    }

    fn tag(&self, seq: u64, head: &[u8], body: &[u8]) -> [u8; TAG_LEN] {
        match &self.key {
            None => [0; TAG_LEN],
            Some(k) if body.is_empty() => k.tag(seq, head),
            Some(k) => {
                let mut all = Vec::with_capacity(head.len() + body.len());
                all.extend_from_slice(head);
                all.extend_from_slice(body);
                k.tag(seq, &all)
            }
        }
    }

    /// Receives a frame's header into `raw` (cleared first) and decodes it.
    pub(crate) fn recv_header(&self, raw: &mut Vec<u8>, w: &mut Watch<'_>) -> Result<Header> {
        raw.clear();
        raw.resize(HEADER_LEN, 0);
        self.stream.recv_exact(raw, w)?;
        wire::decode_header(raw)
    }

    /// Receives the body and tag of `h` (whose header is in `raw`), appending the body
    /// to `raw`, and checks the tag over both. A wrong tag is `Unauthenticated`.
    pub(crate) fn recv_rest(&self, h: &Header, raw: &mut Vec<u8>, w: &mut Watch<'_>) -> Result<()> {
        let n = wire::body_len(h);
        raw.resize(HEADER_LEN + n, 0);
        self.stream.recv_exact(&mut raw[HEADER_LEN..], w)?;
        if let Some(k) = &self.key {
            let mut tag = [0u8; TAG_LEN];
            self.stream.recv_exact(&mut tag, w)?;
            let seq = self.recv.fetch_add(1, Ordering::Relaxed);
            k.verify(seq, raw, &tag)?;
        }
        Ok(())
    }

    /// [`Channel::recv_header`] then [`Channel::recv_rest`].
    pub(crate) fn recv_frame(&self, raw: &mut Vec<u8>, w: &mut Watch<'_>) -> Result<Header> {
        let h = self.recv_header(raw, w)?;
        self.recv_rest(&h, raw, w)?;
        Ok(h)
    }

    /// Receives bulk payload bytes straight into the iovecs.
    ///
    /// # Safety
    ///
    /// As [`Stream::recv_all`]: the iovecs must describe memory valid for writes that
    /// nothing else accesses meanwhile.
    pub(crate) unsafe fn recv_payload(
        &self,
        iov: &mut [libc::iovec],
        w: &mut Watch<'_>,
    ) -> Result<()> {
        // SAFETY: the caller's promise.
        unsafe { self.stream.recv_all(iov, w) }
    }

    /// Receives and drops `buf.len()` payload bytes (a refused WRITE).
    pub(crate) fn recv_exact(&self, buf: &mut [u8], w: &mut Watch<'_>) -> Result<()> {
        self.stream.recv_exact(buf, w)
    }
}

/// Reads one length-prefixed handshake message.
fn recv_auth(s: &Stream, w: &mut Watch<'_>) -> Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    s.recv_exact(&mut prefix, w)?;
    let n = auth::message_len(prefix)?;
    let mut m = vec![0u8; n];
    m[..4].copy_from_slice(&prefix);
    s.recv_exact(&mut m[4..], w)?;
    Ok(m)
}

fn mismatch(peer_auth: bool) -> Error {
    Error::Unauthenticated(if peer_auth {
        "the peer authenticates with a cluster secret but this backend has none (set \
         AgentOptions.secret / KVX_SECRET on both sides)"
            .into()
    } else {
        "the peer has no cluster secret but this backend requires one (set \
         AgentOptions.secret / KVX_SECRET on both sides, or insecure=true on both)"
            .into()
    })
}

/// Client side: preamble, handshake (with `secret`), then HELLO `hello` with `name` as
/// its body. Returns the channel once a HELLO_ACK arrived (the caller checks its
/// instance), or the target's refusal.
pub(crate) fn connect(
    stream: Stream,
    kind: ChannelKind,
    secret: Option<&ClusterSecret>,
    name: &str,
    hello: &Header,
    w: &mut Watch<'_>,
) -> Result<(Channel, Header)> {
    let p = wire::encode_preamble(&Preamble {
        kind,
        auth: secret.is_some(),
    });
    stream.send_bytes(&[&p], w)?;
    let mut a = [0u8; PREAMBLE_LEN];
    stream.recv_exact(&mut a, w)?;
    let answer: Answer = wire::decode_answer(&a)?;
    if !answer.ok || answer.auth != secret.is_some() {
        return Err(mismatch(answer.auth));
    }
    let key = match secret {
        None => None,
        Some(secret) => {
            let hello = ServerHello::decode(&recv_auth(&stream, w)?)?;
            let (hs, answer) = ClientHandshake::respond(secret, kind.purpose(), name, &hello)?;
            stream.send_bytes(&[&answer.encode()], w)?;
            // A server that does not accept our proof closes without a word.
            let proof = match recv_auth(&stream, w) {
                Err(Error::RemoteDisconnected { reason, .. }) => {
                    return Err(Error::Unauthenticated(format!(
                        "the peer closed the connection during authentication ({reason}): \
                         do both sides use the same cluster secret (KVX_SECRET)?"
                    )))
                }
                r => ServerProof::decode(&r?)?,
            };
            Some(hs.finish(&proof)?)
        }
    };
    let ch = Channel::new(stream, key);
    let h = Header {
        len: name.len() as u64,
        ..*hello
    };
    ch.send(&h, name.as_bytes(), w)?;
    let mut raw = Vec::new();
    let r = ch.recv_frame(&mut raw, w)?;
    match r.op {
        FrameOp::HelloAck => Ok((ch, r)),
        FrameOp::Error => {
            let msg = String::from_utf8_lossy(&raw[HEADER_LEN..]).into_owned();
            Err(match r.status {
                s if s == ErrorCode::Unauthenticated as u32 => {
                    Error::Unauthenticated(format!("refused by the target: {msg}"))
                }
                _ => Error::RemoteDisconnected {
                    peer: w.peer.to_string(),
                    reason: format!("handshake refused: {msg}"),
                },
            })
        }
        op => Err(Error::invalid_metadata(format!(
            "{op:?} frame in answer to HELLO"
        ))),
    }
}

/// Server side: reads the preamble, authenticates the client with `secret` (refusing a
/// client whose idea of authentication differs), and reads its HELLO. The caller
/// answers HELLO_ACK (or ERROR) with [`Channel::send`].
pub(crate) fn accept(
    stream: Stream,
    secret: Option<&ClusterSecret>,
    w: &mut Watch<'_>,
) -> Result<(Channel, Accepted)> {
    let mut p = [0u8; PREAMBLE_LEN];
    stream.recv_exact(&mut p, w)?;
    let p = wire::decode_preamble(&p)?;
    let ok = p.auth == secret.is_some();
    let a = wire::encode_answer(&Answer {
        auth: secret.is_some(),
        ok,
    });
    stream.send_bytes(&[&a], w)?;
    if !ok {
        return Err(mismatch(p.auth));
    }
    let (key, authed) = match secret {
        None => (None, None),
        Some(secret) => {
            let (hs, hello) = ServerHandshake::start(secret, p.kind.purpose())?;
            stream.send_bytes(&[&hello.encode()], w)?;
            let answer = ClientHello::decode(&recv_auth(&stream, w)?)?;
            let (proof, peer) = hs.finish(&answer)?;
            stream.send_bytes(&[&proof.encode()], w)?;
            (Some(peer.key), Some(peer.name))
        }
    };
    let ch = Channel::new(stream, key);
    let mut raw = Vec::new();
    let h = ch.recv_frame(&mut raw, w)?;
    if h.op != FrameOp::Hello {
        return Err(Error::invalid_metadata(format!(
            "first frame is {:?}, not Hello",
            h.op
        )));
    }
    let name = String::from_utf8(raw[HEADER_LEN..].to_vec())
        .map_err(|_| Error::invalid_metadata("peer name is not UTF-8"))?;
    if authed.as_ref().is_some_and(|a| *a != name) {
        return Err(Error::Unauthenticated(format!(
            "HELLO names {name:?}, the handshake authenticated another name"
        )));
    }
    Ok((
        ch,
        Accepted {
            kind: p.kind,
            name,
            hello: h,
        },
    ))
}
