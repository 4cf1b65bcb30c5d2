use super::*;
use crate::frame::{self, parse_header, read_frame};
use crate::{Agent, AgentOptions};
use proptest::prelude::*;
use std::io::{Read, Write};

proptest! {
    #[test]
    fn headers_never_panic(v in proptest::collection::vec(any::<u8>(), 0..24)) {
        let _ = parse_header(&v);
        let _ = read_frame(&mut &v[..]);
    }
}

#[test]
fn oversized_frames_are_refused() {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&frame::MAGIC);
    h[4] = PUT;
    h[8..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(parse_header(&h), Err(Error::InvalidMetadata(_))));
}

fn secret() -> ClusterSecret {
    static S: std::sync::OnceLock<ClusterSecret> = std::sync::OnceLock::new();
    S.get_or_init(|| ClusterSecret::generate().unwrap()).clone()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// A connected pair of sockets and the sessions their handshake gave.
fn session_pair() -> ((TcpStream, Session), (TcpStream, Session)) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let (session, name) = frame::accept(&mut s, Some(&secret()), soon()).unwrap();
        assert_eq!(name.as_deref(), Some("client"));
        (s, session)
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let cs = frame::connect(&mut c, "client", Some(&secret()), soon()).unwrap();
    ((c, cs), server.join().unwrap())
}

#[test]
fn replayed_reordered_reflected_or_altered_frames_are_refused() {
    // In order: accepted.
    let ((mut c, mut cs), (mut s, mut ss)) = session_pair();
    let f0 = cs.seal(GET, b"zero").unwrap();
    c.write_all(&f0).unwrap();
    assert_eq!(
        ss.recv(&mut s, soon(), None).unwrap(),
        (GET, b"zero".to_vec())
    );
    // Replayed: refused.
    c.write_all(&f0).unwrap();
    assert!(matches!(
        ss.recv(&mut s, soon(), None),
        Err(Error::Unauthenticated(_))
    ));

    // Reordered: frame 1 before frame 0.
    let ((mut c, mut cs), (mut s, mut ss)) = session_pair();
    let _f0 = cs.seal(GET, b"zero").unwrap();
    let f1 = cs.seal(GET, b"one").unwrap();
    c.write_all(&f1).unwrap();
    assert!(matches!(
        ss.recv(&mut s, soon(), None),
        Err(Error::Unauthenticated(_))
    ));

    // Reflected: the server's own frame 0 sent back to it.
    let ((mut c, _), (mut s, mut ss)) = session_pair();
    let echo = ss.seal(META, b"meta").unwrap();
    c.write_all(&echo).unwrap();
    assert!(matches!(
        ss.recv(&mut s, soon(), None),
        Err(Error::Unauthenticated(_))
    ));

    // One bit flipped in the payload.
    let ((mut c, mut cs), (mut s, mut ss)) = session_pair();
    let mut f = cs.seal(PUT, b"payload").unwrap();
    f[13] ^= 1;
    c.write_all(&f).unwrap();
    assert!(matches!(
        ss.recv(&mut s, soon(), None),
        Err(Error::Unauthenticated(_))
    ));

    // A frame recorded on one connection is refused on another (another key).
    let ((mut c, _), (mut s, mut ss)) = session_pair();
    c.write_all(&f0).unwrap();
    assert!(matches!(
        ss.recv(&mut s, soon(), None),
        Err(Error::Unauthenticated(_))
    ));
}

fn secure_agent(name: &str) -> Agent {
    Agent::new(
        name,
        AgentOptions {
            secret: Some(secret()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// An authenticated raw connection to `addr` as `name`.
fn raw(addr: SocketAddr, name: &str) -> (TcpStream, Session) {
    let mut c = TcpStream::connect(addr).unwrap();
    let s = frame::connect(&mut c, name, Some(&secret()), soon()).unwrap();
    (c, s)
}

#[test]
fn a_peer_may_publish_only_itself() {
    let d = secure_agent("decode");
    let addr = d.listen("127.0.0.1:0").unwrap();
    let victim = secure_agent("prefill").local_metadata().unwrap();
    let (mut c, mut cs) = raw(addr, "mallory");
    cs.send(&mut c, PUT, &victim).unwrap();
    let (op, msg) = cs.recv(&mut c, soon(), None).unwrap();
    let msg = String::from_utf8_lossy(&msg).into_owned();
    assert_eq!(op, ERR, "{msg}");
    assert!(msg.contains("may publish only itself"), "{msg}");
    assert!(d.peer_by_name("prefill").is_none());
    // Under its own name it may.
    let (mut c, mut cs) = raw(addr, "prefill");
    cs.send(&mut c, PUT, &victim).unwrap();
    assert_eq!(cs.recv(&mut c, soon(), None).unwrap().0, OK);
    assert!(d.peer_by_name("prefill").is_some());
}

#[test]
fn payload_memory_is_bounded_across_connections() {
    let d = secure_agent("decode");
    let addr = d.listen("127.0.0.1:0").unwrap();
    let big = 60u32 << 20;
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&frame::MAGIC);
    h[4] = PUT;
    h[8..].copy_from_slice(&big.to_le_bytes());
    // Two 60 MiB PUTs in progress (header sent, payload trickling) fill the budget…
    let mut holding = Vec::new();
    for _ in 0..2 {
        let (mut c, _) = raw(addr, "prefill");
        c.write_all(&h).unwrap();
        c.write_all(&[0; 1024]).unwrap();
        holding.push(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    // …so a third is answered "busy" at once instead of being buffered.
    let (mut c, mut cs) = raw(addr, "prefill");
    c.write_all(&h).unwrap();
    let start = Instant::now();
    let (op, msg) = cs.recv(&mut c, soon(), None).unwrap();
    assert_eq!(op, ERR);
    assert!(String::from_utf8_lossy(&msg).contains("retry"));
    assert!(start.elapsed() < Duration::from_secs(1));
    // Metadata of a normal size still goes through.
    drop(holding);
    std::thread::sleep(Duration::from_millis(100));
    secure_agent("prefill").publish_to(addr).unwrap();
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
}
