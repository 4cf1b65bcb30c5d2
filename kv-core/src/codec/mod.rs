//! The metadata wire codec: what an agent publishes about itself.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! header (20 bytes): magic "KVXM" | version u16 | flags u16 | body_len u32 | crc32c(body) u32 | reserved u32
//! body: name str | generation u64 | attributes: u16 n × (name str, blob) |
//!       backends: u16 n × (name str, blob) |
//!       registrations: u32 n × (id u64, kind u8, access u8, descs list,
//!                               keys: u16 n × (backend u16, blob)) |
//!       removed: u32 n × u64
//! str  = u16 len + UTF-8
//! blob = u32 len + bytes
//! list = u32 n × entry; entry = tag u8 (0 single: addr u64 len u64 dev u32,
//!                                       1 strided: base u64 stride u64 count u64 len u64 dev u32)
//! ```
//!
//! Every length is checked against what remains before anything is allocated, and the
//! whole message is bounded by [`MAX_METADATA_BYTES`]; any malformed input returns
//! [`Error::InvalidMetadata`] with the reason. Version 2 added `attributes` and
//! `access`; a version-1 message is refused with a message saying to upgrade both peers.

use bytes::{BufMut, Bytes, BytesMut};

use crate::backend::Access;
use crate::desc::{Descriptor, DescriptorList, Entry, MemKind};
use crate::error::{Error, Result};

/// Magic bytes at the start of every metadata message.
pub const MAGIC: [u8; 4] = *b"KVXM";
/// The wire version this crate writes and reads.
pub const VERSION: u16 = 2;
/// Header size in bytes.
pub const HEADER_LEN: usize = 20;
/// Largest metadata message accepted (64 MiB).
pub const MAX_METADATA_BYTES: usize = 64 << 20;
/// Largest name (agent or backend) in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Most attributes one agent publishes ([`AgentMetadata::attributes`]).
pub const MAX_ATTRIBUTES: usize = 64;
/// Largest attribute value in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 4096;

const FLAG_PARTIAL: u16 = 1;

/// One backend an agent loaded, with the blob peers need to connect to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMetadata {
    /// Backend name (`tcp`, `ucx`, …).
    pub name: String,
    /// Opaque connection info from [`crate::Backend::connection_info`].
    pub connection: Bytes,
}

/// One registered region as peers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationMetadata {
    /// The agent's id for the region (stable while registered).
    pub id: u64,
    /// Memory kind.
    pub kind: MemKind,
    /// Who may touch it: a peer refuses to WRITE a read-only registration early (the
    /// target enforces it regardless).
    pub access: Access,
    /// The registered ranges (usually one; strided for regular layouts).
    pub descs: DescriptorList,
    /// Remote keys, one per backend that registered it: (index into
    /// [`AgentMetadata::backends`], key blob).
    pub keys: Vec<(u16, Bytes)>,
}

/// What an agent publishes about itself. `Clone`, `Send + Sync`.
///
/// A full message (`partial == false`) replaces everything known about the agent; a
/// partial one adds or replaces the listed registrations and drops `removed`, and its
/// attributes, when it carries any, replace the agent's (none = unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentMetadata {
    /// The agent's name.
    pub name: String,
    /// Bumped on every restart, so peers drop what they knew of an older incarnation.
    pub generation: u64,
    /// True for an incremental update.
    pub partial: bool,
    /// Small named values the agent publishes (the KV layout compatibility hash, TP
    /// rank and size, …): at most [`MAX_ATTRIBUTES`], each value at most
    /// [`MAX_ATTRIBUTE_BYTES`].
    pub attributes: Vec<(String, Bytes)>,
    /// Backends and their connection info.
    pub backends: Vec<BackendMetadata>,
    /// Registrations.
    pub registrations: Vec<RegistrationMetadata>,
    /// Registration ids withdrawn since the last update (partial messages).
    pub removed: Vec<u64>,
}

