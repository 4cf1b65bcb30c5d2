//! Authentication of our own active messages (no UCX calls here).
//!
//! UCX 1.13 authenticates nothing: any process that can reach the worker's transports
//! can connect to it. What this backend controls is its own messages, so every
//! endpoint runs `kv_core::auth`'s mutual challenge–response over active messages
//! (client = the side that called `connect`), and afterwards every operation, answer
//! and notification carries a sequence number and a tag (truncated HMAC-SHA256 under
//! the session key) over its header (and a notification's payload). The target serves
//! an operation only when its tag verifies under a session it created and its sequence
//! number was not seen before ([`Window`]); the client takes an answer only under the
//! same rules. Without a cluster secret (`BackendInit::secret` is `None`) nothing is
//! tagged and a target without a secret serves untagged operations only.
//!
//! State is bounded: at most [`MAX_SESSIONS`] sessions (least recently used evicted,
//! which only a secret holder can cause) and [`MAX_HANDSHAKES`] handshakes in progress
//! (oldest evicted; an unauthenticated peer can delay other handshakes, not forge one).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kv_core::auth::{ClientHandshake, ServerHandshake, SessionKey, TAG_LEN};
use kv_core::{Error, Result};

use crate::wire::split_tag;

/// The `purpose` of the handshake and of session keys (a transcript of another kvx
/// channel cannot be replayed here).
pub const PURPOSE: &[u8] = b"kv-backend-ucx operations v1";
/// Sessions a target keeps.
pub const MAX_SESSIONS: usize = 4096;
/// Handshakes a target keeps in progress.
pub const MAX_HANDSHAKES: usize = 256;
/// How long a handshake may stay in progress.
pub const HANDSHAKE_TTL: Duration = Duration::from_secs(30);
/// Sequence numbers accepted behind the highest seen (reordering across lanes).
const WINDOW: u64 = 1024;

/// Which sequence numbers of one direction of a session were seen: each is accepted
/// once, and only within [`WINDOW`] of the highest.
#[derive(Debug, Default)]
pub struct Window {
    top: Option<u64>,
    bits: [u64; (WINDOW / 64) as usize],
}

impl Window {
    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = (seq % WINDOW) as usize;
        (&mut self.bits[i / 64], 1u64 << (i % 64))
    }

    /// True (and recorded) when `seq` was not seen and is not too old.
    pub fn accept(&mut self, seq: u64) -> bool {
        match self.top {
            Some(top) if seq <= top => {
                if top - seq >= WINDOW {
                    return false;
                }
                let (w, m) = self.bit(seq);
                if *w & m != 0 {
                    return false;
                }
                *w |= m;
                true
            }
            top => {
                // Clear the slots between the old top and `seq` (all of them when the
                // jump is a whole window or more).
                let from = top.map_or(0, |t| t + 1);
                if seq - from >= WINDOW {
                    self.bits = [0; (WINDOW / 64) as usize];
                } else {
                    for s in from..seq {
                        let (w, m) = self.bit(s);
                        *w &= !m;
                    }
                }
                let (w, m) = self.bit(seq);
                *w |= m;
                self.top = Some(seq);
                true
            }
        }
    }
}

/// One direction pair of an established session: the key, our next sequence number
/// and the window of the peer's.
pub struct Keyed {
    key: SessionKey,
    tx: u64,
    rx: Window,
}

impl Keyed {
    /// A fresh session under `key`.
    pub fn new(key: SessionKey) -> Keyed {
        Keyed {
            key,
            tx: 0,
            rx: Window::default(),
        }
    }

    /// Takes our next sequence number.
    pub fn next_seq(&mut self) -> u64 {
        let s = self.tx;
        self.tx = self.tx.wrapping_add(1);
        s
    }

