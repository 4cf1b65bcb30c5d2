//! The reference re-layout for engine tests: every element of a KV cache gets a value
//! computed from its logical coordinates, so a destination rank's expected memory can
//! be written element by element, independently of the lists kv-agent builds.

use kv_agent::layout::KvLayout;

/// The bytes of element (layer, plane, token, global head, dim): distinct for every
/// element and byte.
pub fn value(layer: u32, plane: u32, token: u64, head: u32, dim: u32, byte: u64) -> u8 {
    let x = (layer as u64) << 40
        | (plane as u64) << 36
        | token << 20
        | (head as u64) << 12
        | (dim as u64) << 4
        | byte;
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// Writes the values of tokens `0..tokens` of a request held in `blocks` into `image`,
/// the memory of `l` (one allocation starting at `base`), for every head `l` holds.
pub fn write_values(l: &KvLayout, image: &mut [u8], base: u64, blocks: &[u32], tokens: u64) {
    let bt = l.block_tokens as u64;
    let e = l.dtype.bytes();
    for layer in 0..l.layers {
        for plane in 0..l.planes() {
            for t in 0..tokens {
                for head in l.first_head..l.first_head + l.heads_held {
                    for dim in 0..l.head_dim {
                        let a = l
                            .element_addr(
                                layer,
                                plane,
                                blocks[(t / bt) as usize] as u64,
                                (t % bt) as u32,
                                head,
                                dim,
                            )
                            .unwrap();
                        for b in 0..e {
                            image[(a - base + b) as usize] = value(layer, plane, t, head, dim, b);
                        }
                    }
                }
            }
        }
    }
}

/// The source rank's memory: every token of the request's blocks (whole blocks).
pub fn source_image(l: &KvLayout, base: u64, len: usize, blocks: &[u32], tokens: u64) -> Vec<u8> {
    let mut v = vec![0x11; len];
    let whole = tokens.div_ceil(l.block_tokens as u64) * l.block_tokens as u64;
    write_values(l, &mut v, base, blocks, whole);
    v
}

/// What a destination rank must hold afterwards: `initial`, with every head it holds
/// for the request's tokens rounded up to `chunk` tokens (transfers move whole chunks).
pub fn expected_image(
    l: &KvLayout,
    initial: &[u8],
    base: u64,
    blocks: &[u32],
    tokens: u64,
    chunk: u64,
) -> Vec<u8> {
    let mut v = initial.to_vec();
    write_values(l, &mut v, base, blocks, tokens.div_ceil(chunk) * chunk);
    v
}

/// The first byte where two images differ.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|i| a.get(*i) != b.get(*i))
}

/// A child process running this test binary's `entry` test with `KV_ENGINE_CHILD` set,
/// read line by line; killed on drop.
pub struct Child {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Child {
    /// Starts the child; it runs the test named `entry`.
    pub fn spawn(entry: &str) -> Child {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", entry, "--nocapture", "--test-threads=1"])
            .env("KV_ENGINE_CHILD", "1")
            // The child's agent reads the parent's cluster secret from KVX_SECRET.
            .env(kv_agent::SECRET_ENV, super::secret().to_hex())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Child { child, lines: rx }
    }

    /// The rest of the first line containing `prefix` within 30 s (panics otherwise).
    pub fn expect(&mut self, prefix: &str) -> String {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < end {
            if let Ok(l) = self
                .lines
                .recv_timeout(std::time::Duration::from_millis(100))
            {
                // libtest may print "test entry ... " before the child's first line.
                if let Some(i) = l.find(prefix) {
                    return l[i + prefix.len()..].to_string();
                }
            }
        }
        panic!("child did not print {prefix:?} within 30 s");
    }

    /// Sends one line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True in the child process of a [`Child`].
pub fn is_child() -> bool {
    std::env::var_os("KV_ENGINE_CHILD").is_some()
}

/// Lines from this process's stdin (the parent's commands), on a channel; closed when
/// the parent closes stdin or dies.
pub fn commands() -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if tx.send(s.trim().to_string()).is_err() {
                break;
            }
            s.clear();
        }
    });
    rx
}
