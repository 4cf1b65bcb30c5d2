//! Authentication primitives: the cluster secret, OS randomness, and a sans-IO mutual
//! challenge–response handshake that any byte stream can carry.
//!
//! Every agent of a cluster is configured with the same [`ClusterSecret`]; a peer is
//! whoever proves knowledge of it. The handshake never sends the secret, only HMACs
//! (HMAC-SHA256 from RustCrypto's `hmac` + `sha2`, verified in constant time) over fresh
//! nonces from both sides, so a recorded transcript cannot be replayed — and a fixed
//! per-channel `purpose` string goes into every MAC, so a transcript of one channel
//! cannot be replayed on another. Both sides end with the same [`SessionKey`], which
//! tags later control frames with a sequence number ([`SessionKey::tag`]).
//!
//! The module does no I/O besides reading OS randomness: the caller moves the encoded
//! messages (`server → client → server → client`) over its own connection.
//!
//! ```
//! use kv_core::auth::{ClientHandshake, ClientHello, ClusterSecret, ServerHandshake, ServerHello, ServerProof};
//!
//! const PURPOSE: &[u8] = b"example data channel";
//! let secret = ClusterSecret::generate()?;
//! // Server: a fresh challenge.
//! let (server, hello) = ServerHandshake::start(&secret, PURPOSE)?;
//! let wire = hello.encode();
//! // Client: answers it, proving it knows the secret.
//! let (client, answer) = ClientHandshake::respond(&secret, PURPOSE, "decode-0", &ServerHello::decode(&wire)?)?;
//! let wire = answer.encode();
//! // Server: checks the answer, learns the peer's name, proves itself in turn.
//! let (proof, peer) = server.finish(&ClientHello::decode(&wire)?)?;
//! assert_eq!(peer.name, "decode-0");
//! // Client: checks the server's proof; both now hold the same session key.
//! let key = client.finish(&ServerProof::decode(&proof.encode())?)?;
//! let tag = key.tag(0, b"frame 0");
//! peer.key.verify(0, b"frame 0", &tag)?;
//! assert!(peer.key.verify(1, b"frame 0", &tag).is_err()); // replayed under another sequence number
//! # Ok::<(), kv_core::Error>(())
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted, in bytes (128 bits).
pub const MIN_SECRET_LEN: usize = 16;
/// Length of a [`ClusterSecret::generate`]d secret, in bytes.
pub const GENERATED_SECRET_LEN: usize = 32;
/// Length of each side's nonce, in bytes.
pub const NONCE_LEN: usize = 32;
/// Length of a handshake MAC (full HMAC-SHA256), in bytes.
pub const MAC_LEN: usize = 32;
/// Length of a per-frame tag ([`SessionKey::tag`]: truncated HMAC-SHA256), in bytes.
pub const TAG_LEN: usize = 16;
/// Longest peer name a [`ClientHello`] carries, in bytes (as `codec::MAX_NAME_LEN`).
pub const MAX_PEER_NAME_LEN: usize = 1024;
/// Largest handshake message, length prefix included: read no more than this from a
/// peer before it is authenticated.
pub const MAX_HANDSHAKE_MESSAGE: usize =
    PREFIX + HEAD + NONCE_LEN + 2 + MAX_PEER_NAME_LEN + MAC_LEN;

/// Magic of every handshake message.
const MAGIC: &[u8; 4] = b"KVXA";
/// Handshake wire version.
const VERSION: u8 = 1;
/// Length prefix (u32, little-endian, of what follows it).
const PREFIX: usize = 4;
/// Magic, version and message type.
const HEAD: usize = 4 + 1 + 1;

const TYPE_SERVER_HELLO: u8 = 1;
const TYPE_CLIENT_HELLO: u8 = 2;
const TYPE_SERVER_PROOF: u8 = 3;

/// The secret every agent of a cluster shares (≥ 16 bytes). `Clone`, `Send + Sync`;
/// `Debug` prints only its [`fingerprint`](ClusterSecret::fingerprint).
///
/// kv-core does no configuration I/O: the agent reads it (e.g. hex from `KVX_SECRET`)
/// and hands it to backends in [`crate::BackendInit`].
#[derive(Clone)]
pub struct ClusterSecret(Box<[u8]>);

