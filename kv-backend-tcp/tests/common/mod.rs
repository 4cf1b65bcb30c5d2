//! Shared by the integration tests: backends with one cluster secret per test binary,
//! and a raw protocol peer (client or server) over std sockets that does the preamble,
//! the `kv_core::auth` handshake and HELLO, then sends and receives tagged frames — to
//! play a misbehaving peer the backend must survive.
#![allow(dead_code)] // each test binary uses a different part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use kv_backend_tcp::wire::{
    self, Answer, ChannelKind, ConnectionInfo, FrameOp, Header, Preamble, HEADER_LEN, PREAMBLE_LEN,
    TAG_LEN,
};
use kv_backend_tcp::{Options, TcpBackend};
use kv_core::auth::{
    message_len, ClientHandshake, ClientHello, ClusterSecret, ServerHandshake, ServerHello,
    ServerProof, SessionKey,
};
use kv_core::{Access, Backend, BackendInit, Descriptor, EndpointId, MemKind, RegistrationId};

/// The cluster secret every backend of this test binary shares.
pub fn secret() -> &'static ClusterSecret {
    static S: OnceLock<ClusterSecret> = OnceLock::new();
    S.get_or_init(|| ClusterSecret::generate().expect("OS randomness"))
}

/// The context of agent `name` with the shared secret.
pub fn init(name: &str) -> BackendInit {
    BackendInit::new(name).with_secret(secret().clone())
}

/// A backend of agent `name` with the shared secret and `opts`.
pub fn backend(name: &str, opts: Options) -> TcpBackend {
    TcpBackend::new(&init(name), opts).expect("tcp backend")
}

/// Registers `l` on `a` and `r` on `b` (DRAM, read-write), connects `a` to `b` (as
/// "b") and imports `r`: the two registrations and the peer, ready for `a` to prepare.
///
/// # Safety
/// The memory `l` and `r` describe must stay valid until both registrations are gone
/// (the tests drop the backends first).
pub unsafe fn wire_pair(
    a: &TcpBackend,
    b: &TcpBackend,
    l: &Descriptor,
    r: &Descriptor,
) -> (RegistrationId, RegistrationId, EndpointId) {
    // SAFETY: the caller keeps both ranges valid while they are registered.
    let (la, rb) = unsafe {
        (
            a.register(MemKind::Dram, l, Access::ReadWrite)
                .expect("register l"),
            b.register(MemKind::Dram, r, Access::ReadWrite)
                .expect("register r"),
        )
    };
    let peer = a.connect("b", &b.connection_info().unwrap()).unwrap();
    let key = b.remote_key(rb).unwrap();
    a.import_remote(peer, MemKind::Dram, r, &key).unwrap();
    (la, rb, peer)
}

fn read_auth(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix)?;
    let n = message_len(prefix).map_err(std::io::Error::other)?;
    let mut m = vec![0u8; n];
    m[..4].copy_from_slice(&prefix);
    s.read_exact(&mut m[4..])?;
    Ok(m)
}

/// One end of a raw protocol connection after the handshake.
pub struct Raw {
    pub s: TcpStream,
    key: Option<SessionKey>,
    send: u64,
    recv: u64,
}

