//! The prefill worker role (one process per TP rank): takes prefill requests from its
//! stdin, loads prefix hits from its kv-tier store, computes the prompt's KV and
//! either WRITEs it into the decode worker's blocks layer by layer (kv-agent's
//! `LayerwiseTransfer`, TP re-layout by `KvLists`) or holds it under a lease for the
//! decode worker to READ. Exits when its stdin closes.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::layout::{tp as agent_tp, Side};
use kv_agent::{
    Agent, AgentOptions, BlockLeases, KvLists, LayerwiseTransfer, PeerId, Registration,
    TransferOptions,
};
use kv_tier::{BlockKey, Store};
use pd_engine::kvnet::{block_payload, register_cache, restore_block};
use pd_engine::tp::{copy_heads, copy_layer_heads, kv_heads_for_rank};
use pd_engine::{Engine, Error, KvCache, KvLayout, Result, Sequence, TpRank};

use crate::proto::{Note, PrefillRequest, WorkerStats};

/// How long the worker's transfers may take, and a lease waits for its reader.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// What a prefill rank is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The decode worker's side channel.
    pub decode_addr: String,
    /// This rank of its TP group.
    pub tp: TpRank,
    /// Hold the KV for the decode worker to READ instead of WRITEing it.
    pub pull: bool,
    /// DRAM of the prefix store in MiB (0: no prefix reuse).
    pub tier_mb: usize,
    /// The agent's name.
    pub name: String,
}

/// One request on its way through a prefill rank.
struct Job<'a> {
    req: PrefillRequest,
    /// Its blocks here.
    seq: Sequence,
    /// Prompt tokens whose KV came from the prefix store.
    cached: usize,
    /// Prefix keys of its full blocks.
    keys: &'a [BlockKey],
    /// When its prefill started.
    t0: Instant,
    stats: WorkerStats,
}

/// The rank's state. Field order is drop order: registrations before the memory.
struct Worker {
    agent: Agent,
    decode: PeerId,
    lists: Option<KvLists>,
    _regs: Vec<Registration>,
    /// The rank's head shard under TP > 1 (what is registered and sent).
    shard: Option<KvCache>,
    engine: Engine,
    tier: Option<Store>,
    leases: BlockLeases,
    held: HashMap<String, Sequence>,
    args: WorkerArgs,
    kv_heads: usize,
}