impl ClusterSecret {
    /// A secret from raw bytes; fails with [`Error::InvalidArgument`] below
    /// [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(Error::invalid_argument(format!(
                "cluster secret of {} bytes is too short; use at least {MIN_SECRET_LEN} random bytes \
                 (e.g. ClusterSecret::generate())",
                bytes.len()
            )));
        }
        Ok(ClusterSecret(bytes.into()))
    }

    /// A fresh secret of [`GENERATED_SECRET_LEN`] bytes from the OS.
    pub fn generate() -> Result<Self> {
        let mut b = [0u8; GENERATED_SECRET_LEN];
        fill_random(&mut b)?;
        Self::new(&b)
    }

    /// Parses hex (upper or lower case, surrounding whitespace ignored).
    pub fn from_hex(hex: &str) -> Result<Self> {
        let hex = hex.trim();
        if hex.len() % 2 != 0 {
            return Err(Error::invalid_argument(
                "cluster secret hex has an odd number of digits",
            ));
        }
        let digit = |c: u8| -> Result<u8> {
            (c as char)
                .to_digit(16)
                .map(|d| d as u8)
                .ok_or_else(|| Error::invalid_argument("cluster secret is not hex"))
        };
        let bytes = hex
            .as_bytes()
            .chunks_exact(2)
            .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
            .collect::<Result<Vec<u8>>>()?;
        Self::new(&bytes)
    }

    /// The secret as lower-case hex (to print for a peer that must share it).
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// The first 8 hex digits of the secret's SHA-256: safe to log, enough to tell two
    /// configurations apart.
    pub fn fingerprint(&self) -> String {
        to_hex(&Sha256::digest(&self.0)[..4])
    }

    fn mac(&self) -> HmacSha256 {
        keyed(&self.0)
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({})", self.fingerprint())
    }
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn keyed(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm cannot be reached.
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of every length"),
    }
}

/// Fills `buf` with random bytes from the operating system.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::Backend {
        name: "getrandom".into(),
        code: e.raw_os_error().map_or(0, i64::from),
        message: format!("reading OS randomness failed: {e}"),
    })
}

/// 128 random bits from the operating system (remote keys, ids peers must not guess).
pub fn random_u128() -> Result<u128> {
    let mut b = [0u8; 16];
    fill_random(&mut b)?;
    Ok(u128::from_le_bytes(b))
}

/// Server → client: the server's challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The server's fresh nonce.
    pub nonce_s: [u8; NONCE_LEN],
}

/// Client → server: the client's nonce, its name and its proof of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The client's fresh nonce.
    pub nonce_c: [u8; NONCE_LEN],
    /// The client's agent name (what notifications from it will carry).
    pub name: String,
    /// HMAC(secret, "kvx-auth-v1" ‖ purpose ‖ "client" ‖ nonce_s ‖ nonce_c ‖ name).
    pub mac_c: [u8; MAC_LEN],
}

/// Server → client: the server's proof of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerProof {
    /// HMAC(secret, "kvx-auth-v1" ‖ purpose ‖ "server" ‖ nonce_s ‖ nonce_c ‖ name).
    pub mac_s: [u8; MAC_LEN],
}

/// The length of a whole handshake message from its 4-byte prefix (prefix included),
/// refused above [`MAX_HANDSHAKE_MESSAGE`]: read the prefix, then exactly this many bytes.
pub fn message_len(prefix: [u8; 4]) -> Result<usize> {
    let n = (u32::from_le_bytes(prefix) as usize).saturating_add(PREFIX);
    if !(PREFIX + HEAD..=MAX_HANDSHAKE_MESSAGE).contains(&n) {
        return Err(Error::Unauthenticated(format!(
            "handshake message of {n} bytes (peer is not a kvx agent?)"
        )));
    }
    Ok(n)
}

fn frame(ty: u8, body_len: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(PREFIX + HEAD + body_len);
    // Bodies are bounded by MAX_HANDSHAKE_MESSAGE, far below u32::MAX.
    b.put_u32_le((HEAD + body_len) as u32);
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u8(ty);
    b
}

