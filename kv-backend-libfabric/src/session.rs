//! Sessions over `FI_MSG`: the `kv_core::auth` handshake a connecting backend (client)
//! runs with the backend it connected to (server), and the per-frame tags and sequence
//! numbers of the frames that follow (notifications, liveness checks of imported
//! registrations, revocations). Pure state machines: no libfabric calls; the caller
//! moves the frames.
//!
//! Without a cluster secret on both sides a session is opened by the HELLO alone and
//! carries the name the client claims. With one, nothing but the handshake is accepted
//! until the client proved the secret; afterwards every frame both ways carries a tag
//! under the session key and an increasing sequence number, and notifications are
//! named with the name the client proved.

use std::collections::HashMap;
use std::time::Instant;

use kv_core::auth::{
    self, ClientHandshake, ClientHello, ClusterSecret, ServerHandshake, ServerHello, ServerProof,
    SessionKey, TAG_LEN,
};
use kv_core::{Error, Result};

use crate::wire::{tag_input, Frame, Hello, Kind};

/// The channel name every MAC of this backend's handshake covers.
pub const PURPOSE: &[u8] = b"kv-backend-libfabric messages";

/// Most sessions peers may hold open with one backend (authenticated or not); a HELLO
/// beyond it is rejected. Each holds one address-vector entry and a few hundred bytes.
pub const MAX_SERVER_SESSIONS: usize = 1024;

/// An open session's key (if authenticated) and the frame numbers of both directions.
struct Keys {
    key: Option<SessionKey>,
    send_seq: u64,
    /// The last sequence number accepted from the other side.
    last_seq: Option<u64>,
}

impl Keys {
    fn new(key: Option<SessionKey>) -> Keys {
        Keys {
            key,
            send_seq: 0,
            last_seq: None,
        }
    }

    /// Sequence number and tag for the next frame this side sends.
    fn seal(&mut self, kind: Kind, hs: u64, body: &[u8]) -> (u64, [u8; TAG_LEN]) {
        let seq = self.send_seq;
        self.send_seq = self.send_seq.wrapping_add(1);
        let tag = match &self.key {
            Some(key) => key.tag(seq, &tag_input(kind, hs, body)),
            None => [0; TAG_LEN],
        };
        (seq, tag)
    }

    /// Accepts a frame from the other side: a sequence number above the last one and,
    /// when authenticated, a correct tag.
    fn accept(&mut self, f: &Frame<'_>) -> bool {
        if self.last_seq.is_some_and(|l| f.seq <= l) {
            return false; // replayed or reordered
        }
        if let Some(key) = &self.key {
            if key
                .verify(f.seq, &tag_input(f.kind, f.hs, f.body), &f.tag)
                .is_err()
            {
                return false;
            }
        }
        self.last_seq = Some(f.seq);
        true
    }
}

/// Where the client side of a session stands.
enum ClientState {
    /// HELLO sent; waiting for the challenge (or `Ready` when unauthenticated).
    Opening,
    /// Answer sent; waiting for the server's proof.
    Answering(ClientHandshake),
    /// Open.
    Open(Keys),
    /// Refused or failed; transfers and notifications to this peer fail with the error.
    Failed(Error),
}

/// The client side of the session this backend opens with a peer it connected to.
pub struct Client {
    /// Session id, random (64 bits from the OS): frames carry it.
    pub hs: u64,
    /// When the HELLO was queued (a stalled handshake is restarted by the caller).
    pub started: Instant,
    state: ClientState,
}

/// What the caller does after a server frame reached a client session.
#[derive(Debug)]
pub enum ClientStep {
    /// Nothing to do.
    Nothing,
    /// Send this frame (kind, body) to the server.
    Send(Kind, Vec<u8>),
    /// The session just opened.
    Opened,
    /// The server says registration `key` is gone.
    Revoke(u64),
    /// The server answered a check of registration `key`: live or not.
    Checked(u64, bool),
}

/// A `u64` key and an optional flag byte, as `Check`, `Checked` and `Revoke` carry them.
fn key_body(body: &[u8]) -> Option<(u64, Option<u8>)> {
    let k = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    match body.len() {
        8 => Some((k, None)),
        9 => Some((k, Some(body[8]))),
        _ => None,
    }
}

