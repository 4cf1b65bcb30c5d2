//! The passive side of `kv-bench transfer` (a child process, or `--role passive` on
//! another host): it owns the other buffer, serves its side channel, checks a WRITE and
//! publishes its verdict as a metadata attribute. Also what the active side uses to
//! deal with it: the child handle, the heartbeat that tells it this side is alive, and
//! fetching the verdict.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::{Agent, AgentOptions, PeerId, SECRET_ENV};
use kv_core::auth::ClusterSecret;
use kv_core::{Error, Op, Result};
use kv_mem::Region;

use crate::pattern;
use crate::setup::{agent_with, crc_of, fill_region, kv_buffer, TransferArgs, SEED};

/// The attribute in which the passive side publishes its verdict.
const RESULT_ATTRIBUTE: &str = "kv-bench/result";
/// How long the active side waits for the passive side's verdict (it checks every byte).
const VERDICT_WAIT: Duration = Duration::from_secs(120);

/// The passive side: owns a buffer, listens, answers until told it is done.
pub fn run_passive(args: &TransferArgs) -> Result<()> {
    let layout = args.layout()?;
    let listen: SocketAddr = kv_agent_addr(&args.listen)?;
    let child = std::env::var_os("KV_BENCH_CHILD").is_some();
    let (secret, generated) = match args.given_secret()? {
        Some(s) => (s, false),
        None => (ClusterSecret::generate()?, true),
    };
    let agent = agent_with(
        "decode",
        &args.backend,
        &args.params,
        AgentOptions {
            progress_thread: true,
            secret: Some(secret.clone()),
            // Listeners bind where the side channel does (loopback unless told).
            bind_ip: if listen.ip().is_loopback() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                listen.ip()
            },
            ..Default::default()
        },
    )?;
    let mut buf = kv_buffer(layout.total_bytes(), 2, args.memory)?;
    if args.op() == Op::Read {
        fill_region(&mut buf);
    }
    let region = Region::new(buf);
    let _reg = agent.register(&region)?;
    let addr = agent.listen(listen)?;
    println!("KVBENCH READY {addr}");
    let _ = std::io::stdout().flush();
    if !child {
        eprintln!(
            "passive side listening on {addr} ({} MiB, backends {:?})",
            layout.total_bytes() >> 20,
            agent.backends()
        );
        if generated {
            eprintln!(
                "no --secret or {SECRET_ENV} given: generated a cluster secret for this run \
                 (fingerprint {}). Start the active side with\n  {SECRET_ENV}={} kv-bench \
                 transfer --peer {addr} [same --model/--tokens/--op/--backend]",
                secret.fingerprint(),
                secret.to_hex()
            );
        }
    }

    // Exit if the parent goes away (stdin closes) when we were spawned by it.
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    if child {
        std::thread::spawn(move || {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                sink.clear();
            }
            let _ = eof_tx.send(());
        });
    }
    // Before the active side shows up it may take a while (another host); once it did,
    // its heartbeat must never pause for a whole deadline.
    let first_contact = args.deadline() * 10;
    let silence = args.deadline();
    let started = Instant::now();
    let mut last: Option<Instant> = None;
    let mut verdict: Option<String> = None;
    loop {
        if eof_rx.try_recv().is_ok() {
            return Err(Error::RemoteDisconnected {
                peer: "active side".into(),
                reason: "stdin closed".into(),
            });
        }
        for n in agent.notifications()? {
            if last.is_none() {
                println!("KVBENCH PEER {}", n.peer);
                let _ = std::io::stdout().flush();
            }
            last = Some(Instant::now());
            if n.payload.starts_with(b"BYE") {
                return Ok(());
            }
            if n.payload.starts_with(b"DONE") && verdict.is_none() {
                // SAFETY: DONE follows every transfer's data on the same backend, and the
                // active side posts nothing after it.
                let bytes = unsafe { region.memory() }.as_slice();
                let v = if args.check && args.op() == Op::Write {
                    match pattern::first_mismatch(bytes, SEED, 0) {
                        None => "verified".to_string(),
                        Some(off) => format!("MISMATCH at byte {off}"),
                    }
                } else {
                    "unchecked".to_string()
                };
                let v = format!("{v} crc32c={:08x}", crc_of(bytes));
                agent.set_attributes(vec![(RESULT_ATTRIBUTE.into(), Bytes::from(v.clone()))])?;
                println!("KVBENCH RESULT {v}");
                let _ = std::io::stdout().flush();
                verdict = Some(v);
                last = Some(Instant::now());
            }
        }
        match last {
            // The verdict is published; the active side went away without a goodbye.
            Some(t) if verdict.is_some() && t.elapsed() > silence => return Ok(()),
            Some(t) if t.elapsed() > silence => {
                return Err(Error::RemoteDisconnected {
                    peer: "active side".into(),
                    reason: format!(
                        "no heartbeat for {}s (--deadline): it died or is stalled",
                        silence.as_secs()
                    ),
                })
            }
            None if started.elapsed() > first_contact => {
                return Err(Error::TimedOut {
                    what: "waiting for the active side to connect".into(),
                    after: first_contact,
                })
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `addr` as a socket address (resolving a host name).
fn kv_agent_addr(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| Error::invalid_argument(format!("--listen {addr}: {e}")))?
        .next()
        .ok_or_else(|| Error::invalid_argument(format!("--listen {addr} resolves to nothing")))
}

/// Notifies `peer` every `every` from a thread until dropped, so the passive side knows
/// this side is alive.
pub(crate) struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub(crate) fn start(agent: &Agent, peer: PeerId, every: Duration) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (agent.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                if a.notify(peer, Bytes::from_static(b"HB")).is_err() {
                    return;
                }
                let end = Instant::now() + every;
                while Instant::now() < end && !s.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Heartbeat {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The passive side as the active side sees it: a child it spawned, or an address.
pub(crate) struct Passive {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Its side channel.
    pub(crate) addr: String,
}

impl Passive {
    /// The process id of a spawned passive side (`None` for one on another host).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A passive side already running at `addr` (two hosts).
    pub(crate) fn at(addr: &str) -> Passive {
        Passive {
            child: None,
            lines: mpsc::channel().1,
            addr: addr.to_string(),
        }
    }

    pub(crate) fn spawn(args: &TransferArgs, secret: &ClusterSecret) -> Result<Passive> {
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding kv-bench's own path", e))?;
        let mut child = Command::new(exe)
            .args(args.passive_args())
            .env("KV_BENCH_CHILD", "1")
            .env(SECRET_ENV, secret.to_hex())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io("spawning the passive side", e))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| Error::invalid_argument("child has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Passive {
            child: Some(child),
            lines: rx,
            addr: String::new(),
        };
        let ready = p.expect("KVBENCH READY ", Duration::from_secs(120))?;
        p.addr = ready.trim().to_string();
        Ok(p)
    }

    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Ok(rest.to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::TimedOut {
                        what: format!("passive side to print {prefix:?}"),
                        after: timeout,
                    })
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    return Err(Error::RemoteDisconnected {
                        peer: "passive side".into(),
                        reason: format!("exited ({status:?}) before printing {prefix:?}"),
                    });
                }
            }
        }
    }
}

impl Drop for Passive {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The passive side's verdict on a WRITE, from the attribute it publishes after DONE
/// (fetched again until it shows up; the passive side checks every byte first).
pub(crate) fn passive_verdict(agent: &Agent, addr: &str, peer: PeerId) -> Result<String> {
    let end = Instant::now() + VERDICT_WAIT;
    loop {
        let now = agent.fetch_remote(addr)?;
        let attrs = agent.peer_attributes(now)?;
        if let Some((_, v)) = attrs.iter().find(|(k, _)| k == RESULT_ATTRIBUTE) {
            return Ok(String::from_utf8_lossy(v).into_owned());
        }
        if now != peer {
            return Err(Error::RemoteDisconnected {
                peer: "passive side".into(),
                reason: "it restarted before publishing its verdict".into(),
            });
        }
        if Instant::now() > end {
            return Err(Error::TimedOut {
                what: "the passive side's verdict".into(),
                after: VERDICT_WAIT,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