/// Checks prefix, magic, version and type; returns the body.
fn open<'a>(buf: &'a [u8], ty: u8, what: &str) -> Result<&'a [u8]> {
    let bad = |why: &str| Error::Unauthenticated(format!("malformed {what}: {why}"));
    if buf.len() < PREFIX + HEAD || buf.len() > MAX_HANDSHAKE_MESSAGE {
        return Err(bad("wrong size"));
    }
    let (prefix, rest) = buf.split_at(PREFIX);
    if u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize != rest.len() {
        return Err(bad("length prefix disagrees with the message"));
    }
    let (head, body) = rest.split_at(HEAD);
    if &head[..4] != MAGIC {
        return Err(bad("bad magic (not a kvx handshake)"));
    }
    if head[4] != VERSION {
        return Err(bad(&format!(
            "handshake version {}, this build speaks {VERSION}; upgrade both",
            head[4]
        )));
    }
    if head[5] != ty {
        return Err(bad(&format!("message type {}, expected {ty}", head[5])));
    }
    Ok(body)
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

impl ServerHello {
    /// Encodes as a length-prefixed message.
    pub fn encode(&self) -> Bytes {
        let mut b = frame(TYPE_SERVER_HELLO, NONCE_LEN);
        b.put_slice(&self.nonce_s);
        b.freeze()
    }

    /// Decodes a whole message; malformed input is [`Error::Unauthenticated`].
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let body = open(buf, TYPE_SERVER_HELLO, "server hello")?;
        if body.len() != NONCE_LEN {
            return Err(Error::Unauthenticated("malformed server hello".into()));
        }
        Ok(ServerHello {
            nonce_s: array(body),
        })
    }
}

impl ClientHello {
    /// Encodes as a length-prefixed message.
    pub fn encode(&self) -> Bytes {
        let mut b = frame(TYPE_CLIENT_HELLO, NONCE_LEN + 2 + self.name.len() + MAC_LEN);
        b.put_slice(&self.nonce_c);
        // `respond` refuses names above MAX_PEER_NAME_LEN, so the length fits.
        b.put_u16_le(self.name.len() as u16);
        b.put_slice(self.name.as_bytes());
        b.put_slice(&self.mac_c);
        b.freeze()
    }

    /// Decodes a whole message; malformed input is [`Error::Unauthenticated`].
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let bad = || Error::Unauthenticated("malformed client hello".into());
        let body = open(buf, TYPE_CLIENT_HELLO, "client hello")?;
        if body.len() < NONCE_LEN + 2 + MAC_LEN {
            return Err(bad());
        }
        let (nonce_c, rest) = body.split_at(NONCE_LEN);
        let (n, rest) = rest.split_at(2);
        let n = u16::from_le_bytes([n[0], n[1]]) as usize;
        if n > MAX_PEER_NAME_LEN || rest.len() != n + MAC_LEN {
            return Err(bad());
        }
        let (name, mac) = rest.split_at(n);
        Ok(ClientHello {
            nonce_c: array(nonce_c),
            name: String::from_utf8(name.to_vec()).map_err(|_| bad())?,
            mac_c: array(mac),
        })
    }
}

impl ServerProof {
    /// Encodes as a length-prefixed message.
    pub fn encode(&self) -> Bytes {
        let mut b = frame(TYPE_SERVER_PROOF, MAC_LEN);
        b.put_slice(&self.mac_s);
        b.freeze()
    }

    /// Decodes a whole message; malformed input is [`Error::Unauthenticated`].
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let body = open(buf, TYPE_SERVER_PROOF, "server proof")?;
        if body.len() != MAC_LEN {
            return Err(Error::Unauthenticated("malformed server proof".into()));
        }
        Ok(ServerProof { mac_s: array(body) })
    }
}

/// What both sides MAC: variable-length fields carry a length prefix, so no two
/// different (purpose, name) pairs give the same input.
struct Transcript<'a> {
    purpose: &'a [u8],
    nonce_s: &'a [u8; NONCE_LEN],
    nonce_c: &'a [u8; NONCE_LEN],
    name: &'a str,
}

