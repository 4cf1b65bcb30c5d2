//! The decode worker (decode-centric, as Dynamo): it takes every request, asks
//! kv-agent's `should_offload_prefill` whether to prefill locally or on a prefill
//! worker, receives the remote KV straight into its own engine-owned blocks (WRITE,
//! layer by layer) or READs it (`--pull`), and decodes. A prefill worker that dies,
//! fails or misses the deadline costs a local recompute, never a hang.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use kv_agent::{
    should_offload_prefill, Agent, AgentOptions, BlockLoad, LayerwiseReceiver, LoadFailurePolicy,
    LoadOutcome, OffloadThresholds, TransferOptions,
};
use kv_core::auth::ClusterSecret;
use pd_engine::kvnet::register_cache;
use pd_engine::{Engine, Error, Result, Sequence, TpRank};

use crate::procs::{Group, Spawn};
use crate::proto::{Note, PrefillRequest, WorkerStats};
use crate::stats::Metrics;

/// How the disaggregated run is set up.
#[derive(Debug, Clone)]
pub struct DisaggOptions {
    /// Prefill workers (each a TP group of `tp` processes).
    pub prefill: usize,
    /// TP size of a prefill worker.
    pub tp: usize,
    /// READ from the prefill worker instead of it WRITEing.
    pub pull: bool,
    /// Prefix store per prefill rank, MiB (0: none).
    pub tier_mb: usize,
    /// The offload gate's thresholds.
    pub thresholds: OffloadThresholds,
    /// Requests in flight (prefilling or decoding) at once.
    pub max_batch: usize,
    /// A remote prefill not done within this is recomputed locally (its worker killed).
    pub remote_deadline: Duration,
    /// Fault injection: SIGKILL the worker of the n-th remote request right after
    /// queueing it.
    pub kill_after: Option<usize>,
    /// Tokens to generate per prompt.
    pub max_new: usize,
    /// Model and engine arguments for the children.
    pub model_args: Vec<String>,
}

/// A request whose prefill runs remotely.
struct Remote {
    idx: usize,
    seq: Sequence,
    group: usize,
    admitted: Instant,
    sent: Instant,
    notes: Vec<Option<(u32, WorkerStats)>>,
    loads: Vec<Option<BlockLoad>>,
    loaded: Vec<bool>,
    load_started: Option<Instant>,
    failed: bool,
}

/// A request with its prompt's KV in place, decoding.
struct Running {
    idx: usize,
    seq: Sequence,
    admitted: Instant,
    ready: Instant,
    split: (Duration, Duration, Duration),
    stepped: bool,
    remote: bool,
}

/// The run's outputs, in prompt order, and its measurements.
pub struct Outcome {
    /// Generated tokens per prompt.
    pub outputs: Vec<Vec<u32>>,
    /// What was measured.
    pub metrics: Metrics,
}

fn cluster_secret() -> Result<ClusterSecret> {
    match std::env::var(kv_agent::SECRET_ENV) {
        Ok(hex) => ClusterSecret::from_hex(&hex).map_err(Error::from),
        Err(_) => ClusterSecret::generate().map_err(Error::from),
    }
}