impl Client {
    /// A new session with a fresh random id.
    pub fn new() -> Result<Client> {
        Ok(Client {
            // 64 random bits: a session id cannot be guessed from another one.
            hs: auth::random_u128()? as u64,
            started: Instant::now(),
            state: ClientState::Opening,
        })
    }

    /// The HELLO body that opens the session.
    pub fn hello(secret: Option<&ClusterSecret>, address: &[u8], name: &str) -> Result<Vec<u8>> {
        Hello {
            authenticated: secret.is_some(),
            address: address.to_vec(),
            name: name.to_string(),
        }
        .encode()
    }

    /// True once frames other than the handshake may be sent.
    pub fn is_open(&self) -> bool {
        matches!(self.state, ClientState::Open(_))
    }

    /// The error the session failed with, if it did.
    pub fn failure(&self) -> Option<&Error> {
        match &self.state {
            ClientState::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Handles a frame the server sent on this session.
    pub fn on_frame(
        &mut self,
        secret: Option<&ClusterSecret>,
        name: &str,
        f: &Frame<'_>,
    ) -> ClientStep {
        match (f.kind, &mut self.state) {
            (Kind::Revoke | Kind::Checked, ClientState::Open(keys)) => {
                if !keys.accept(f) {
                    return ClientStep::Nothing;
                }
                match (f.kind, key_body(f.body)) {
                    (Kind::Revoke, Some((k, None))) => ClientStep::Revoke(k),
                    (Kind::Checked, Some((k, Some(live)))) => ClientStep::Checked(k, live == 1),
                    _ => ClientStep::Nothing,
                }
            }
            (Kind::Ready, ClientState::Opening) if secret.is_none() => {
                self.state = ClientState::Open(Keys::new(None));
                ClientStep::Opened
            }
            (Kind::ServerHello, ClientState::Opening) => {
                let Some(secret) = secret else {
                    return ClientStep::Nothing;
                };
                let answered = ServerHello::decode(f.body)
                    .and_then(|h| ClientHandshake::respond(secret, PURPOSE, name, &h));
                match answered {
                    Ok((hs, answer)) => {
                        self.state = ClientState::Answering(hs);
                        ClientStep::Send(Kind::ClientHello, answer.encode().to_vec())
                    }
                    Err(e) => {
                        self.state = ClientState::Failed(e);
                        ClientStep::Nothing
                    }
                }
            }
            (Kind::ServerProof, ClientState::Answering(_)) => {
                let ClientState::Answering(hs) =
                    std::mem::replace(&mut self.state, ClientState::Opening)
                else {
                    return ClientStep::Nothing;
                };
                match ServerProof::decode(f.body).and_then(|p| hs.finish(&p)) {
                    Ok(key) => {
                        self.state = ClientState::Open(Keys::new(Some(key)));
                        ClientStep::Opened
                    }
                    Err(e) => {
                        self.state = ClientState::Failed(e);
                        ClientStep::Nothing
                    }
                }
            }
            (Kind::Reject, ClientState::Opening | ClientState::Answering(_)) => {
                let why = String::from_utf8_lossy(f.body).into_owned();
                self.state = ClientState::Failed(Error::Unauthenticated(format!(
                    "the peer refused the session: {why}; both sides must use the same \
                     cluster secret (KVX_SECRET)"
                )));
                ClientStep::Nothing
            }
            _ => ClientStep::Nothing,
        }
    }

    /// Sequence number and tag for the next client → server frame `kind` with `body`;
    /// `None` while the session is not open.
    pub fn seal(&mut self, kind: Kind, body: &[u8]) -> Option<(u64, [u8; TAG_LEN])> {
        match &mut self.state {
            ClientState::Open(keys) => Some(keys.seal(kind, self.hs, body)),
            _ => None,
        }
    }
}

/// Where a server session stands.
enum ServerState {
    /// Challenge sent; waiting for the answer.
    Challenged(ServerHandshake),
    /// Open: frames are accepted, notifications named `name`.
    Open { name: String, keys: Keys },
}

/// A session a peer opened with this backend.
struct Server {
    /// The peer's address-vector entry.
    addr: u64,
    state: ServerState,
}

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// An endpoint name not in the address vector yet: insert it, and for a session
    /// call [`Servers::open`] with the entry.
    Address(Vec<u8>),
    /// An address-vector entry.
    Entry(u64),
}

/// What the caller does after a client frame reached the server sessions.
#[derive(Debug)]
pub enum ServerStep {
    /// Nothing to send.
    Nothing,
    /// Send `kind`/`body` (untagged: a handshake frame) on the session to `to`; `close`
    /// asks the caller to release the address-vector entry once it is sent.
    Reply {
        /// Destination.
        to: To,
        /// Frame kind.
        kind: Kind,
        /// Frame body.
        body: Vec<u8>,
        /// Release the entry after sending.
        close: bool,
    },
    /// A notification from the peer named here, accepted.
    Note(String),
    /// The peer asks whether registration `key` is live; answer with [`Servers::seal`].
    Check(u64, u64),
    /// The peer closed its session: release its address-vector entry.
    Close(u64),
}

/// The sessions peers opened with this backend, by session id. Bounded by
/// [`MAX_SERVER_SESSIONS`].
#[derive(Default)]
pub struct Servers {
    map: HashMap<u64, Server>,
    /// Sessions whose address is being inserted (between `on_frame` and `open`).
    pending: HashMap<u64, ServerState>,
}

impl Servers {
    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.map.len() + self.pending.len()
    }