impl AgentMetadata {
    /// Encodes to the wire format.
    pub fn encode(&self) -> Result<Bytes> {
        let mut b = BytesMut::with_capacity(256);
        b.put_slice(&[0u8; HEADER_LEN]);
        put_str(&mut b, &self.name)?;
        b.put_u64_le(self.generation);
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(Error::invalid_argument(format!(
                "{} attributes exceed the limit of {MAX_ATTRIBUTES}",
                self.attributes.len()
            )));
        }
        put_count16(&mut b, self.attributes.len(), "attributes")?;
        for (name, value) in &self.attributes {
            if value.len() > MAX_ATTRIBUTE_BYTES {
                return Err(Error::invalid_argument(format!(
                    "attribute {name:?} of {} bytes exceeds {MAX_ATTRIBUTE_BYTES}",
                    value.len()
                )));
            }
            put_str(&mut b, name)?;
            put_blob(&mut b, value)?;
        }
        put_count16(&mut b, self.backends.len(), "backends")?;
        for be in &self.backends {
            put_str(&mut b, &be.name)?;
            put_blob(&mut b, &be.connection)?;
        }
        put_count32(&mut b, self.registrations.len(), "registrations")?;
        for r in &self.registrations {
            b.put_u64_le(r.id);
            b.put_u8(r.kind as u8);
            b.put_u8(r.access.as_u8());
            put_list(&mut b, &r.descs)?;
            put_count16(&mut b, r.keys.len(), "keys")?;
            for (idx, key) in &r.keys {
                if *idx as usize >= self.backends.len() {
                    return Err(Error::invalid_argument(format!(
                        "registration {} names backend index {idx} of {}",
                        r.id,
                        self.backends.len()
                    )));
                }
                b.put_u16_le(*idx);
                put_blob(&mut b, key)?;
            }
        }
        put_count32(&mut b, self.removed.len(), "removed")?;
        for id in &self.removed {
            b.put_u64_le(*id);
        }
        if b.len() > MAX_METADATA_BYTES {
            return Err(Error::invalid_argument(format!(
                "metadata of {} bytes exceeds the {MAX_METADATA_BYTES}-byte limit; publish partial updates",
                b.len()
            )));
        }
        let body_len = (b.len() - HEADER_LEN) as u32;
        let crc = crc32c::crc32c(&b[HEADER_LEN..]);
        let flags = if self.partial { FLAG_PARTIAL } else { 0 };
        let h = &mut b[..HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&body_len.to_le_bytes());
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        Ok(b.freeze())
    }

    /// Decodes from the wire format; any malformed input is [`Error::InvalidMetadata`].
    pub fn decode(buf: &[u8]) -> Result<AgentMetadata> {
        if buf.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes is shorter than the {HEADER_LEN}-byte header",
                buf.len()
            )));
        }
        if buf.len() > MAX_METADATA_BYTES {
            return Err(bad(format!(
                "{} bytes exceeds the {MAX_METADATA_BYTES}-byte limit",
                buf.len()
            )));
        }
        if buf[0..4] != MAGIC {
            return Err(bad("bad magic: not kvx metadata"));
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != VERSION {
            return Err(bad(format!(
                "peer speaks metadata v{version}, this build speaks v{VERSION}; upgrade both"
            )));
        }
        let flags = u16::from_le_bytes([buf[6], buf[7]]);
        if flags & !FLAG_PARTIAL != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let body_len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        if buf[16..20] != [0; 4] {
            return Err(bad("reserved header bytes are not zero"));
        }
        let body = &buf[HEADER_LEN..];
        if body.len() != body_len {
            return Err(bad(format!(
                "header says {body_len} body bytes, {} present (truncated or trailing data)",
                body.len()
            )));
        }
        if crc32c::crc32c(body) != crc {
            return Err(bad("checksum mismatch"));
        }
        let mut r = Reader::new(body);
        let name = r.str()?;
        let generation = r.u64()?;
        let na = r.count16(2 + 4)?;
        if na > MAX_ATTRIBUTES {
            return Err(bad(format!(
                "{na} attributes exceed the limit of {MAX_ATTRIBUTES}"
            )));
        }
        let mut attributes = Vec::with_capacity(na);
        for _ in 0..na {
            let name = r.str()?;
            let value = r.blob()?;
            if value.len() > MAX_ATTRIBUTE_BYTES {
                return Err(bad(format!(
                    "attribute {name:?} of {} bytes exceeds {MAX_ATTRIBUTE_BYTES}",
                    value.len()
                )));
            }
            attributes.push((name, Bytes::copy_from_slice(value)));
        }
        let nb = r.count16(2 + 4)?;
        let mut backends = Vec::with_capacity(nb);
        for _ in 0..nb {
            backends.push(BackendMetadata {
                name: r.str()?,
                connection: Bytes::copy_from_slice(r.blob()?),
            });
        }
        let nr = r.count32(8 + 1 + 1 + 4 + 2)?;
        let mut registrations = Vec::with_capacity(nr);
        for _ in 0..nr {
            let id = r.u64()?;
            let k = r.u8()?;
            let kind =
                MemKind::from_u8(k).ok_or_else(|| bad(format!("unknown memory kind {k}")))?;
            let a = r.u8()?;
            let access =
                Access::from_u8(a).ok_or_else(|| bad(format!("unknown access mode {a}")))?;
            let descs = r.list()?;
            let nk = r.count16(2 + 4)?;
            let mut keys = Vec::with_capacity(nk);
            for _ in 0..nk {
                let idx = r.u16()?;
                if idx as usize >= backends.len() {
                    return Err(bad(format!(
                        "registration {id} names backend {idx} of {}",
                        backends.len()
                    )));
                }
                keys.push((idx, Bytes::copy_from_slice(r.blob()?)));
            }
            registrations.push(RegistrationMetadata {
                id,
                kind,
                access,
                descs,
                keys,
            });
        }
        let nrem = r.count32(8)?;
        let mut removed = Vec::with_capacity(nrem);
        for _ in 0..nrem {
            removed.push(r.u64()?);
        }
        if !r.buf.is_empty() {
            return Err(bad(format!("{} trailing bytes in body", r.buf.len())));
        }
        Ok(AgentMetadata {
            name,
            generation,
            partial: flags & FLAG_PARTIAL != 0,
            attributes,
            backends,
            registrations,
            removed,
        })
    }
}