/// Serves `prompts` with `opts.prefill` prefill workers started as child processes.
#[allow(unsafe_code)] // registers the engine-owned KV planes
pub fn serve(
    mut engine: Engine,
    prompts: &[Vec<u32>],
    opts: &DisaggOptions,
    on_done: &mut dyn FnMut(),
) -> Result<Outcome> {
    let secret = cluster_secret()?;
    let agent = Agent::new(
        "decode-0",
        AgentOptions {
            progress_thread: true,
            default_deadline: crate::worker::DEADLINE,
            secret: Some(secret.clone()),
            ..Default::default()
        },
    )?;
    agent.add_backend("tcp", &Default::default())?;
    let kv_heads = engine.model().config().kv_heads;
    // SAFETY: `engine` is owned by this function and declared before `_regs`, so the
    // registrations (and the groups, whose transfers name them) drop first; its cache
    // is never replaced.
    let (_regs, layout) =
        unsafe { register_cache(&agent, engine.cache(), kv_heads, TpRank::SINGLE) }?;
    let addr = agent.listen("127.0.0.1:0")?;
    let mut groups = Vec::new();
    for index in 0..opts.prefill {
        groups.push(Group::spawn(&Spawn {
            index,
            tp: opts.tp,
            decode_addr: addr.to_string(),
            secret_hex: secret.to_hex(),
            model_args: opts.model_args.clone(),
            pull: opts.pull,
            tier_mb: opts.tier_mb,
            ready_timeout: Duration::from_secs(60),
            agent: &agent,
            layout: &layout,
        })?);
    }
    let mut d = Decode {
        engine: &mut engine,
        agent: &agent,
        groups: &mut groups,
        rx: LayerwiseReceiver::new(),
        remote: BTreeMap::new(),
        running: Vec::new(),
        outputs: vec![None; prompts.len()],
        metrics: Metrics::default(),
        committed: Vec::new(),
        sent: 0,
        opts,
    };
    d.run(prompts, on_done)?;
    let outputs = d
        .outputs
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    Ok(Outcome {
        outputs,
        metrics: d.metrics,
    })
}

struct Decode<'a> {
    engine: &'a mut Engine,
    agent: &'a Agent,
    groups: &'a mut Vec<Group>,
    rx: LayerwiseReceiver,
    remote: BTreeMap<u64, Remote>,
    running: Vec<Running>,
    outputs: Vec<Option<Vec<u32>>>,
    metrics: Metrics,
    /// Blocks reserved per admitted request (prompt plus generation), by prompt index.
    committed: Vec<(usize, usize)>,
    sent: usize,
    opts: &'a DisaggOptions,
}