    /// Writes the tag of message `seq` (`msg`, whose last [`TAG_LEN`] bytes are the
    /// tag's place, followed on the wire by `extra`) into place.
    pub fn seal(&self, seq: u64, msg: &mut [u8], extra: &[u8]) {
        let Some(n) = msg.len().checked_sub(TAG_LEN) else {
            return;
        };
        let tag = if extra.is_empty() {
            self.key.tag(seq, &msg[..n])
        } else {
            let mut all = Vec::with_capacity(n + extra.len());
            all.extend_from_slice(&msg[..n]);
            all.extend_from_slice(extra);
            self.key.tag(seq, &all)
        };
        msg[n..].copy_from_slice(&tag);
    }

    /// Checks the tag of a received message `msg` (tag last) with `extra` after it,
    /// then that `seq` is new; `Unauthenticated` otherwise.
    pub fn open(&mut self, seq: u64, msg: &[u8], extra: &[u8]) -> Result<()> {
        let (body, tag) =
            split_tag(msg).ok_or_else(|| Error::Unauthenticated("message too short".into()))?;
        if extra.is_empty() {
            self.key.verify(seq, body, tag)?;
        } else {
            let mut all = Vec::with_capacity(body.len() + extra.len());
            all.extend_from_slice(body);
            all.extend_from_slice(extra);
            self.key.verify(seq, &all, tag)?;
        }
        if !self.rx.accept(seq) {
            return Err(Error::Unauthenticated(format!(
                "message {seq} replayed or too old"
            )));
        }
        Ok(())
    }
}

/// The client side of an endpoint's authentication.
pub enum Client {
    /// No cluster secret: nothing is authenticated.
    Open,
    /// `Hello` sent; waiting for the challenge (then `hs` is the half-done handshake).
    Waiting(Option<ClientHandshake>),
    /// The session is established.
    Ready {
        /// The target's id for it.
        session: u64,
        /// Key and sequence numbers.
        keyed: Keyed,
    },
    /// The handshake failed: operations on the endpoint fail with this.
    Failed(String),
}

/// Where an endpoint's authentication stands, as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Operations may be sent.
    Ready,
    /// Still authenticating: hold operations back.
    Pending,
    /// Authentication failed: fail operations with `Unauthenticated(reason)`.
    Failed(String),
}

impl Client {
    /// Where it stands.
    pub fn readiness(&self) -> Readiness {
        match self {
            Client::Open | Client::Ready { .. } => Readiness::Ready,
            Client::Waiting(_) => Readiness::Pending,
            Client::Failed(why) => Readiness::Failed(why.clone()),
        }
    }
}

/// A session a target created for an authenticated client.
pub struct ServerSession {
    /// The name the client proved.
    pub name: String,
    /// Key and sequence numbers.
    pub keyed: Keyed,
    /// Last use (the least recently used is evicted at [`MAX_SESSIONS`]).
    pub used: Instant,
}

/// A target's sessions and handshakes in progress.
#[derive(Default)]
pub struct Server {
    /// Sessions by id.
    pub sessions: HashMap<u64, ServerSession>,
    /// Handshakes by id, with their start.
    pub handshakes: HashMap<u64, (ServerHandshake, Instant)>,
}

impl Server {
    /// Keeps handshake `hs` under `id`, evicting expired ones and, when full, the oldest.
    pub fn add_handshake(&mut self, id: u64, hs: ServerHandshake) {
        let now = Instant::now();
        self.handshakes
            .retain(|_, (_, t)| now.duration_since(*t) < HANDSHAKE_TTL);
        if self.handshakes.len() >= MAX_HANDSHAKES {
            if let Some(old) = self
                .handshakes
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            {
                self.handshakes.remove(&old);
            }
        }
        self.handshakes.insert(id, (hs, now));
    }

    /// Keeps a new session, evicting the least recently used one when full.
    pub fn add_session(&mut self, id: u64, name: String, key: SessionKey) {
        if self.sessions.len() >= MAX_SESSIONS {
            if let Some(old) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| *k)
            {
                self.sessions.remove(&old);
            }
        }
        self.sessions.insert(
            id,
            ServerSession {
                name,
                keyed: Keyed::new(key),
                used: Instant::now(),
            },
        );
    }
}

