//! One loopback node's state and its *target* side: what a real backend does for
//! requests that arrive from the network. Every peer operation is authenticated (a
//! per-frame tag with a sequence number), then re-checked against the node's own live
//! registrations — whatever the importer claimed — under the node's lock, so a
//! `deregister` (which takes the same lock) cuts every peer off at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::auth::{ClusterSecret, SessionKey, TAG_LEN};
use crate::backend::{Access, EndpointId, Notification, Op, PostOptions, Status};
use crate::desc::{Descriptor, MemKind, Segment};
use crate::error::{Error, Result};

pub(super) fn disconnected(peer: &str, reason: &str) -> Error {
    Error::RemoteDisconnected {
        peer: peer.into(),
        reason: reason.into(),
    }
}

pub(super) fn unknown(what: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("{what} is unknown (never issued, or released)"))
}

/// Most endpoints (live or disconnected) and accepted sessions one node keeps.
pub(super) const MAX_ENDPOINTS: usize = 1024;
/// Most notifications waiting in one node's inbox, and their bytes.
const MAX_INBOX: usize = 65_536;
const MAX_INBOX_BYTES: usize = 64 << 20;

/// A deliberately broken behaviour, for proving that the conformance suite catches it
/// (`kv-core/tests/mutants.rs`). Not part of the API.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// A READ copies local → remote.
    ReadWrongDirection,
    /// A post's notification is delivered when its first bytes move, not after the last.
    NotifyBeforeData,
    /// `deregister` succeeds while a posted transfer names the memory.
    DeregisterNeverBusy,
    /// The target accepts any range in its memory, whatever the key names.
    TargetSkipsBoundsCheck,
    /// `cancel` marks the transfer cancelled but leaves its copy queued.
    CancelLeavesCopyQueued,
    /// Deadlines are never checked.
    DeadlineIgnored,
    /// `disconnect` ends in-flight transfers with `NotRegistered`.
    DisconnectEndsNotRegistered,
    /// `poll` of a released transfer says `Idle`.
    PollAfterReleaseIdle,
    /// A zero-length descriptor ends the list (a C-style terminator).
    ZeroLengthEndsList,
    /// The target still honours keys of deregistered memory.
    NoLivenessCheck,
    /// WRITEs into read-only registrations (and READs into read-only memory) go through.
    ReadOnlyNotEnforced,
    /// A peer with the wrong cluster secret is accepted.
    UnauthenticatedAccepted,
    /// `prepare_selected` moves the lists' first items, whatever indices it is given.
    SelectionIgnored,
    /// `prepare_list` accepts items outside every registration.
    ListNotChecked,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 14] = [
        Mutation::ReadWrongDirection,
        Mutation::NotifyBeforeData,
        Mutation::DeregisterNeverBusy,
        Mutation::TargetSkipsBoundsCheck,
        Mutation::CancelLeavesCopyQueued,
        Mutation::DeadlineIgnored,
        Mutation::DisconnectEndsNotRegistered,
        Mutation::PollAfterReleaseIdle,
        Mutation::ZeroLengthEndsList,
        Mutation::NoLivenessCheck,
        Mutation::ReadOnlyNotEnforced,
        Mutation::UnauthenticatedAccepted,
        Mutation::SelectionIgnored,
        Mutation::ListNotChecked,
    ];
}

/// A loopback node: one backend's simulated memory and tables.
pub(super) struct Node {
    pub id: u64,
    pub agent: String,
    pub secret: Option<ClusterSecret>,
    pub mutation: Option<Mutation>,
    pub state: Mutex<NodeState>,
    /// Held while this node's own jobs run (`progress`), so `cancel` and `disconnect`
    /// can wait for a running copy to end. Always taken before any `state` lock.
    pub exec: Mutex<()>,
}

impl Node {
    /// True when this node runs `m` (only with the `conformance` feature's mutants).
    pub fn mutant(&self, m: Mutation) -> bool {
        self.mutation == Some(m)
    }
}

/// A peer operation as it would cross the wire, with its authentication.
pub(super) struct PeerOp {
    /// The session the initiator opened with this node at `connect`.
    pub session: u64,
    /// The session key's tag over [`PeerOp::frame`] and the frame's number on the
    /// session (both sides count frames, so the number itself never crosses).
    pub tag: [u8; TAG_LEN],
    pub op: Op,
    pub desc: Descriptor,
    pub key: u128,
}