    /// The open sessions: `(session id, address-vector entry)`.
    pub fn open_sessions(&self) -> Vec<(u64, u64)> {
        self.map
            .iter()
            .filter(|(_, s)| matches!(s.state, ServerState::Open { .. }))
            .map(|(hs, s)| (*hs, s.addr))
            .collect()
    }

    /// Address-vector entry, sequence number and tag for the next server → client
    /// frame on open session `hs`.
    pub fn seal(&mut self, hs: u64, kind: Kind, body: &[u8]) -> Option<(u64, u64, [u8; TAG_LEN])> {
        let s = self.map.get_mut(&hs)?;
        match &mut s.state {
            ServerState::Open { keys, .. } => {
                let (seq, tag) = keys.seal(kind, hs, body);
                Some((s.addr, seq, tag))
            }
            ServerState::Challenged(_) => None,
        }
    }

    /// Handles a client → server frame. `secret` is this backend's.
    pub fn on_frame(&mut self, secret: Option<&ClusterSecret>, f: &Frame<'_>) -> ServerStep {
        match f.kind {
            Kind::Hello => self.on_hello(secret, f),
            Kind::ClientHello => self.on_answer(f),
            Kind::Note | Kind::Check | Kind::Bye => {
                let Some(Server {
                    addr,
                    state: ServerState::Open { name, keys },
                }) = self.map.get_mut(&f.hs)
                else {
                    return ServerStep::Nothing;
                };
                if !keys.accept(f) {
                    return ServerStep::Nothing;
                }
                match (f.kind, key_body(f.body)) {
                    (Kind::Note, _) => ServerStep::Note(name.clone()),
                    (Kind::Check, Some((k, None))) => ServerStep::Check(f.hs, k),
                    (Kind::Bye, _) => {
                        let addr = *addr;
                        self.map.remove(&f.hs);
                        ServerStep::Close(addr)
                    }
                    _ => ServerStep::Nothing,
                }
            }
            _ => ServerStep::Nothing,
        }
    }

    fn on_hello(&mut self, secret: Option<&ClusterSecret>, f: &Frame<'_>) -> ServerStep {
        let Ok(hello) = Hello::decode(f.body) else {
            return ServerStep::Nothing;
        };
        if self.map.contains_key(&f.hs) || self.pending.contains_key(&f.hs) {
            return ServerStep::Nothing; // a duplicate (or a guess of a live session id)
        }
        let refuse = |why: String| ServerStep::Reply {
            to: To::Address(hello.address.clone()),
            kind: Kind::Reject,
            body: why.into_bytes(),
            close: true,
        };
        if self.len() >= MAX_SERVER_SESSIONS {
            return refuse(format!(
                "the peer holds {MAX_SERVER_SESSIONS} sessions already"
            ));
        }
        let (state, kind, body) = match (secret, hello.authenticated) {
            (Some(secret), true) => match ServerHandshake::start(secret, PURPOSE) {
                Ok((hs, challenge)) => (
                    ServerState::Challenged(hs),
                    Kind::ServerHello,
                    challenge.encode().to_vec(),
                ),
                Err(e) => return refuse(format!("{e}")),
            },
            (None, false) => (
                ServerState::Open {
                    name: hello.name.clone(),
                    keys: Keys::new(None),
                },
                Kind::Ready,
                Vec::new(),
            ),
            (Some(_), false) => {
                return refuse(
                    "this peer requires the cluster secret and the client has none".into(),
                )
            }
            (None, true) => {
                return refuse("this peer has no cluster secret; it cannot authenticate".into())
            }
        };
        self.pending.insert(f.hs, state);
        ServerStep::Reply {
            to: To::Address(hello.address),
            kind,
            body,
            close: false,
        }
    }

