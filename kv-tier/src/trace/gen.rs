//! A generator of realistic synthetic traces in the Mooncake format.
//!
//! Sessions of three kinds run concurrently and interleave, each starting from one of a
//! set of shared system prompts picked with Zipfian popularity:
//!
//! * **chat** — multi-turn conversations: every turn resends the whole conversation
//!   (system prompt, earlier messages and answers) plus a new user message, after a
//!   think time of tens of seconds; some finished conversations are resumed much later;
//! * **agent** — tool/agent loops: a large system prompt (tool definitions), then many
//!   quick steps, each appending a tool result and the model's last output;
//! * **one-shot** — a system prompt and a unique question, never continued.
//!
//! Full blocks keep their hash id for the rest of the session; a request's last,
//! partial block gets a fresh id (its content changes when the session continues), as
//! in Mooncake's traces. Deterministic for a seed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{mix, Request, Trace};

/// Parameters of [`generate`]. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// Preset name, carried into the trace's name.
    pub name: &'static str,
    /// Requests in the trace.
    pub requests: usize,
    /// Sessions in flight at any time.
    pub concurrency: usize,
    /// Distinct shared system prompts.
    pub system_prompts: usize,
    /// Zipf exponent of system-prompt popularity.
    pub zipf_s: f64,
    /// Mean tokens of a chat / one-shot system prompt.
    pub system_tokens: usize,
    /// Mean tokens of an agent's system prompt (tool definitions).
    pub agent_system_tokens: usize,
    /// Share of chat sessions (0..=1).
    pub chat_share: f64,
    /// Share of agent sessions (0..=1); the rest are one-shot.
    pub agent_share: f64,
    /// Mean turns of a chat.
    pub chat_turns: usize,
    /// Mean tokens of a user message.
    pub user_tokens: usize,
    /// Mean tokens of an answer.
    pub answer_tokens: usize,
    /// Mean think time between chat turns (ms).
    pub think_ms: u64,
    /// Probability that a new chat session resumes an earlier, finished conversation.
    pub resume_share: f64,
    /// Mean steps of an agent loop.
    pub agent_steps: usize,
    /// Mean tokens of a tool result.
    pub tool_tokens: usize,
    /// Mean time between agent steps (ms).
    pub step_ms: u64,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Random seed.
    pub seed: u64,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams::mixed()
    }
}

impl GenParams {
    /// Chats, agents and one-shot requests mixed (the default).
    pub fn mixed() -> Self {
        GenParams {
            name: "mixed",
            requests: 20_000,
            concurrency: 64,
            system_prompts: 40,
            zipf_s: 1.0,
            system_tokens: 2048,
            agent_system_tokens: 6144,
            chat_share: 0.5,
            agent_share: 0.25,
            chat_turns: 6,
            user_tokens: 300,
            answer_tokens: 400,
            think_ms: 30_000,
            resume_share: 0.2,
            agent_steps: 16,
            tool_tokens: 600,
            step_ms: 3_000,
            block_tokens: 512,
            seed: 1,
        }
    }

    /// Mostly multi-turn chat on shared system prompts.
    pub fn chat() -> Self {
        GenParams {
            name: "chat",
            chat_share: 0.85,
            agent_share: 0.0,
            seed: 2,
            ..GenParams::mixed()
        }
    }

    /// Mostly tool/agent loops.
    pub fn agent() -> Self {
        GenParams {
            name: "agent",
            chat_share: 0.1,
            agent_share: 0.8,
            concurrency: 32,
            seed: 3,
            ..GenParams::mixed()
        }
    }
}

#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-normal-ish around `mean` (× e^N(0, 0.5)), at least 1.
    fn around(&mut self, mean: usize) -> usize {
        // Irwin–Hall(4) approximates a normal well enough here.
        let n = (0..4).map(|_| self.unit()).sum::<f64>() - 2.0;
        let f = (n * 0.5 * 3f64.sqrt()).exp() / 0.125f64.exp();
        ((mean.max(1) as f64) * f).round().max(1.0) as usize
    }

    /// Exponential with mean `m` (ms).
    fn exp_ms(&mut self, m: u64) -> u64 {
        (-(1.0 - self.unit()).ln() * m as f64) as u64
    }
}

struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|i| {
                acc += 1.0 / (i as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|c| *c < u).min(self.0.len() - 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Agent,
    OneShot,
}

#[derive(Debug, Clone)]
struct Session {
    kind: Kind,
    /// Hash ids of the full blocks so far.
    ids: Vec<u64>,
    /// Tokens so far (the last `tokens % block` of them in a partial block).
    tokens: usize,
    /// Requests left.
    left: usize,
    /// Tokens the model answers to the next request.
    answer: usize,
}

struct Gen<'a> {
    p: &'a GenParams,
    rng: Rng,
    next_id: u64,
    /// Per system prompt: its token count and the ids of its full blocks.
    prompts: Vec<(usize, Vec<u64>)>,
    agent_prompts: Vec<(usize, Vec<u64>)>,
    zipf: Zipf,
    parked: Vec<Session>,
}