impl Raw {
    /// Connects to `b` as agent `name` on channel `kind`, with `secret` (or none), and
    /// does the preamble, handshake and HELLO; `Err` when the target refused.
    pub fn connect(
        b: &TcpBackend,
        kind: ChannelKind,
        secret: Option<&ClusterSecret>,
        name: &str,
    ) -> std::io::Result<Raw> {
        let info = ConnectionInfo::decode(&b.connection_info().unwrap()).unwrap();
        let mut s = TcpStream::connect(b.local_addr())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&wire::encode_preamble(&Preamble {
            kind,
            auth: secret.is_some(),
        }))?;
        let mut a = [0u8; PREAMBLE_LEN];
        s.read_exact(&mut a)?;
        let a: Answer = wire::decode_answer(&a).map_err(std::io::Error::other)?;
        if !a.ok {
            return Err(std::io::Error::other("preamble refused"));
        }
        let key = match secret {
            None => None,
            Some(secret) => {
                let hello =
                    ServerHello::decode(&read_auth(&mut s)?).map_err(std::io::Error::other)?;
                let (hs, ans) = ClientHandshake::respond(secret, kind.purpose(), name, &hello)
                    .map_err(std::io::Error::other)?;
                s.write_all(&ans.encode())?;
                let proof =
                    ServerProof::decode(&read_auth(&mut s)?).map_err(std::io::Error::other)?;
                Some(hs.finish(&proof).map_err(std::io::Error::other)?)
            }
        };
        let mut r = Raw {
            s,
            key,
            send: 0,
            recv: 0,
        };
        let h = Header {
            key: u128::from(info.instance),
            len: name.len() as u64,
            ..Header::new(FrameOp::Hello)
        };
        r.send_frame(&h, name.as_bytes())?;
        let (ack, _) = r.recv_frame()?;
        if ack.op != FrameOp::HelloAck {
            return Err(std::io::Error::other(format!(
                "HELLO answered by {:?}",
                ack.op
            )));
        }
        Ok(r)
    }

    /// Accepts one connection on `l` as a target of instance `instance` with `secret`:
    /// answers the preamble, the handshake and HELLO.
    pub fn accept(l: &TcpListener, secret: &ClusterSecret, instance: u64) -> std::io::Result<Raw> {
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut p = [0u8; PREAMBLE_LEN];
        s.read_exact(&mut p)?;
        let p = wire::decode_preamble(&p).map_err(std::io::Error::other)?;
        s.write_all(&wire::encode_answer(&Answer {
            auth: true,
            ok: p.auth,
        }))?;
        let (hs, hello) =
            ServerHandshake::start(secret, p.kind.purpose()).map_err(std::io::Error::other)?;
        s.write_all(&hello.encode())?;
        let ans = ClientHello::decode(&read_auth(&mut s)?).map_err(std::io::Error::other)?;
        let (proof, peer) = hs.finish(&ans).map_err(std::io::Error::other)?;
        s.write_all(&proof.encode())?;
        let mut r = Raw {
            s,
            key: Some(peer.key),
            send: 0,
            recv: 0,
        };
        let (h, _) = r.recv_frame()?;
        assert_eq!(h.op, FrameOp::Hello);
        r.send_frame(
            &Header {
                key: u128::from(instance),
                ..Header::new(FrameOp::HelloAck)
            },
            &[],
        )?;
        Ok(r)
    }

    /// Sends a frame: header, body, tag (no payload).
    pub fn send_frame(&mut self, h: &Header, body: &[u8]) -> std::io::Result<()> {
        let mut f = wire::encode_header(h).to_vec();
        f.extend_from_slice(body);
        if let Some(k) = &self.key {
            let tag = k.tag(self.send, &f);
            f.extend_from_slice(&tag);
        }
        self.send += 1;
        self.s.write_all(&f)
    }

    /// Receives a frame: its header and body (tag checked).
    pub fn recv_frame(&mut self) -> std::io::Result<(Header, Vec<u8>)> {
        let mut f = vec![0u8; HEADER_LEN];
        self.s.read_exact(&mut f)?;
        let h = wire::decode_header(&f).map_err(std::io::Error::other)?;
        let n = wire::body_len(&h);
        f.resize(HEADER_LEN + n, 0);
        self.s.read_exact(&mut f[HEADER_LEN..])?;
        if let Some(k) = &self.key {
            let mut tag = [0u8; TAG_LEN];
            self.s.read_exact(&mut tag)?;
            k.verify(self.recv, &f, &tag)
                .map_err(std::io::Error::other)?;
        }
        self.recv += 1;
        Ok((h, f[HEADER_LEN..].to_vec()))
    }
}