    fn on_answer(&mut self, f: &Frame<'_>) -> ServerStep {
        let Some(s) = self.map.get_mut(&f.hs) else {
            return ServerStep::Nothing;
        };
        if !matches!(s.state, ServerState::Challenged(_)) {
            return ServerStep::Nothing;
        }
        let placeholder = ServerState::Open {
            name: String::new(),
            keys: Keys::new(None),
        };
        let ServerState::Challenged(hs) = std::mem::replace(&mut s.state, placeholder) else {
            return ServerStep::Nothing;
        };
        match ClientHello::decode(f.body).and_then(|h| hs.finish(&h)) {
            Ok((proof, peer)) => {
                s.state = ServerState::Open {
                    name: peer.name,
                    keys: Keys::new(Some(peer.key)),
                };
                ServerStep::Reply {
                    to: To::Entry(s.addr),
                    kind: Kind::ServerProof,
                    body: proof.encode().to_vec(),
                    close: false,
                }
            }
            Err(e) => {
                let addr = s.addr;
                self.map.remove(&f.hs);
                tracing::warn!("libfabric: refused a peer's session: {e}");
                ServerStep::Reply {
                    to: To::Entry(addr),
                    kind: Kind::Reject,
                    body: format!("{e}").into_bytes(),
                    close: true,
                }
            }
        }
    }

    /// Records the address-vector entry of session `hs` after a [`To::Address`] reply
    /// that opened it.
    pub fn open(&mut self, hs: u64, addr: u64) {
        if let Some(state) = self.pending.remove(&hs) {
            self.map.insert(hs, Server { addr, state });
        }
    }

    /// Drops a session whose address could not be inserted.
    pub fn abort(&mut self, hs: u64) {
        self.pending.remove(&hs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_frame, encode_frame, MSG_BUF};

    /// Encodes and decodes a frame, as the wire would.
    fn via_wire(kind: Kind, hs: u64, seq: u64, tag: [u8; TAG_LEN], body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; MSG_BUF];
        let f = Frame {
            kind,
            hs,
            seq,
            tag,
            body,
        };
        let n = encode_frame(&mut buf, &f).unwrap();
        buf.truncate(n);
        buf
    }

    /// Runs HELLO → … → open between a client and a server; returns the server's
    /// address-vector entry for the session (7).
    fn open(
        client: &mut Client,
        servers: &mut Servers,
        cs: Option<&ClusterSecret>,
        ss: Option<&ClusterSecret>,
    ) -> Option<Error> {
        let hello = Client::hello(cs, b"addr", "decode-1").unwrap();
        let mut to_server = via_wire(Kind::Hello, client.hs, 0, [0; TAG_LEN], &hello);
        for _ in 0..4 {
            let f = decode_frame(&to_server).unwrap();
            let (kind, body) = match servers.on_frame(ss, &f) {
                ServerStep::Reply { to, kind, body, .. } => {
                    if to == To::Address(b"addr".to_vec()) {
                        servers.open(client.hs, 7);
                    }
                    (kind, body)
                }
                other => panic!("server: {other:?}"),
            };
            let back = via_wire(kind, client.hs, 0, [0; TAG_LEN], &body);
            match client.on_frame(cs, "decode-1", &decode_frame(&back).unwrap()) {
                ClientStep::Send(kind, body) => {
                    to_server = via_wire(kind, client.hs, 0, [0; TAG_LEN], &body)
                }
                ClientStep::Opened => return None,
                ClientStep::Nothing => return client.failure().cloned(),
                other => panic!("client: {other:?}"),
            }
        }
        panic!("the handshake did not end")
    }