impl Gen<'_> {
    fn fresh(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn prompt(&mut self, tokens: usize) -> (usize, Vec<u64>) {
        let full = tokens / self.p.block_tokens;
        (tokens, (0..full).map(|_| self.fresh()).collect())
    }

    fn new_session(&mut self) -> Session {
        let u = self.rng.unit();
        let kind = if u < self.p.chat_share {
            Kind::Chat
        } else if u < self.p.chat_share + self.p.agent_share {
            Kind::Agent
        } else {
            Kind::OneShot
        };
        if kind == Kind::Chat && !self.parked.is_empty() && self.rng.unit() < self.p.resume_share {
            let i = (self.rng.next() % self.parked.len() as u64) as usize;
            let mut s = self.parked.swap_remove(i);
            s.left = self.rng.around(self.p.chat_turns.div_ceil(2));
            return s;
        }
        let pick = self.zipf.sample(&mut self.rng);
        let (tokens, ids) = match kind {
            Kind::Agent => self.agent_prompts[pick].clone(),
            _ => self.prompts[pick].clone(),
        };
        let left = match kind {
            Kind::Chat => self.rng.around(self.p.chat_turns),
            Kind::Agent => self.rng.around(self.p.agent_steps),
            Kind::OneShot => 1,
        };
        Session {
            kind,
            ids,
            tokens,
            left,
            answer: 0,
        }
    }

    /// Appends the next request of `s`, at `now`.
    fn step(&mut self, s: &mut Session, now: u64, out: &mut Vec<Request>) {
        let add = s.answer
            + match s.kind {
                Kind::Agent if s.answer > 0 => self.rng.around(self.p.tool_tokens),
                _ => self.rng.around(self.p.user_tokens),
            };
        s.tokens += add;
        let b = self.p.block_tokens;
        while s.ids.len() < s.tokens / b {
            let id = self.fresh();
            s.ids.push(id);
        }
        let mut hash_ids = s.ids.clone();
        if s.tokens % b != 0 {
            hash_ids.push(self.fresh());
        }
        let output = match s.kind {
            Kind::Agent => self.rng.around(self.p.answer_tokens / 3),
            _ => self.rng.around(self.p.answer_tokens),
        };
        out.push(Request {
            timestamp: now,
            input_length: s.tokens as u64,
            output_length: output as u64,
            hash_ids,
        });
        s.answer = output;
        s.left = s.left.saturating_sub(1);
    }
}

/// Generates a trace (see the module docs).
pub fn generate(p: &GenParams) -> Trace {
    let mut g = Gen {
        p,
        rng: Rng(p.seed),
        next_id: 0,
        prompts: Vec::new(),
        agent_prompts: Vec::new(),
        zipf: Zipf::new(p.system_prompts.max(1), p.zipf_s),
        parked: Vec::new(),
    };
    for _ in 0..p.system_prompts.max(1) {
        let t = g.rng.around(p.system_tokens);
        let pr = g.prompt(t);
        g.prompts.push(pr);
        let t = g.rng.around(p.agent_system_tokens);
        let pr = g.prompt(t);
        g.agent_prompts.push(pr);
    }
    let mut sessions: Vec<Option<Session>> = Vec::new();
    let mut heap = BinaryHeap::new();
    for i in 0..p.concurrency.max(1) {
        sessions.push(None);
        // Staggered starts over one think time.
        let t = g.rng.next() % p.think_ms.max(1);
        heap.push(Reverse((t, i)));
    }
    let mut out = Vec::with_capacity(p.requests);
    while out.len() < p.requests {
        let Some(Reverse((now, i))) = heap.pop() else {
            break;
        };
        let mut s = match sessions[i].take() {
            Some(s) => s,
            None => g.new_session(),
        };
        g.step(&mut s, now, &mut out);
        let gap = if s.left == 0 {
            if s.kind == Kind::Chat {
                g.parked.push(s);
            }
            // The next session in this slot starts soon.
            g.rng.exp_ms(p.step_ms)
        } else {
            let gap = match s.kind {
                Kind::Agent => g.rng.exp_ms(p.step_ms),
                _ => g.rng.exp_ms(p.think_ms),
            };
            sessions[i] = Some(s);
            gap
        };
        heap.push(Reverse((now + gap.max(1), i)));
    }
    Trace {
        name: format!("{} (seed {})", p.name, p.seed),
        block_tokens: p.block_tokens,
        requests: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_prefix_consistent_and_shaped() {
        let p = GenParams {
            requests: 3000,
            ..GenParams::mixed()
        };
        let a = generate(&p);
        assert_eq!(a, generate(&p));
        assert_eq!(a.requests.len(), 3000);
        assert!(a
            .requests
            .windows(2)
            .all(|w| w[0].timestamp <= w[1].timestamp));
        // Prefix consistency: a hash id always follows the same prefix.
        let mut parent = std::collections::HashMap::new();
        for r in &a.requests {
            let mut prev = None;
            for id in &r.hash_ids {
                assert_eq!(*parent.entry(*id).or_insert(prev), prev, "id {id}");
                prev = Some(*id);
            }
            let blocks = (r.input_length as usize).div_ceil(p.block_tokens);
            assert_eq!(r.hash_ids.len(), blocks);
        }
        // Reuse: shared prompts and continued sessions make most blocks repeat.
        assert!(
            a.unique_blocks() * 2 < a.blocks(),
            "{} {}",
            a.unique_blocks(),
            a.blocks()
        );
        assert_ne!(generate(&GenParams { seed: 9, ..p }), a);
    }
}