fn bad(why: impl Into<String>) -> Error {
    Error::InvalidMetadata(why.into())
}

fn put_str(b: &mut BytesMut, s: &str) -> Result<()> {
    if s.len() > MAX_NAME_LEN {
        return Err(Error::invalid_argument(format!(
            "name of {} bytes exceeds {MAX_NAME_LEN}",
            s.len()
        )));
    }
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
    Ok(())
}

fn put_blob(b: &mut BytesMut, v: &[u8]) -> Result<()> {
    let n =
        u32::try_from(v.len()).map_err(|_| Error::invalid_argument("blob larger than 4 GiB"))?;
    b.put_u32_le(n);
    b.put_slice(v);
    Ok(())
}

fn put_count16(b: &mut BytesMut, n: usize, what: &str) -> Result<()> {
    let n =
        u16::try_from(n).map_err(|_| Error::invalid_argument(format!("more than 65535 {what}")))?;
    b.put_u16_le(n);
    Ok(())
}

fn put_count32(b: &mut BytesMut, n: usize, what: &str) -> Result<()> {
    let n =
        u32::try_from(n).map_err(|_| Error::invalid_argument(format!("more than 2^32 {what}")))?;
    b.put_u32_le(n);
    Ok(())
}

/// Encodes a descriptor list in its compact form (also used by wire frames).
pub fn put_list(b: &mut BytesMut, l: &DescriptorList) -> Result<()> {
    put_count32(b, l.entries().len(), "descriptor entries")?;
    for e in l.entries() {
        match *e {
            Entry::Single(d) => {
                b.put_u8(0);
                b.put_u64_le(d.addr);
                b.put_u64_le(d.len);
                b.put_u32_le(d.device);
            }
            Entry::Strided {
                base,
                stride,
                count,
                len,
                device,
            } => {
                b.put_u8(1);
                b.put_u64_le(base);
                b.put_u64_le(stride);
                b.put_u64_le(count);
                b.put_u64_le(len);
                b.put_u32_le(device);
            }
        }
    }
    Ok(())
}