    #[test]
    fn authenticated_session_names_and_tags_notes() {
        let secret = ClusterSecret::generate().unwrap();
        let (mut c, mut s) = (Client::new().unwrap(), Servers::default());
        assert!(open(&mut c, &mut s, Some(&secret), Some(&secret)).is_none());
        assert!(c.is_open());
        let (seq, tag) = c.seal(Kind::Note, b"layer 0").unwrap();
        let note = via_wire(Kind::Note, c.hs, seq, tag, b"layer 0");
        match s.on_frame(Some(&secret), &decode_frame(&note).unwrap()) {
            ServerStep::Note(name) => assert_eq!(name, "decode-1"),
            other => panic!("{other:?}"),
        }
        // Replayed: refused.
        assert!(matches!(
            s.on_frame(Some(&secret), &decode_frame(&note).unwrap()),
            ServerStep::Nothing
        ));
        // Forged tag (next sequence number, wrong tag): refused.
        let forged = via_wire(Kind::Note, c.hs, seq + 1, [1; TAG_LEN], b"layer 0");
        assert!(matches!(
            s.on_frame(Some(&secret), &decode_frame(&forged).unwrap()),
            ServerStep::Nothing
        ));
        // Server → client: a tagged revocation is accepted, an untagged one is not.
        let (addr, seq, tag) = s.seal(c.hs, Kind::Revoke, &5u64.to_le_bytes()).unwrap();
        assert_eq!(addr, 7);
        let untagged = via_wire(Kind::Revoke, c.hs, seq, [0; TAG_LEN], &5u64.to_le_bytes());
        assert!(matches!(
            c.on_frame(Some(&secret), "decode-1", &decode_frame(&untagged).unwrap()),
            ClientStep::Nothing
        ));
        let revoke = via_wire(Kind::Revoke, c.hs, seq, tag, &5u64.to_le_bytes());
        assert!(matches!(
            c.on_frame(Some(&secret), "decode-1", &decode_frame(&revoke).unwrap()),
            ClientStep::Revoke(5)
        ));
    }

    #[test]
    fn another_secret_or_none_is_refused() {
        let (a, b) = (
            ClusterSecret::generate().unwrap(),
            ClusterSecret::generate().unwrap(),
        );
        for (cs, ss) in [(Some(&a), Some(&b)), (None, Some(&b)), (Some(&a), None)] {
            let (mut c, mut s) = (Client::new().unwrap(), Servers::default());
            let e = open(&mut c, &mut s, cs, ss);
            assert!(matches!(e, Some(Error::Unauthenticated(_))), "{e:?}");
            assert!(!c.is_open());
            assert!(c.seal(Kind::Note, b"x").is_none());
            assert!(s.open_sessions().is_empty());
        }
    }

    #[test]
    fn unauthenticated_sessions_open_with_the_claimed_name() {
        let (mut c, mut s) = (Client::new().unwrap(), Servers::default());
        assert!(open(&mut c, &mut s, None, None).is_none());
        let (seq, tag) = c.seal(Kind::Check, &9u64.to_le_bytes()).unwrap();
        let check = via_wire(Kind::Check, c.hs, seq, tag, &9u64.to_le_bytes());
        assert!(matches!(
            s.on_frame(None, &decode_frame(&check).unwrap()),
            ServerStep::Check(_, 9)
        ));
        assert_eq!(s.open_sessions(), vec![(c.hs, 7)]);
    }

    #[test]
    fn sessions_are_bounded() {
        let mut s = Servers::default();
        let hello = Client::hello(None, b"addr", "x").unwrap();
        for hs in 0..MAX_SERVER_SESSIONS as u64 + 1 {
            let f = via_wire(Kind::Hello, hs, 0, [0; TAG_LEN], &hello);
            let step = s.on_frame(None, &decode_frame(&f).unwrap());
            if hs < MAX_SERVER_SESSIONS as u64 {
                s.open(hs, hs);
            } else {
                assert!(
                    matches!(
                        step,
                        ServerStep::Reply {
                            kind: Kind::Reject,
                            close: true,
                            ..
                        }
                    ),
                    "{step:?}"
                );
            }
        }
        assert_eq!(s.len(), MAX_SERVER_SESSIONS);
    }
}
