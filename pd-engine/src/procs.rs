//! Prefill worker processes as the decode worker sees them: the binary re-spawned in
//! the `prefill-worker` role (one process per TP rank), a bounded wait for each to come
//! up, its request queue (stdin), and SIGKILL + reap when a group is dropped or fails.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kv_agent::layout::{KvLayout as AgentLayout, Side};
use kv_agent::{Agent, KvLists, PeerId, SECRET_ENV};
use pd_engine::{Error, Result};

use crate::proto::PrefillRequest;

/// A child process, SIGKILLed and reaped on drop (after its stdin closes).
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF: a live worker exits by itself
        let _ = self.child.kill(); // already gone: nothing to do
        let _ = self.child.wait();
    }
}

/// One rank's process and what the decode worker keeps about it.
pub struct RankProc {
    proc_: Proc,
    /// Its agent, as a peer of ours.
    pub peer: PeerId,
    /// Pull mode: READ lists from its blocks into ours.
    pub pull_lists: Option<KvLists>,
}

/// A prefill worker: its TP ranks.
pub struct Group {
    /// The ranks, by rank.
    pub ranks: Vec<RankProc>,
    /// False once a rank died, missed a deadline or was killed: no more requests.
    pub alive: bool,
}

/// How to start a group.
pub struct Spawn<'a> {
    /// Index of the group (names its agents).
    pub index: usize,
    /// TP ranks.
    pub tp: usize,
    /// Our side channel.
    pub decode_addr: String,
    /// The cluster secret (hex), handed to the children in `KVX_SECRET`.
    pub secret_hex: String,
    /// The model and engine arguments, passed on unchanged.
    pub model_args: Vec<String>,
    /// Pull mode.
    pub pull: bool,
    /// Prefix store per rank, MiB.
    pub tier_mb: usize,
    /// Bounded wait for every rank to report READY.
    pub ready_timeout: Duration,
    /// Our agent and KV layout (pull mode prepares READ lists from it).
    pub agent: &'a Agent,
    /// Our published layout.
    pub layout: &'a AgentLayout,
}

impl Group {
    /// Starts every rank and waits (bounded) until each is up and known to our agent.
    pub fn spawn(s: &Spawn<'_>) -> Result<Group> {
        let exe = std::env::current_exe().map_err(|e| Error::role("finding our binary", e))?;
        let mut started = Vec::new();
        for rank in 0..s.tp {
            let mut cmd = Command::new(&exe);
            cmd.arg("prefill-worker")
                .args(["--decode", &s.decode_addr])
                .args(["--rank", &rank.to_string(), "--tp", &s.tp.to_string()])
                .args(["--tier-mb", &s.tier_mb.to_string()])
                .args(["--name", &format!("prefill-{}-{rank}", s.index)])
                .args(&s.model_args)
                .env(SECRET_ENV, &s.secret_hex)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if s.pull {
                cmd.arg("--pull");
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| Error::role("starting a prefill worker", e))?;
            let stdout = child.stdout.take();
            let stdin = child.stdin.take();
            let (tx, rx) = mpsc::channel();
            if let Some(out) = stdout {
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
            }
            started.push((child, stdin, rx));
        }
        // Until every rank is connected, dropping `guard` kills them all.
        let mut guard: Vec<(Proc, mpsc::Receiver<String>)> = started
            .into_iter()
            .map(|(child, stdin, rx)| (Proc { child, stdin }, rx))
            .collect();
        let end = Instant::now() + s.ready_timeout;
        let mut addrs = Vec::new();
        for (_, rx) in &mut guard {
            let addr = loop {
                let left = end.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(l) => {
                        if let Some(a) = l.strip_prefix("READY ") {
                            break a.trim().to_string();
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        return Err(Error::role(
                            format!("prefill worker {}", s.index),
                            format!("not ready within {:?}", s.ready_timeout),
                        ))
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(Error::role(
                            format!("prefill worker {}", s.index),
                            "exited before it was ready (its error is above)",
                        ))
                    }
                }
            };
            addrs.push(addr);
        }
        let mut conns = Vec::new();
        for addr in &addrs {
            let peer = s.agent.fetch_remote(addr.as_str())?;
            s.agent.make_connection(peer)?;
            let lists = if s.pull {
                Some(
                    s.agent
                        .prepare_kv_lists(peer, s.layout, Side::Destination)?,
                )
            } else {
                None
            };
            conns.push((peer, lists));
        }
        let ranks = guard
            .into_iter()
            .zip(conns)
            .map(|((proc_, _), (peer, pull_lists))| RankProc {
                proc_,
                peer,
                pull_lists,
            })
            .collect();
        Ok(Group { ranks, alive: true })
    }

    /// Queues `req` on every rank; a closed pipe marks the group dead.
    pub fn send(&mut self, req: &PrefillRequest) -> bool {
        let line = req.to_line();
        for r in &mut self.ranks {
            let ok = r
                .proc_
                .stdin
                .as_mut()
                .map(|s| writeln!(s, "{line}").and_then(|()| s.flush()).is_ok())
                .unwrap_or(false);
            if !ok {
                self.alive = false;
            }
        }
        self.alive
    }

    /// True when a rank's process exited (it is reaped).
    pub fn exited(&mut self) -> bool {
        self.ranks
            .iter_mut()
            .any(|r| !matches!(r.proc_.child.try_wait(), Ok(None)))
    }

    /// SIGKILLs every rank (fault injection, or a missed deadline) and reaps it.
    pub fn kill(&mut self) {
        for r in &mut self.ranks {
            let _ = r.proc_.child.kill(); // an exited child: nothing to kill
            let _ = r.proc_.child.wait();
        }
        self.alive = false;
    }
}