impl Decode<'_> {
    fn run(&mut self, prompts: &[Vec<u32>], on_done: &mut dyn FnMut()) -> Result<()> {
        let mut pending: VecDeque<usize> = (0..prompts.len()).collect();
        let total = self.engine.allocator().total();
        let bt = self.engine.layout().block_tokens;
        while self.outputs.iter().any(Option::is_none) {
            // Admit while the batch and the block pool (reserved to each request's end)
            // allow.
            while self.running.len() + self.remote.len() < self.opts.max_batch.max(1) {
                let Some(&idx) = pending.front() else { break };
                let need = (prompts[idx].len() + self.opts.max_new).div_ceil(bt);
                let used: usize = self.committed.iter().map(|c| c.1).sum();
                if used + need > total {
                    if self.committed.is_empty() {
                        return Err(Error::OutOfBlocks {
                            needed: need,
                            free: total,
                        });
                    }
                    break;
                }
                pending.pop_front();
                self.committed.push((idx, need));
                if !self.admit(idx, &prompts[idx])? {
                    // One local prefill per iteration, then a decode step for the
                    // running batch (the stall a local prefill costs is one prefill).
                    break;
                }
            }
            let mut busy = self.receive()?;
            busy |= self.advance_remote()?;
            busy |= self.decode_steps(on_done)?;
            if !busy {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// Admits one request: queued on a prefill worker (true) or prefilled here (false).
    fn admit(&mut self, idx: usize, prompt: &[u32]) -> Result<bool> {
        let admitted = Instant::now();
        let mut seq = self.engine.start(prompt.to_vec())?;
        let alive: Vec<usize> = (0..self.groups.len())
            .filter(|g| self.groups[*g].alive)
            .collect();
        let offload = !alive.is_empty()
            && should_offload_prefill(
                prompt.len() as u64,
                0,
                self.remote.len(),
                &self.opts.thresholds,
            );
        if offload {
            // Prefix affinity: prompts that share a first block go to the same worker,
            // whose prefix store holds it.
            let first = self.engine.block_hashes(prompt).first().map_or(0, |h| h.0);
            let g = alive[(first % alive.len() as u128) as usize];
            let req = PrefillRequest {
                id: idx as u64,
                dst_blocks: seq.blocks().to_vec(),
                tokens: prompt.to_vec(),
            };
            if self.groups[g].send(&req) {
                let tp = self.opts.tp;
                self.remote.insert(
                    idx as u64,
                    Remote {
                        idx,
                        seq,
                        group: g,
                        admitted,
                        sent: Instant::now(),
                        notes: vec![None; tp],
                        loads: (0..tp).map(|_| None).collect(),
                        loaded: vec![false; tp],
                        load_started: None,
                        failed: false,
                    },
                );
                self.metrics.remote += 1;
                self.sent += 1;
                if self.opts.kill_after == Some(self.sent) {
                    self.groups[g].kill();
                }
                return Ok(true);
            }
        }
        let t = Instant::now();
        self.engine.prefill_sequence(&mut seq, 0)?;
        self.metrics.local += 1;
        self.start_decoding(
            idx,
            seq,
            admitted,
            (Duration::ZERO, t.elapsed(), Duration::ZERO),
            false,
        );
        Ok(false)
    }

    /// Takes the notifications that arrived; starts pull loads.
    fn receive(&mut self) -> Result<bool> {
        let n = self.rx.pump(self.agent)?;
        for n in self.rx.take_unrelated() {
            let note = match Note::decode(&n.payload) {
                Some(Ok(note)) => note,
                Some(Err(e)) => {
                    eprintln!("decode: a bad message from {}: {e}", n.peer);
                    continue;
                }
                None => continue,
            };
            let (id, rank) = match &note {
                Note::Written { id, rank, .. }
                | Note::Ready { id, rank, .. }
                | Note::Failed { id, rank } => (*id, *rank as usize),
            };
            let Some(r) = self.remote.get_mut(&id) else {
                continue; // recomputed already
            };
            if rank >= r.notes.len() {
                continue;
            }
            match note {
                Note::Failed { .. } => r.failed = true,
                Note::Written { first, stats, .. } => r.notes[rank] = Some((first, stats)),
                Note::Ready {
                    first,
                    stats,
                    src_blocks,
                    ..
                } => {
                    r.notes[rank] = Some((first, stats));
                    let proc_ = &self.groups[r.group].ranks[rank];
                    let started = proc_.pull_lists.as_ref().map(|lists| {
                        let items = lists.items(
                            &src_blocks,
                            r.seq.blocks(),
                            r.seq.prompt().len() as u64,
                        )?;
                        let ts = lists.layer_transfers(&items, &TransferOptions::default())?;
                        Ok::<_, kv_core::Error>((ts.iter().map(|t| t.bytes()).sum::<u64>(), ts))
                    });
                    match started {
                        Some(Ok((bytes, ts))) => {
                            self.metrics.bytes += bytes;
                            // From the last rank's ready: the READs themselves.
                            r.load_started = Some(Instant::now());
                            r.loads[rank] = Some(BlockLoad::start(
                                self.agent,
                                ts,
                                r.seq.blocks().to_vec(),
                                LoadFailurePolicy::Recompute,
                                Some((proc_.peer, format!("r{id}"))),
                            ));
                        }
                        Some(Err(e)) => {
                            eprintln!("decode: request {id}: preparing the READ: {e}");
                            r.failed = true;
                        }
                        None => r.failed = true,
                    }
                }
            }
        }
        Ok(n > 0)
    }

    /// Adopts remote prefills that completed; recomputes the failed and the late.
    fn advance_remote(&mut self) -> Result<bool> {
        for g in self.groups.iter_mut() {
            if g.alive && g.exited() {
                g.alive = false;
            }
        }
        let now = Instant::now();
        let mut finished = Vec::new();
        for (id, r) in self.remote.iter_mut() {
            let group = &mut self.groups[r.group];
            if !group.alive {
                r.failed = true;
            } else if now - r.sent > self.opts.remote_deadline {
                // Killed so that nothing it still sends can land in reused blocks.
                group.kill();
                group.alive = false;
                r.failed = true;
            }
            if r.failed {
                finished.push((*id, false));
                continue;
            }
            if self.opts.pull {
                for (rank, load) in r.loads.iter_mut().enumerate() {
                    let Some(l) = load else { continue };
                    match l.poll()? {
                        Some(LoadOutcome::Loaded) => r.loaded[rank] = true,
                        Some(LoadOutcome::Recompute { cause, .. }) => {
                            eprintln!("decode: request {id}: READ failed: {cause}");
                            r.failed = true;
                        }
                        None => {}
                    }
                }
                if r.failed {
                    finished.push((*id, false));
                } else if r.loaded.iter().all(|l| *l) {
                    finished.push((*id, true));
                }
            } else {
                let complete = (0..r.notes.len()).all(|rank| {
                    r.notes[rank].is_some() && self.rx.complete(tag(*id, rank).as_bytes())
                });
                if complete {
                    finished.push((*id, true));
                }
            }
        }
        let busy = !finished.is_empty();
        for (id, ok) in finished {
            let Some(mut r) = self.remote.remove(&id) else {
                continue;
            };
            for rank in 0..r.notes.len() {
                self.rx.forget(tag(id, rank).as_bytes());
            }
            if ok {
                self.adopt(r)?;
            } else {
                drop(std::mem::take(&mut r.loads)); // cancels READs still in flight
                let t = Instant::now();
                self.engine.prefill_sequence(&mut r.seq, 0)?;
                self.metrics.recomputed += 1;
                let waited = t - r.admitted;
                self.start_decoding(
                    r.idx,
                    r.seq,
                    r.admitted,
                    (waited, t.elapsed(), Duration::ZERO),
                    false,
                );
            }
        }
        Ok(busy)
    }

    fn adopt(&mut self, mut r: Remote) -> Result<()> {
        let now = Instant::now();
        let notes: Vec<(u32, WorkerStats)> = r.notes.iter().flatten().copied().collect();
        let first = notes
            .first()
            .map(|n| n.0)
            .ok_or_else(|| Error::role("adopting a remote prefill", "no first token"))?;
        if notes.iter().any(|n| n.0 != first) {
            return Err(Error::role(
                "adopting a remote prefill",
                "TP ranks disagree on the first token",
            ));
        }
        self.engine.adopt_prefill(&mut r.seq, first)?;
        let queue = notes.iter().map(|n| n.1.queue).max().unwrap_or_default();
        let prefill = notes.iter().map(|n| n.1.prefill).max().unwrap_or_default();
        let transfer = (now - r.admitted).saturating_sub(queue + prefill);
        for (rank, (_, s)) in notes.iter().enumerate() {
            self.metrics.add_worker(s, rank == 0);
        }
        if let Some(t) = r.load_started {
            self.metrics.add_pull(now - t);
        }
        self.start_decoding(r.idx, r.seq, r.admitted, (queue, prefill, transfer), true);
        Ok(())
    }

    fn start_decoding(
        &mut self,
        idx: usize,
        seq: Sequence,
        admitted: Instant,
        split: (Duration, Duration, Duration),
        remote: bool,
    ) {
        self.running.push(Running {
            idx,
            seq,
            admitted,
            ready: Instant::now(),
            split,
            stepped: false,
            remote,
        });
    }

    /// One decode step for every running sequence (one model call each); finishes the
    /// ones that reached `max_new`.
    fn decode_steps(&mut self, on_done: &mut dyn FnMut()) -> Result<bool> {
        let busy = !self.running.is_empty();
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            if r.seq.generated().len() < self.opts.max_new {
                let t = Instant::now();
                self.engine.decode_step(std::slice::from_mut(&mut r.seq))?;
                self.metrics.decode += t.elapsed();
            }
            if !r.stepped {
                r.stepped = true;
                let now = Instant::now();
                self.metrics
                    .add_ttft(now - r.admitted, r.split, now - r.ready, r.remote);
            }
            if r.seq.generated().len() >= self.opts.max_new {
                let r = self.running.swap_remove(i);
                self.outputs[r.idx] = Some(r.seq.generated().to_vec());
                self.metrics.generated += r.seq.generated().len();
                self.committed.retain(|c| c.0 != r.idx);
                self.engine.release(r.seq)?;
                on_done();
            } else {
                i += 1;
            }
        }
        Ok(busy)
    }
}

/// The layer-wise tag of request `id` from TP rank `rank`.
fn tag(id: u64, rank: usize) -> String {
    format!("r{id}/{rank}")
}
