//! The control messages between roles: a prefill request is one line on the prefill
//! worker's stdin (the request queue); everything back is a kv-agent notification
//! (`pdx1 …`), next to kv-agent's own layer-wise and lease notifications.

use std::time::Duration;

use pd_engine::{Error, Result};

const PREFIX: &str = "pdx1 ";

/// A prompt to prefill, with the decode worker's blocks it lands in (WRITE mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefillRequest {
    /// Request id, unique in the run.
    pub id: u64,
    /// The decode worker's block table for the prompt.
    pub dst_blocks: Vec<u32>,
    /// The prompt.
    pub tokens: Vec<u32>,
}

fn join(xs: &[u32]) -> String {
    xs.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn split(s: &str) -> Result<Vec<u32>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|x| {
            x.parse()
                .map_err(|e| Error::role(format!("number {x:?}"), e))
        })
        .collect()
}

fn num<T: std::str::FromStr>(w: Option<&str>, what: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let w = w.ok_or_else(|| Error::role("control message", format!("no {what}")))?;
    w.parse()
        .map_err(|e| Error::role(format!("{what} {w:?}"), e))
}

impl PrefillRequest {
    /// The stdin line (no newline).
    pub fn to_line(&self) -> String {
        format!(
            "REQ {} {} {}",
            self.id,
            join(&self.dst_blocks),
            join(&self.tokens)
        )
    }

    /// Parses [`PrefillRequest::to_line`]'s output.
    pub fn parse(line: &str) -> Result<PrefillRequest> {
        let mut w = line.split(' ');
        if w.next() != Some("REQ") {
            return Err(Error::role("prefill request", format!("{line:.40}")));
        }
        let id = num(w.next(), "request id")?;
        let dst_blocks = split(w.next().unwrap_or(""))?;
        let tokens = split(w.next().unwrap_or(""))?;
        if tokens.is_empty() || w.next().is_some() {
            return Err(Error::role("prefill request", "no tokens or extra fields"));
        }
        Ok(PrefillRequest {
            id,
            dst_blocks,
            tokens,
        })
    }
}

/// What a prefill rank measured for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// From the request line's arrival to the start of its prefill.
    pub queue: Duration,
    /// The prefill's compute (tier load included).
    pub prefill: Duration,
    /// Full blocks looked up in the tier.
    pub lookup_blocks: u64,
    /// Of those, blocks loaded from the tier instead of computed.
    pub hit_blocks: u64,
    /// Bytes this rank wrote (WRITE mode).
    pub bytes: u64,
    /// First post to last layer done (WRITE mode).
    pub transfer: Duration,
    /// Transfer time after the last layer was ready (not hidden by compute).
    pub exposed: Duration,
}

/// A message from a prefill rank to the decode worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// WRITE mode: every layer was written and completed; `first` is the prefill's token.
    Written {
        /// Request id.
        id: u64,
        /// The sending TP rank.
        rank: u32,
        /// First generated token.
        first: u32,
        /// Its measurements.
        stats: WorkerStats,
    },
    /// Pull mode: the KV is in `src_blocks` of this rank, held by a lease until the
    /// decode worker's done notification.
    Ready {
        /// Request id.
        id: u64,
        /// The sending TP rank.
        rank: u32,
        /// First generated token.
        first: u32,
        /// Its measurements.
        stats: WorkerStats,
        /// The rank's blocks holding the prompt.
        src_blocks: Vec<u32>,
    },
    /// The rank could not prefill the request (the decode worker recomputes it).
    Failed {
        /// Request id.
        id: u64,
        /// The sending TP rank.
        rank: u32,
    },
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Note {
    /// The notification payload.
    pub fn encode(&self) -> bytes::Bytes {
        let stats = |s: &WorkerStats| {
            format!(
                "{} {} {} {} {} {} {}",
                us(s.queue),
                us(s.prefill),
                s.lookup_blocks,
                s.hit_blocks,
                s.bytes,
                us(s.transfer),
                us(s.exposed)
            )
        };
        let s = match self {
            Note::Written {
                id,
                rank,
                first,
                stats: st,
            } => format!("{PREFIX}W {id} {rank} {first} {}", stats(st)),
            Note::Ready {
                id,
                rank,
                first,
                stats: st,
                src_blocks,
            } => format!(
                "{PREFIX}R {id} {rank} {first} {} {}",
                stats(st),
                join(src_blocks)
            ),
            Note::Failed { id, rank } => format!("{PREFIX}F {id} {rank}"),
        };
        bytes::Bytes::from(s)
    }

    /// Parses [`Note::encode`]'s output; `None` for a payload that is not ours.
    pub fn decode(payload: &[u8]) -> Option<Result<Note>> {
        let s = std::str::from_utf8(payload).ok()?.strip_prefix(PREFIX)?;
        Some(Self::parse(s))
    }

    fn parse(s: &str) -> Result<Note> {
        let mut w = s.split(' ');
        let kind = w.next();
        let id = num(w.next(), "request id")?;
        let rank = num(w.next(), "rank")?;
        if kind == Some("F") {
            return Ok(Note::Failed { id, rank });
        }
        let first = num(w.next(), "first token")?;
        let mut d = |what| num::<u64>(w.next(), what).map(Duration::from_micros);
        let (queue, prefill) = (d("queue")?, d("prefill")?);
        let lookup_blocks = num(w.next(), "lookups")?;
        let hit_blocks = num(w.next(), "hits")?;
        let bytes = num(w.next(), "bytes")?;
        let mut d = |what| num::<u64>(w.next(), what).map(Duration::from_micros);
        let (transfer, exposed) = (d("transfer")?, d("exposed")?);
        let stats = WorkerStats {
            queue,
            prefill,
            lookup_blocks,
            hit_blocks,
            bytes,
            transfer,
            exposed,
        };
        match kind {
            Some("W") => Ok(Note::Written {
                id,
                rank,
                first,
                stats,
            }),
            Some("R") => Ok(Note::Ready {
                id,
                rank,
                first,
                stats,
                src_blocks: split(w.next().unwrap_or(""))?,
            }),
            other => Err(Error::role("control message", format!("kind {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let r = PrefillRequest {
            id: 7,
            dst_blocks: vec![3, 0, 9],
            tokens: vec![1, 2, 3, 4],
        };
        assert_eq!(PrefillRequest::parse(&r.to_line()).unwrap(), r);
        assert!(PrefillRequest::parse("REQ 1 2").is_err());
        assert!(PrefillRequest::parse("REQ x 1 2").is_err());
        let stats = WorkerStats {
            queue: Duration::from_micros(5),
            prefill: Duration::from_micros(600),
            lookup_blocks: 4,
            hit_blocks: 2,
            bytes: 4096,
            transfer: Duration::from_micros(70),
            exposed: Duration::from_micros(9),
        };
        for n in [
            Note::Written {
                id: 1,
                rank: 1,
                first: 42,
                stats,
            },
            Note::Ready {
                id: 2,
                rank: 0,
                first: 3,
                stats,
                src_blocks: vec![8, 1],
            },
            Note::Failed { id: 3, rank: 0 },
        ] {
            assert_eq!(Note::decode(&n.encode()).unwrap().unwrap(), n);
        }
        assert!(Note::decode(b"kvxL...").is_none());
        assert!(Note::decode(b"pdx1 W 1").unwrap().is_err());
        assert!(Note::decode(b"pdx1 Q 1 0 1 0 0 0 0 0 0 0")
            .unwrap()
            .is_err());
    }
}