impl Transcript<'_> {
    fn mac(&self, secret: &ClusterSecret, role: &[u8]) -> HmacSha256 {
        let mut m = secret.mac();
        m.update(b"kvx-auth-v1");
        put_field(&mut m, self.purpose);
        m.update(role);
        m.update(self.nonce_s);
        m.update(self.nonce_c);
        put_field(&mut m, self.name.as_bytes());
        m
    }

    fn session_key(&self, secret: &ClusterSecret) -> SessionKey {
        let mut m = secret.mac();
        m.update(b"kvx-session-v1");
        put_field(&mut m, self.purpose);
        m.update(self.nonce_s);
        m.update(self.nonce_c);
        SessionKey(m.finalize().into_bytes().into())
    }
}

fn put_field(m: &mut HmacSha256, field: &[u8]) {
    m.update(&(field.len() as u64).to_le_bytes());
    m.update(field);
}

/// The server's half of the handshake, between its hello and the client's answer.
pub struct ServerHandshake {
    secret: ClusterSecret,
    purpose: &'static [u8],
    nonce_s: [u8; NONCE_LEN],
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// A client the server authenticated: its name and the session key.
#[derive(Debug, Clone)]
pub struct AuthenticatedPeer {
    /// The name the client proved together with the secret.
    pub name: String,
    /// The key both sides derived.
    pub key: SessionKey,
}

impl ServerHandshake {
    /// Starts a handshake for the channel `purpose`: send the returned hello.
    pub fn start(secret: &ClusterSecret, purpose: &'static [u8]) -> Result<(Self, ServerHello)> {
        let mut nonce_s = [0u8; NONCE_LEN];
        fill_random(&mut nonce_s)?;
        let hs = ServerHandshake {
            secret: secret.clone(),
            purpose,
            nonce_s,
        };
        Ok((hs, ServerHello { nonce_s }))
    }

    /// Checks the client's answer (constant time); on success returns the proof to send
    /// back and the authenticated peer. A wrong MAC is [`Error::Unauthenticated`].
    pub fn finish(self, hello: &ClientHello) -> Result<(ServerProof, AuthenticatedPeer)> {
        let t = Transcript {
            purpose: self.purpose,
            nonce_s: &self.nonce_s,
            nonce_c: &hello.nonce_c,
            name: &hello.name,
        };
        t.mac(&self.secret, b"client")
            .verify_slice(&hello.mac_c)
            .map_err(|_| {
                Error::Unauthenticated(format!("client {:?} sent a wrong MAC", hello.name))
            })?;
        let proof = ServerProof {
            mac_s: t
                .mac(&self.secret, b"server")
                .finalize()
                .into_bytes()
                .into(),
        };
        let peer = AuthenticatedPeer {
            name: hello.name.clone(),
            key: t.session_key(&self.secret),
        };
        Ok((proof, peer))
    }
}

/// The client's half of the handshake, between its answer and the server's proof.
pub struct ClientHandshake {
    secret: ClusterSecret,
    purpose: &'static [u8],
    nonce_s: [u8; NONCE_LEN],
    nonce_c: [u8; NONCE_LEN],
    name: String,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandshake")
            .field("secret", &self.secret)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientHandshake {
    /// Answers the server's hello as the agent `name`: send the returned hello.
    pub fn respond(
        secret: &ClusterSecret,
        purpose: &'static [u8],
        name: &str,
        hello: &ServerHello,
    ) -> Result<(Self, ClientHello)> {
        if name.len() > MAX_PEER_NAME_LEN {
            return Err(Error::invalid_argument(format!(
                "agent name of {} bytes exceeds {MAX_PEER_NAME_LEN}",
                name.len()
            )));
        }
        let mut nonce_c = [0u8; NONCE_LEN];
        fill_random(&mut nonce_c)?;
        let t = Transcript {
            purpose,
            nonce_s: &hello.nonce_s,
            nonce_c: &nonce_c,
            name,
        };
        let answer = ClientHello {
            nonce_c,
            name: name.to_string(),
            mac_c: t.mac(secret, b"client").finalize().into_bytes().into(),
        };
        let hs = ClientHandshake {
            secret: secret.clone(),
            purpose,
            nonce_s: hello.nonce_s,
            nonce_c,
            name: name.to_string(),
        };
        Ok((hs, answer))
    }

    /// Checks the server's proof (constant time); on success returns the session key. A
    /// wrong MAC is [`Error::Unauthenticated`].
    pub fn finish(self, proof: &ServerProof) -> Result<SessionKey> {
        let t = Transcript {
            purpose: self.purpose,
            nonce_s: &self.nonce_s,
            nonce_c: &self.nonce_c,
            name: &self.name,
        };
        t.mac(&self.secret, b"server")
            .verify_slice(&proof.mac_s)
            .map_err(|_| Error::Unauthenticated("server sent a wrong proof".into()))?;
        Ok(t.session_key(&self.secret))
    }
}

/// The key both sides of an authenticated channel derived; tags control frames.
/// `Clone`, `Send + Sync`; `Debug` prints nothing of it.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    fn frame_mac(&self, seq: u64, bytes: &[u8]) -> HmacSha256 {
        let mut m = keyed(&self.0);
        m.update(b"kvx-frame-v1");
        m.update(&seq.to_le_bytes());
        m.update(bytes);
        m
    }