/// Runs the role until stdin closes.
pub fn run(engine: Engine, args: WorkerArgs) -> Result<()> {
    let mut w = Worker::start(engine, args)?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { break };
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok((at, line)) => {
                let req = PrefillRequest::parse(&line)?;
                let id = req.id;
                if let Err(e) = w.serve(req, at) {
                    eprintln!("{}: request {id}: {e}", w.args.name);
                    let note = Note::Failed {
                        id,
                        rank: w.args.tp.rank as u32,
                    };
                    w.agent
                        .notify(w.decode, note.encode())
                        .map_err(|e| Error::role("telling the decode worker", e))?;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        w.leases_tick()?;
    }
}

impl Worker {
    #[allow(unsafe_code)] // registers the engine-owned KV planes
    fn start(engine: Engine, args: WorkerArgs) -> Result<Worker> {
        let cfg = *engine.model().config();
        let agent = Agent::new(
            &args.name,
            AgentOptions {
                progress_thread: true,
                default_deadline: DEADLINE,
                ..Default::default() // the secret comes from KVX_SECRET
            },
        )?;
        agent.add_backend("tcp", &Default::default())?;
        let heads = kv_heads_for_rank(cfg.kv_heads, args.tp.size, args.tp.rank)?;
        let shard = if args.tp.size > 1 {
            let l = engine.layout();
            let shard_layout = KvLayout {
                heads: heads.len(),
                ..l
            };
            Some(KvCache::new(shard_layout, engine.cache().num_blocks())?)
        } else {
            None
        };
        let sent = shard.as_ref().unwrap_or(engine.cache());
        // SAFETY: the registrations are fields of the Worker declared before `shard` and
        // `engine`, so they drop first; neither cache is replaced while the Worker lives.
        let (regs, layout) = unsafe { register_cache(&agent, sent, cfg.kv_heads, args.tp) }?;
        let addr = agent.listen("127.0.0.1:0")?;
        let decode = agent.fetch_remote(args.decode_addr.as_str())?;
        agent.make_connection(decode)?;
        let lists = if args.pull {
            None
        } else {
            Some(agent.prepare_kv_lists(decode, &layout, Side::Source)?)
        };
        let tier = (args.tier_mb > 0)
            .then(|| {
                Store::open(kv_tier::Options {
                    dram_capacity: (args.tier_mb as u64) << 20,
                    chunk_tokens: engine.layout().block_tokens,
                    ..kv_tier::Options::for_model(&format!(
                        "{}/paged{}",
                        cfg.identity(),
                        engine.layout().block_tokens
                    ))
                })
            })
            .transpose()?;
        println!("READY {addr}");
        std::io::stdout()
            .flush()
            .map_err(|e| Error::role("stdout", e))?;
        Ok(Worker {
            agent,
            decode,
            lists,
            _regs: regs,
            shard,
            engine,
            tier,
            leases: BlockLeases::new(DEADLINE),
            held: HashMap::new(),
            kv_heads: cfg.kv_heads,
            args,
        })
    }

    /// Frees the blocks of leases the decode worker finished with (or that expired).
    fn leases_tick(&mut self) -> Result<()> {
        let mut released = Vec::new();
        for n in self.agent.notifications()? {
            if let Ok(Some(r)) = self.leases.on_notification(n) {
                released.push(r.request);
            }
        }
        released.extend(
            self.leases
                .expire(Instant::now())
                .into_iter()
                .map(|r| r.request),
        );
        for r in released {
            if let Some(seq) = self.held.remove(&r) {
                self.engine.release(seq)?;
            }
        }
        Ok(())
    }

    /// Loads the longest stored prefix of `seq` into its blocks; returns (full blocks
    /// looked up, blocks loaded).
    fn tier_load(&mut self, seq: &Sequence, keys: &[BlockKey]) -> Result<(u64, u64)> {
        let Some(tier) = &self.tier else {
            return Ok((0, 0));
        };
        let hit = tier.lookup_keys(keys);
        let size = self.engine.layout().layers * 2 * self.engine.layout().block_bytes();
        let mut bufs = vec![vec![0u8; size]; hit.len()];
        let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        let n = tier.get_many(hit.keys(), &mut outs)?;
        drop(hit);
        for (i, b) in bufs.iter().take(n).enumerate() {
            restore_block(self.engine.cache_mut(), seq.blocks()[i], b)?;
        }
        Ok((keys.len() as u64, n as u64))
    }

    /// Stores the full blocks `from..` of `seq` under their prefix keys (never waits).
    fn tier_store(&self, seq: &Sequence, keys: &[BlockKey], from: usize) -> Result<()> {
        let Some(tier) = &self.tier else {
            return Ok(());
        };
        let payloads = seq.blocks()[from..keys.len()]
            .iter()
            .map(|b| block_payload(self.engine.cache(), *b))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        tier.put_many(keys, from, &refs)?;
        Ok(())
    }

    fn serve(&mut self, req: PrefillRequest, arrived: Instant) -> Result<()> {
        let t0 = Instant::now();
        let mut stats = WorkerStats {
            queue: t0 - arrived,
            ..Default::default()
        };
        let seq = self.engine.start(req.tokens.clone())?;
        let keys: Vec<BlockKey> = self
            .engine
            .block_hashes(&req.tokens)
            .into_iter()
            .map(|h| BlockKey(h.0))
            .collect();
        let loaded = self.tier_load(&seq, &keys);
        let (lookups, hits) = match loaded {
            Ok(x) => x,
            Err(e) => {
                self.engine.release(seq)?;
                return Err(e);
            }
        };
        stats.lookup_blocks = lookups;
        stats.hit_blocks = hits;
        let cached = hits as usize * self.engine.layout().block_tokens;
        let job = Job {
            req,
            seq,
            cached,
            keys: &keys,
            t0,
            stats,
        };
        let out = if self.args.pull {
            self.prefill_pull(job)
        } else {
            self.prefill_write(job)
        };
        let note = out?;
        self.agent
            .notify(self.decode, note.encode())
            .map_err(|e| Error::role("telling the decode worker", e))
    }

    /// Copies this rank's heads of `blocks`, one layer or all, into the shard cache.
    fn cut_shard(&mut self, blocks: &[u32], layer: Option<usize>) -> Result<()> {
        let Some(shard) = &mut self.shard else {
            return Ok(());
        };
        let all = 0..self.kv_heads;
        let mine = kv_heads_for_rank(self.kv_heads, self.args.tp.size, self.args.tp.rank)?;
        let pairs: Vec<(u32, u32)> = blocks.iter().map(|b| (*b, *b)).collect();
        let full = self.engine.cache();
        match layer {
            Some(l) => copy_layer_heads(full, &all, shard, &mine, &mine, l, &pairs),
            None => copy_heads(full, &all, shard, &mine, &mine, &pairs),
        }
    }

    fn prefill_write(&mut self, job: Job<'_>) -> Result<Note> {
        let Job {
            req,
            seq,
            cached,
            keys,
            t0,
            mut stats,
        } = job;
        // Out of `self` while the closure borrows it; put back below.
        let lists = self
            .lists
            .take()
            .ok_or_else(|| Error::invalid("WRITE mode without prepared lists"))?;
        let len = req.tokens.len();
        let run = (|| {
            let items = lists.items(seq.blocks(), &req.dst_blocks, len as u64)?;
            let layers = lists.layer_transfers(&items, &TransferOptions::default())?;
            let tag = Bytes::from(format!("r{}/{}", req.id, self.args.tp.rank));
            let mut lw = LayerwiseTransfer::new(layers, tag, Bytes::new())?;
            let blocks = seq.blocks().to_vec();
            let first = if self.shard.is_none() {
                // Post layer `l` as soon as the last chunk wrote it: the rest of the
                // forward pass overlaps the transfer.
                self.engine
                    .prefill_observed(&req.tokens, &blocks, cached, &mut |r| {
                        if r.positions.end == len {
                            lw.layer_ready(r.layer)?;
                        }
                        Ok(())
                    })?
            } else {
                // TP > 1: the shard is cut from the full cache after the forward pass
                // (the hook cannot read the cache the model is writing), then layer by
                // layer, each posted as soon as it is cut.
                let first = self.engine.prefill(&req.tokens, &blocks, cached)?;
                for l in 0..self.engine.layout().layers {
                    self.cut_shard(&blocks, Some(l))?;
                    lw.layer_ready(l)?;
                }
                first
            };
            stats.prefill = t0.elapsed();
            let report = lw.wait()?;
            stats.bytes = report.bytes;
            stats.transfer = report.total.unwrap_or_default();
            stats.exposed = report.exposed.unwrap_or_default();
            Ok::<u32, Error>(first)
        })();
        self.lists = Some(lists);
        let stored = run
            .as_ref()
            .ok()
            .map(|_| self.tier_store(&seq, keys, stats.hit_blocks as usize));
        self.engine.release(seq)?;
        let first = run?;
        if let Some(Err(e)) = stored {
            eprintln!("{}: tier put: {e}", self.args.name);
        }
        Ok(Note::Written {
            id: req.id,
            rank: self.args.tp.rank as u32,
            first,
            stats,
        })
    }

    fn prefill_pull(&mut self, job: Job<'_>) -> Result<Note> {
        let Job {
            req,
            seq,
            cached,
            keys,
            t0,
            mut stats,
        } = job;
        let blocks = seq.blocks().to_vec();
        let run = (|| {
            let first = self.engine.prefill(&req.tokens, &blocks, cached)?;
            self.cut_shard(&blocks, None)?;
            self.tier_store(&seq, keys, stats.hit_blocks as usize)?;
            let readers = agent_tp::readers_of(
                self.kv_heads as u32,
                self.args.tp.size as u32,
                self.args.tp.rank as u32,
                1,
            )?;
            self.leases
                .hold(&format!("r{}", req.id), blocks.clone(), readers)?;
            Ok::<u32, Error>(first)
        })();
        let first = match run {
            Ok(f) => f,
            Err(e) => {
                self.engine.release(seq)?;
                return Err(e);
            }
        };
        stats.prefill = t0.elapsed();
        self.held.insert(format!("r{}", req.id), seq);
        Ok(Note::Ready {
            id: req.id,
            rank: self.args.tp.rank as u32,
            first,
            stats,
            src_blocks: blocks,
        })
    }
}
