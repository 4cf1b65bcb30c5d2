//! The other process of a two-process test or bench: this binary run again, talking
//! line by line over its stdin and stdout (`tests/two_process.rs`,
//! `benches/two_process.rs`, each including this file with `#[path]`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the parent waits for one line of the child.
const LINE_WAIT: Duration = Duration::from_secs(20);

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of hex text `s`; `None` when it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// In the child: this process's stdin, line by line, read on a thread of its own (the
/// child polls it between rounds of work).
pub fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// In the parent: the child process, its stdin, and its stdout's lines.
pub struct ChildProc {
    /// The process.
    pub child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl ChildProc {
    /// Starts `cmd` (this binary with what makes it the child) with piped stdin/stdout.
    pub fn spawn(mut cmd: Command) -> ChildProc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // A libtest child prints "test <name> ... " before its first line.
                let line = match line.split_once(" ... ") {
                    Some((t, rest)) if t.starts_with("test ") => rest.to_owned(),
                    _ => line,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProc {
            child,
            stdin,
            lines,
        }
    }

    /// The rest of the child's next line that starts with `prefix` (earlier lines are
    /// skipped); panics after 20 s.
    pub fn expect(&self, prefix: &str) -> String {
        let end = Instant::now() + LINE_WAIT;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let line = self.lines.recv_timeout(left).expect("the child's output");
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
        panic!("the child did not print {prefix}");
    }

    /// Sends the child one line.
    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write to the child");
        self.stdin.flush().expect("flush");
    }

    /// Sends `cmd` and returns the rest of the child's answer line (`"<cmd> …"`).
    pub fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.expect(&format!("{cmd} "))
    }

    /// Sends the child `sig` (it may have exited: harmless).
    pub fn signal_quietly(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for ChildProc {
    /// Wakes the child (if stopped), asks it to exit, waits up to 10 s, then kills it.
    fn drop(&mut self) {
        self.signal_quietly(libc::SIGCONT);
        let _ = writeln!(self.stdin, "EXIT");
        let _ = self.stdin.flush();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