    /// The tag of frame number `seq` (truncated HMAC-SHA256). Each direction numbers its
    /// frames 0, 1, 2, …, so a replayed or reordered frame fails [`SessionKey::verify`].
    pub fn tag(&self, seq: u64, bytes: &[u8]) -> [u8; TAG_LEN] {
        let full = self.frame_mac(seq, bytes).finalize().into_bytes();
        array(&full)
    }

    /// Checks `tag` for frame `seq` in constant time; [`Error::Unauthenticated`] if wrong.
    pub fn verify(&self, seq: u64, bytes: &[u8], tag: &[u8]) -> Result<()> {
        if tag.len() != TAG_LEN {
            return Err(Error::Unauthenticated(format!(
                "frame tag of {} bytes, expected {TAG_LEN}",
                tag.len()
            )));
        }
        self.frame_mac(seq, bytes)
            .verify_truncated_left(tag)
            .map_err(|_| {
                Error::Unauthenticated(format!("frame {seq} has a wrong tag (forged or replayed)"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &[u8] = b"test channel";

    fn run(
        server_secret: &ClusterSecret,
        client_secret: &ClusterSecret,
        purpose_s: &'static [u8],
        purpose_c: &'static [u8],
    ) -> Result<(SessionKey, AuthenticatedPeer)> {
        let (server, hello) = ServerHandshake::start(server_secret, purpose_s)?;
        let (client, answer) =
            ClientHandshake::respond(client_secret, purpose_c, "client-1", &hello)?;
        let (proof, peer) = server.finish(&ClientHello::decode(&answer.encode())?)?;
        let key = client.finish(&ServerProof::decode(&proof.encode())?)?;
        Ok((key, peer))
    }

    #[test]
    fn same_secret_agrees_on_a_key() {
        let s = ClusterSecret::generate().unwrap();
        let (key, peer) = run(&s, &s, P, P).unwrap();
        assert_eq!(peer.name, "client-1");
        let tag = key.tag(7, b"abc");
        peer.key.verify(7, b"abc", &tag).unwrap();
        assert!(peer.key.verify(8, b"abc", &tag).is_err());
        assert!(peer.key.verify(7, b"abd", &tag).is_err());
        assert!(peer.key.verify(7, b"abc", &tag[..15]).is_err());
        // A new handshake gives a new key.
        let (key2, _) = run(&s, &s, P, P).unwrap();
        assert_ne!(key2.tag(7, b"abc"), tag);
    }

    #[test]
    fn other_secret_or_purpose_is_refused() {
        let (a, b) = (
            ClusterSecret::generate().unwrap(),
            ClusterSecret::generate().unwrap(),
        );
        assert!(matches!(run(&a, &b, P, P), Err(Error::Unauthenticated(_))));
        assert!(matches!(
            run(&a, &a, P, b"other channel"),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_server_without_the_secret_cannot_prove_itself() {
        let (good, bad) = (
            ClusterSecret::generate().unwrap(),
            ClusterSecret::generate().unwrap(),
        );
        let (_, hello) = ServerHandshake::start(&bad, P).unwrap();
        let (client, answer) = ClientHandshake::respond(&good, P, "c", &hello).unwrap();
        // The impostor replies with whatever it can compute: a proof under its own secret.
        let (impostor, _) = ServerHandshake::start(&bad, P).unwrap();
        let forged = ServerHandshake {
            nonce_s: hello.nonce_s,
            ..impostor
        };
        let proof = match forged.finish(&answer) {
            Ok((p, _)) => p,
            Err(_) => ServerProof { mac_s: [0; 32] },
        };
        assert!(matches!(
            client.finish(&proof),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_recorded_answer_does_not_replay() {
        let s = ClusterSecret::generate().unwrap();
        let (_, hello) = ServerHandshake::start(&s, P).unwrap();
        let (_, answer) = ClientHandshake::respond(&s, P, "c", &hello).unwrap();
        let (server2, _) = ServerHandshake::start(&s, P).unwrap();
        assert!(server2.finish(&answer).is_err());
    }

    #[test]
    fn secrets_parse_and_hide() {
        assert!(ClusterSecret::new(&[1; 15]).is_err());
        let s = ClusterSecret::from_hex(" 000102030405060708090a0B0c0d0e0f\n").unwrap();
        assert_eq!(s.to_hex(), "000102030405060708090a0b0c0d0e0f");
        assert_eq!(
            ClusterSecret::from_hex(&s.to_hex()).unwrap().to_hex(),
            s.to_hex()
        );
        assert!(ClusterSecret::from_hex("0g0102030405060708090a0b0c0d0e0f").is_err());
        assert!(ClusterSecret::from_hex("000").is_err());
        assert!(ClusterSecret::from_hex("é0").is_err());
        let fp = s.fingerprint();
        assert_eq!(fp.len(), 8);
        let dbg = format!("{s:?}");
        assert!(dbg.contains(&fp) && !dbg.contains(&s.to_hex()), "{dbg}");
        assert_eq!(ClusterSecret::generate().unwrap().to_hex().len(), 64);
        assert_ne!(random_u128().unwrap(), random_u128().unwrap());
    }

    #[test]
    fn names_are_bounded() {
        let s = ClusterSecret::generate().unwrap();
        let (_, hello) = ServerHandshake::start(&s, P).unwrap();
        let long = "x".repeat(MAX_PEER_NAME_LEN + 1);
        assert!(ClientHandshake::respond(&s, P, &long, &hello).is_err());
        let max = "x".repeat(MAX_PEER_NAME_LEN);
        let (_, answer) = ClientHandshake::respond(&s, P, &max, &hello).unwrap();
        let wire = answer.encode();
        assert_eq!(wire.len(), MAX_HANDSHAKE_MESSAGE);
        assert_eq!(message_len(array(&wire)).unwrap(), wire.len());
        assert_eq!(ClientHello::decode(&wire).unwrap(), answer);
        assert!(message_len((MAX_HANDSHAKE_MESSAGE as u32).to_le_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(v in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = ServerHello::decode(&v);
            let _ = ClientHello::decode(&v);
            let _ = ServerProof::decode(&v);
        }

        #[test]
        fn every_truncation_and_flip_is_refused(cut in 0usize..200, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let s = ClusterSecret::generate().unwrap();
            let (server, hello) = ServerHandshake::start(&s, P).unwrap();
            let (_, answer) = ClientHandshake::respond(&s, P, "client-name", &hello).unwrap();
            let wire = answer.encode();
            prop_assert!(ClientHello::decode(&wire[..cut.min(wire.len() - 1)]).is_err());
            let mut v = wire.to_vec();
            let i = pos.index(v.len());
            v[i] ^= 1 << bit;
            // A flipped bit is either malformed or fails the MAC.
            let accepted = ClientHello::decode(&v).and_then(|h| server.finish(&h));
            prop_assert!(accepted.is_err(), "flip at byte {}", i);
        }
    }
}