impl PeerOp {
    /// The bytes the tag covers.
    pub fn frame(op: Op, desc: &Descriptor, key: u128) -> [u8; 33] {
        let mut f = [0u8; 33];
        f[0] = match op {
            Op::Write => 1,
            Op::Read => 2,
        };
        f[1..9].copy_from_slice(&desc.addr.to_le_bytes());
        f[9..17].copy_from_slice(&desc.len.to_le_bytes());
        f[17..33].copy_from_slice(&key.to_le_bytes());
        f
    }
}

/// The bytes a notification's tag covers: a type byte, so no notification can pass for
/// a peer operation's frame, then the payload.
pub(super) fn note_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(1 + payload.len());
    f.push(3);
    f.extend_from_slice(payload);
    f
}

#[derive(Default)]
pub(super) struct NodeState {
    next_id: u64,
    pub next_addr: u64,
    /// Simulated allocations by start address.
    pub memory: BTreeMap<u64, Vec<u8>>,
    pub regs: HashMap<u64, Reg>,
    /// Remote key → registration id: what the target side looks keys up in.
    pub keys: HashMap<u128, u64>,
    /// Deregistered ranges by key, kept only by the `NoLivenessCheck` mutant.
    pub zombies: HashMap<u128, Descriptor>,
    pub peers: HashMap<u64, Peer>,
    /// Connections other nodes opened to this one (target side), by session id.
    pub sessions: HashMap<u64, Session>,
    pub remotes: HashMap<u64, Remote>,
    pub transfers: HashMap<u64, Transfer>,
    pub queue: VecDeque<Job>,
    inbox: VecDeque<Notification>,
    inbox_bytes: usize,
    /// The transfer `progress` is copying right now (with this lock released).
    pub running: Option<u64>,
}

pub(super) struct Reg {
    pub kind: MemKind,
    pub desc: Descriptor,
    pub access: Access,
    pub key: u128,
    /// Posted transfers of this node that name it.
    pub busy: u32,
}

/// A peer this node connected to (initiator side).
pub(super) struct Peer {
    pub name: String,
    /// `None` once disconnected: the endpoint id stays known, so later prepares and
    /// posts say `RemoteDisconnected` rather than "unknown endpoint".
    pub link: Option<Link>,
}

pub(super) struct Link {
    pub node: std::sync::Weak<Node>,
    pub session: u64,
    pub key: Option<SessionKey>,
    /// Next frame number on the session.
    pub seq: u64,
}

/// A connection another node opened to this one (target side).
pub(super) struct Session {
    /// The name the client proved in the handshake: what its notifications carry.
    pub client: String,
    pub key: Option<SessionKey>,
    /// Next frame number expected.
    pub seq: u64,
}

pub(super) struct Remote {
    pub peer: u64,
    pub desc: Descriptor,
    pub key: u128,
}

pub(super) struct Transfer {
    pub op: Op,
    pub peer: u64,
    /// The transfer cut into pieces, each with the remote key of the import it lies in.
    pub segs: std::sync::Arc<[(Segment, u128)]>,
    pub local_regs: Vec<u64>,
    pub status: Status,
    pub opts: PostOptions,
    /// Segments of the current post already moved.
    pub done: usize,
    /// The notification went out early (`NotifyBeforeData` mutant only).
    pub notified: bool,
}

pub(super) enum Job {
    Transfer(u64),
    Notify(u64, Bytes),
}

impl NodeState {
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The simulated allocation holding `d`, as (start, buffer).
    fn buffer_mut(&mut self, d: &Descriptor) -> Result<(u64, &mut Vec<u8>)> {
        let end = d
            .end()
            .ok_or_else(|| Error::OutOfBounds(format!("{d:?} overflows")))?;
        match self.memory.range_mut(..=d.addr).next_back() {
            Some((start, buf)) if end <= start + buf.len() as u64 => Ok((*start, buf)),
            _ => Err(Error::OutOfBounds(format!(
                "{:#x}+{} is not loopback memory",
                d.addr, d.len
            ))),
        }
    }

    /// The live link of endpoint `ep` and the node it leads to; `RemoteDisconnected` once
    /// disconnected or the peer is gone.
    pub fn link(&self, ep: u64) -> Result<(&Peer, &Link, Arc<Node>)> {
        let p = self.peers.get(&ep).ok_or_else(|| unknown(EndpointId(ep)))?;
        let link = p
            .link
            .as_ref()
            .ok_or_else(|| disconnected(&p.name, "disconnected locally"))?;
        let node = link
            .node
            .upgrade()
            .ok_or_else(|| disconnected(&p.name, "peer backend was dropped"))?;
        Ok((p, link, node))
    }