/// A bounds-checked little-endian reader over untrusted bytes; every read fails with
/// [`Error::InvalidMetadata`] instead of panicking. Used by the codec and by backends'
/// wire frame decoders.
#[derive(Debug)]
pub struct Reader<'a> {
    /// The bytes not read yet.
    pub buf: &'a [u8],
    /// What is being decoded, for error messages (`"libfabric remote key"`).
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self::named(buf, "metadata")
    }

    /// A reader over `buf` whose errors name `what` (e.g. `"ucx remote key"`).
    pub fn named(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn bad(&self, why: impl std::fmt::Display) -> Error {
        bad(format!("{}: {why}", self.what))
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(self.bad(format_args!(
                "truncated: need {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (h, t) = self.buf.split_at(n);
        self.buf = t;
        Ok(h)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    /// Reads a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    /// Checks a `magic` prefix followed by a one-byte `version`.
    pub fn expect_header(&mut self, magic: &[u8], version: u8) -> Result<()> {
        if self.take(magic.len())? != magic {
            return Err(self.bad("bad magic"));
        }
        let v = self.u8()?;
        if v != version {
            return Err(self.bad(format_args!(
                "version {v}, this build reads {version}; upgrade the older peer"
            )));
        }
        Ok(())
    }

    /// Reads `len` bytes of UTF-8.
    pub fn utf8(&mut self, len: usize) -> Result<String> {
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("name is not UTF-8"))
    }

    /// Checks that everything was read.
    pub fn finish(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format_args!("{} trailing bytes", self.buf.len())))
        }
    }

    /// Reads a `u16`-prefixed UTF-8 string of at most [`MAX_NAME_LEN`] bytes.
    pub fn str(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        if n > MAX_NAME_LEN {
            return Err(bad(format!("name of {n} bytes exceeds {MAX_NAME_LEN}")));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| bad("name is not UTF-8"))
    }

    /// Reads a `u32`-prefixed blob.
    pub fn blob(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// Reads a `u16` count of items each at least `min_item` bytes, checked against
    /// what remains so the caller can allocate for it.
    pub fn count16(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u16()? as usize;
        self.check_count(n, min_item)
    }

    /// Reads a `u32` count, checked like [`Reader::count16`].
    pub fn count32(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        self.check_count(n, min_item)
    }

    fn check_count(&self, n: usize, min_item: usize) -> Result<usize> {
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(bad(format!(
                "count {n} cannot fit in the {} bytes left",
                self.buf.len()
            )));
        }
        Ok(n)
    }

    /// Reads a descriptor list written by [`put_list`].
    pub fn list(&mut self) -> Result<DescriptorList> {
        let n = self.count32(1 + 20)?;
        let mut l = DescriptorList::new();
        for _ in 0..n {
            match self.u8()? {
                0 => {
                    let addr = self.u64()?;
                    let len = self.u64()?;
                    let device = self.u32()?;
                    l.push_entry(Entry::Single(Descriptor::new(addr, len, device)))
                        .map_err(|e| self.bad(e))?;
                }
                1 => {
                    let base = self.u64()?;
                    let stride = self.u64()?;
                    let count = self.u64()?;
                    let len = self.u64()?;
                    let device = self.u32()?;
                    if count == 0 || len == 0 {
                        return Err(bad("strided entry with zero count or zero length"));
                    }
                    let e = Entry::Strided {
                        base,
                        stride,
                        count,
                        len,
                        device,
                    };
                    l.push_entry(e).map_err(|e| self.bad(e))?;
                }
                t => return Err(bad(format!("unknown descriptor tag {t}"))),
            }
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests;
