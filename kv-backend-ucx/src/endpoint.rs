//! Connected peers: the UCP endpoint, its rkey cache and the ordered queue of
//! notifications waiting to go out after their data.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::ffi::{ucp_ep_h, ucp_rkey_h};
use crate::request::Group;
use crate::wire::ConnInfo;

/// What must finish before a queued notification may be sent.
pub enum Gate {
    /// The data of post number `post` of transfer `transfer`.
    Transfer {
        /// The transfer.
        transfer: u64,
        /// Which post of it (a released-and-reposted transfer does not open the gate).
        post: u64,
    },
    /// An endpoint flush (a notification alone waits for every earlier operation).
    Flush(Group),
}

/// A notification on its way to the peer.
pub struct Note {
    /// What it waits for.
    pub gate: Gate,
    /// Encoded active-message header (kept alive until the send completes).
    pub header: Vec<u8>,
    /// Payload (kept alive until the send completes).
    pub payload: Bytes,
    /// The active-message send, once issued.
    pub sent: Option<Group>,
}

/// One connected peer.
pub struct Endpoint {
    /// The UCP endpoint (null once closed).
    pub ep: ucp_ep_h,
    /// The name the caller gave the peer.
    pub peer_name: String,
    /// What the peer published.
    pub info: ConnInfo,
    /// Created with `UCP_ERR_HANDLING_MODE_PEER` (else `NONE`: the transports cannot
    /// detect a dead peer and only deadlines bound a transfer).
    pub peer_errors: bool,
    /// WRITEs of at least this many bytes go as active messages with rendezvous
    /// (`u64::MAX`: never; set at connect for endpoints whose lanes are all TCP).
    pub am_write_min: u64,
    /// Why the endpoint can no longer be used, once it cannot.
    pub dead: Option<String>,
    /// Sequence number of the next notification.
    pub next_seq: u64,
    /// Notifications in send order.
    pub notes: VecDeque<Note>,
    /// Unpacked rkeys by packed bytes, with reference counts.
    pub rkeys: HashMap<Vec<u8>, (ucp_rkey_h, usize)>,
}

impl Endpoint {
    /// A live endpoint.
    pub fn new(ep: ucp_ep_h, peer_name: String, info: ConnInfo) -> Endpoint {
        Endpoint {
            ep,
            peer_name,
            info,
            peer_errors: true,
            am_write_min: u64::MAX,
            dead: None,
            next_seq: 0,
            notes: VecDeque::new(),
            rkeys: HashMap::new(),
        }
    }

    /// `RemoteDisconnected` for this peer with `reason`.
    pub fn disconnected(&self, reason: impl Into<String>) -> kv_core::Error {
        kv_core::Error::RemoteDisconnected {
            peer: self.peer_name.clone(),
            reason: reason.into(),
        }
    }
}