    /// Checks that `d` is allocated memory of this node.
    pub fn check_memory(&mut self, d: &Descriptor) -> Result<()> {
        self.buffer_mut(d).map(|_| ())
    }

    pub fn read(&mut self, d: &Descriptor) -> Result<Vec<u8>> {
        let (start, buf) = self.buffer_mut(d)?;
        let o = (d.addr - start) as usize;
        Ok(buf[o..o + d.len as usize].to_vec())
    }

    pub fn write(&mut self, d: &Descriptor, data: &[u8]) -> Result<()> {
        let (start, buf) = self.buffer_mut(d)?;
        let o = (d.addr - start) as usize;
        buf[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Ends a posted transfer (once): sets its status and releases its registrations.
    pub fn finish(&mut self, tid: u64, status: Status) {
        let Some(t) = self.transfers.get_mut(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress) {
            return;
        }
        t.status = status;
        for r in t.local_regs.clone() {
            if let Some(r) = self.regs.get_mut(&r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
    }

    /// Accepts a connection from `client` (target side).
    pub fn accept(&mut self, client: String, key: Option<SessionKey>) -> Result<u64> {
        if self.sessions.len() >= MAX_ENDPOINTS {
            return Err(Error::Busy(format!(
                "loopback node has {MAX_ENDPOINTS} connections; disconnect some"
            )));
        }
        let id = self.id();
        self.sessions.insert(
            id,
            Session {
                client,
                key,
                seq: 0,
            },
        );
        Ok(id)
    }

    /// Checks the tag of the session's next frame (a replayed or reordered frame carries
    /// the tag of another number and fails); returns the authenticated sender.
    fn authenticate(&mut self, session: u64, frame: &[u8], tag: &[u8]) -> Result<&str> {
        let s = self.sessions.get_mut(&session).ok_or_else(|| {
            Error::Unauthenticated(format!("no loopback session {session} (never connected)"))
        })?;
        if let Some(key) = &s.key {
            key.verify(s.seq, frame, tag)?;
        }
        s.seq += 1;
        Ok(&s.client)
    }

    /// The target's own check of a peer operation: a live registration under `key`
    /// holds the whole range, and allows the operation.
    fn check_target(&self, mutation: Option<Mutation>, op: &PeerOp) -> Result<()> {
        if mutation == Some(Mutation::TargetSkipsBoundsCheck) {
            return Ok(());
        }
        let (desc, access) = match self.keys.get(&op.key).and_then(|id| self.regs.get(id)) {
            Some(reg) => (reg.desc, reg.access),
            None => match self.zombies.get(&op.key) {
                Some(d) => (*d, Access::ReadWrite),
                None => {
                    return Err(Error::NotRegistered(format!(
                        "remote key {:#x} (unknown or deregistered on the target)",
                        op.key
                    )))
                }
            },
        };
        if !desc.contains(&op.desc) {
            return Err(Error::OutOfBounds(format!(
                "{:#x}+{} outside the target registration {:#x}+{}",
                op.desc.addr, op.desc.len, desc.addr, desc.len
            )));
        }
        if op.op == Op::Write
            && !access.writable()
            && mutation != Some(Mutation::ReadOnlyNotEnforced)
        {
            return Err(Error::AccessDenied(format!(
                "WRITE into the read-only registration {:#x}+{}",
                desc.addr, desc.len
            )));
        }
        Ok(())
    }

    /// Serves one peer operation (target side): authenticate, re-check, copy. A WRITE
    /// carries its data; a READ returns the bytes read.
    pub fn serve(
        &mut self,
        mutation: Option<Mutation>,
        op: &PeerOp,
        data: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>> {
        let frame = PeerOp::frame(op.op, &op.desc, op.key);
        self.authenticate(op.session, &frame, &op.tag)?;
        self.check_target(mutation, op)?;
        match (op.op, data) {
            (Op::Write, Some(data)) => self.write(&op.desc, data).map(|_| None),
            (Op::Read, _) => self.read(&op.desc).map(Some),
            (Op::Write, None) => Err(Error::invalid_argument("WRITE without data")),
        }
    }

    /// Delivers a notification (target side), bounded by the inbox limits. Its sender
    /// is the name the session authenticated, not one the frame claims.
    pub fn deliver(&mut self, session: u64, tag: &[u8], payload: Bytes) -> Result<()> {
        let client = self
            .authenticate(session, &note_frame(&payload), tag)?
            .to_string();
        if self.inbox.len() >= MAX_INBOX || self.inbox_bytes + payload.len() > MAX_INBOX_BYTES {
            return Err(Error::Busy(format!(
                "{client}'s notification dropped: the peer's inbox is full (drain it)"
            )));
        }
        self.inbox_bytes += payload.len();
        self.inbox.push_back(Notification {
            peer: client,
            payload,
        });
        Ok(())
    }

    /// Moves received notifications to `out`.
    pub fn drain(&mut self, out: &mut Vec<Notification>) -> usize {
        let n = self.inbox.len();
        self.inbox_bytes = 0;
        out.extend(self.inbox.drain(..));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ClientHandshake, ClusterSecret, ServerHandshake};

    /// A node state with 4 KiB of memory registered under key 7, and a session whose
    /// key both ends share.
    fn target() -> (NodeState, u64, SessionKey) {
        let secret = ClusterSecret::generate().unwrap();
        let (server, hello) = ServerHandshake::start(&secret, b"t").unwrap();
        let (client, answer) = ClientHandshake::respond(&secret, b"t", "a", &hello).unwrap();
        let (proof, peer) = server.finish(&answer).unwrap();
        let key = client.finish(&proof).unwrap();
        let mut s = NodeState::default();
        let desc = Descriptor::new(0x1000, 4096, 0);
        s.memory.insert(0x1000, vec![0; 4096]);
        let reg = Reg {
            kind: MemKind::Dram,
            desc,
            access: Access::ReadWrite,
            key: 7,
            busy: 0,
        };
        s.regs.insert(1, reg);
        s.keys.insert(7, 1);
        let session = s.accept(peer.name, Some(peer.key)).unwrap();
        (s, session, key)
    }

    fn op(session: u64, key: &SessionKey, seq: u64, desc: Descriptor) -> PeerOp {
        PeerOp {
            session,
            tag: key.tag(seq, &PeerOp::frame(Op::Write, &desc, 7)),
            op: Op::Write,
            desc,
            key: 7,
        }
    }

    #[test]
    fn replayed_or_forged_frames_are_refused() {
        let (mut s, session, key) = target();
        let d = Descriptor::new(0x1000, 4, 0);
        let first = op(session, &key, 0, d);
        s.serve(None, &first, Some(&[1; 4])).unwrap();
        // The same frame again: it carries frame 0's tag where frame 1 is expected.
        let replay = s.serve(None, &first, Some(&[2; 4]));
        assert!(
            matches!(replay, Err(Error::Unauthenticated(_))),
            "{replay:?}"
        );
        // A frame for another range under a tag computed for this one.
        let mut forged = op(session, &key, 1, d);
        forged.desc = Descriptor::new(0x1004, 4, 0);
        assert!(matches!(
            s.serve(None, &forged, Some(&[3; 4])),
            Err(Error::Unauthenticated(_))
        ));
        assert_eq!(
            s.read(&Descriptor::new(0x1000, 8, 0)).unwrap(),
            [1, 1, 1, 1, 0, 0, 0, 0]
        );
        // No session, no service.
        let stranger = op(session + 100, &key, 0, d);
        assert!(matches!(
            s.serve(None, &stranger, Some(&[4; 4])),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn sessions_and_inbox_are_bounded() {
        let (mut s, session, key) = target();
        while s.sessions.len() < MAX_ENDPOINTS {
            s.accept("x".into(), None).unwrap();
        }
        assert!(matches!(s.accept("x".into(), None), Err(Error::Busy(_))));
        let big = Bytes::from(vec![0u8; MAX_INBOX_BYTES / 2 + 1]);
        s.deliver(session, &key.tag(0, &note_frame(&big)), big.clone())
            .unwrap();
        let full = s.deliver(session, &key.tag(1, &note_frame(&big)), big);
        assert!(matches!(full, Err(Error::Busy(_))), "{full:?}");
        let mut out = Vec::new();
        assert_eq!(s.drain(&mut out), 1);
        assert_eq!(out[0].peer, "a");
    }
}