/// A random, non-zero 64-bit id from the OS (sessions, handshakes).
pub fn random_id() -> Result<u64> {
    let mut b = [0u8; 8];
    kv_core::auth::fill_random(&mut b)?;
    Ok(u64::from_le_bytes(b).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::auth::{ClientHello, ClusterSecret, ServerProof};

    #[test]
    fn window_accepts_each_sequence_number_once() {
        let mut w = Window::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3), "reordered within the window");
        assert!(!w.accept(3));
        assert!(w.accept(5000));
        assert!(!w.accept(5000 - WINDOW), "too old");
        assert!(w.accept(5000 - WINDOW + 1));
        assert!(!w.accept(5000 - WINDOW + 1));
        assert!(w.accept(u64::MAX));
        assert!(!w.accept(u64::MAX));
        // A slot reused after the window moved on is free again.
        let mut w = Window::default();
        assert!(w.accept(1));
        assert!(w.accept(1 + WINDOW));
        assert!(!w.accept(1));
    }

    #[test]
    fn sealed_messages_open_once_and_only_under_their_key() {
        let secret = ClusterSecret::generate().unwrap();
        let (server, hello) = ServerHandshake::start(&secret, PURPOSE).unwrap();
        let (client, answer) = ClientHandshake::respond(&secret, PURPOSE, "c", &hello).unwrap();
        let (proof, peer) = server
            .finish(&ClientHello::decode(&answer.encode()).unwrap())
            .unwrap();
        let ckey = client
            .finish(&ServerProof::decode(&proof.encode()).unwrap())
            .unwrap();
        let (mut tx, mut rx) = (Keyed::new(ckey), Keyed::new(peer.key));
        let seq = tx.next_seq();
        let mut msg = vec![7u8; 40 + TAG_LEN];
        tx.seal(seq, &mut msg, b"payload");
        rx.open(seq, &msg, b"payload").unwrap();
        assert!(rx.open(seq, &msg, b"payload").is_err(), "replay");
        let seq = tx.next_seq();
        tx.seal(seq, &mut msg, b"payload");
        assert!(rx.open(seq, &msg, b"payloaX").is_err(), "payload changed");
        msg[0] ^= 1;
        assert!(rx.open(seq, &msg, b"payload").is_err(), "header changed");
        let other = ClusterSecret::generate().unwrap();
        let (s2, h2) = ServerHandshake::start(&other, PURPOSE).unwrap();
        let (_, a2) = ClientHandshake::respond(&other, PURPOSE, "c", &h2).unwrap();
        let (_, p2) = s2.finish(&a2).unwrap();
        let mut wrong = Keyed::new(p2.key);
        msg[0] ^= 1;
        assert!(wrong.open(seq, &msg, b"payload").is_err(), "another key");
        assert!(rx.open(0, &[0u8; 3], b"").is_err(), "shorter than a tag");
    }

    #[test]
    fn server_state_is_bounded() {
        let secret = ClusterSecret::generate().unwrap();
        let mut s = Server::default();
        for i in 0..(MAX_HANDSHAKES as u64 + 10) {
            let (hs, _) = ServerHandshake::start(&secret, PURPOSE).unwrap();
            s.add_handshake(i + 1, hs);
        }
        assert_eq!(s.handshakes.len(), MAX_HANDSHAKES);
        let (hs, hello) = ServerHandshake::start(&secret, PURPOSE).unwrap();
        let (_, answer) = ClientHandshake::respond(&secret, PURPOSE, "c", &hello).unwrap();
        let (_, peer) = hs.finish(&answer).unwrap();
        for i in 0..(MAX_SESSIONS as u64 + 3) {
            s.add_session(i + 1, "c".into(), peer.key.clone());
        }
        assert_eq!(s.sessions.len(), MAX_SESSIONS);
        assert_ne!(random_id().unwrap(), 0);
    }
}
