//! The on-disk record of the NVMe tier, and its decoder (public, for fuzz targets).
//!
//! A segment file is a sequence of records, each 4 KiB-aligned so that `O_DIRECT` I/O can
//! read and write it straight from the DRAM arena:
//!
//! ```text
//! page 0 (4096 bytes): header, 64 bytes used, the rest zero
//!   0 magic "KVT1" | 4 version u16 = 1 | 6 flags u16 | 8 key u128 | 24 len u64
//!   32 seq u64 | 40 segment u32 | 44 offset u64 | 52 payload crc32c u32
//!   56 guard u32 | 60 header crc32c u32 (of bytes 0..60)
//! pages 1..: payload (`len` bytes), zero-padded to a multiple of 4096
//! ```
//!
//! Flags: bit 0 marks a **tombstone** (`len` 0, no payload): the key was removed at
//! this sequence number, and an older record of it must not come back at recovery.
//! `guard` is a tombstone's newest segment that may hold such an older record (0 for
//! blocks); the tombstone is kept while any segment up to it is. Other flag bits are
//! corrupt. All integers are little-endian. A record is valid only when both checksums match and
//! the header names the segment and offset it was found at, so a torn or misplaced write
//! is skipped at recovery and never returned as data.

use kv_core::{Error, Result};

use crate::key::BlockKey;

/// Alignment and size of the header page.
pub const PAGE: u64 = 4096;
/// Bytes of the header that carry fields.
pub const HEADER_LEN: usize = 64;
const MAGIC: &[u8; 4] = b"KVT1";
const VERSION: u16 = 1;
/// The tombstone flag.
pub const FLAG_TOMBSTONE: u16 = 1;
/// The largest payload a record may claim (1 TiB); larger is corrupt by definition.
pub const MAX_PAYLOAD: u64 = 1 << 40;

/// A decoded record header. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The block's key.
    pub key: BlockKey,
    /// Payload length in bytes.
    pub len: u64,
    /// Store-wide write sequence number: the highest wins at recovery.
    pub seq: u64,
    /// The segment the record was written to.
    pub segment: u32,
    /// The record's offset in that segment.
    pub offset: u64,
    /// crc32c of the payload.
    pub payload_crc: u32,
    /// Flag bits ([`FLAG_TOMBSTONE`]).
    pub flags: u16,
    /// A tombstone's guard segment (see the module docs); 0 for a block.
    pub guard: u32,
}

impl RecordHeader {
    /// Bytes the record takes on disk: the header page plus the padded payload.
    pub fn record_len(&self) -> u64 {
        record_len(self.len)
    }

    /// True for a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.flags & FLAG_TOMBSTONE != 0
    }

    /// Writes the 64-byte header (with its checksum) into `out[..64]`.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<()> {
        let h = out
            .get_mut(..HEADER_LEN)
            .ok_or_else(|| Error::invalid_argument("record header buffer under 64 bytes"))?;
        h[0..4].copy_from_slice(MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..24].copy_from_slice(&self.key.to_bytes());
        h[24..32].copy_from_slice(&self.len.to_le_bytes());
        h[32..40].copy_from_slice(&self.seq.to_le_bytes());
        h[40..44].copy_from_slice(&self.segment.to_le_bytes());
        h[44..52].copy_from_slice(&self.offset.to_le_bytes());
        h[52..56].copy_from_slice(&self.payload_crc.to_le_bytes());
        h[56..60].copy_from_slice(&self.guard.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// The header as a 64-byte array.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        // The buffer is exactly HEADER_LEN bytes, so this cannot fail.
        let _ = self.encode_into(&mut h);
        h
    }
}

/// Bytes a record of `payload` bytes takes on disk.
pub fn record_len(payload: u64) -> u64 {
    PAGE + payload.div_ceil(PAGE) * PAGE
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and checks a record header from the first 64 bytes of `bytes`.
///
/// Any malformation (short input, wrong magic or version, bad checksum, absurd length)
/// is [`Error::Corrupt`]; never panics.
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader> {
    let h = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| Error::Corrupt(format!("record header of {} bytes", bytes.len())))?;
    if &h[0..4] != MAGIC {
        return Err(Error::Corrupt("record magic is not KVT1".into()));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(Error::Corrupt(format!(
            "record version {version}, expected 1"
        )));
    }
    let crc = u32_at(h, 60);
    if crc32c::crc32c(&h[..60]) != crc {
        return Err(Error::Corrupt("record header checksum mismatch".into()));
    }
    let mut key = [0u8; 16];
    key.copy_from_slice(&h[8..24]);
    let len = u64_at(h, 24);
    if len > MAX_PAYLOAD {
        return Err(Error::Corrupt(format!("record claims {len} payload bytes")));
    }
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags & !FLAG_TOMBSTONE != 0 || (flags & FLAG_TOMBSTONE != 0 && len != 0) {
        return Err(Error::Corrupt(format!(
            "record flags {flags:#x} with {len} bytes"
        )));
    }
    Ok(RecordHeader {
        key: BlockKey::from_bytes(key),
        len,
        seq: u64_at(h, 32),
        segment: u32_at(h, 40),
        offset: u64_at(h, 44),
        payload_crc: u32_at(h, 52),
        flags,
        guard: u32_at(h, 56),
    })
}

/// Decodes a whole record (header page + payload) and checks both checksums; returns the
/// header and the payload bytes. Malformed or torn input is [`Error::Corrupt`].
pub fn decode_record(bytes: &[u8]) -> Result<(RecordHeader, &[u8])> {
    let h = decode_header(bytes)?;
    let start = PAGE as usize;
    let payload = usize::try_from(h.len)
        .ok()
        .and_then(|len| bytes.get(start..start.checked_add(len)?))
        .ok_or_else(|| {
            Error::Corrupt(format!(
                "record claims {} payload bytes but {} follow the header",
                h.len,
                bytes.len().saturating_sub(start)
            ))
        })?;
    if crc32c::crc32c(payload) != h.payload_crc {
        return Err(Error::Corrupt(format!(
            "payload checksum mismatch for block {}",
            h.key
        )));
    }
    Ok((h, payload))
}

/// What [`scan_segment`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Valid records, in file order.
    pub records: Vec<RecordHeader>,
    /// Pages that held something other than a valid record start (torn or corrupt data).
    pub skipped_pages: u64,
    /// Records whose header was valid but whose payload failed its checksum.
    pub corrupt_records: u64,
}

/// Scans the bytes of segment `segment` (its file image from offset 0) for valid records.
///
/// With `verify_payload` each payload's checksum is checked too. A page that does not
/// start a valid record (zeroes past the end of the log, a torn write) is skipped one
/// page at a time, so records after a torn one are still found. Never panics.
pub fn scan_segment(segment: u32, bytes: &[u8], verify_payload: bool) -> Scan {
    let mut s = Scan::default();
    let mut off = 0usize;
    let page = PAGE as usize;
    while off + HEADER_LEN <= bytes.len() {
        let here = &bytes[off..];
        let Ok(h) = decode_header(here) else {
            if here[..page.min(here.len())].iter().any(|b| *b != 0) {
                s.skipped_pages += 1;
            }
            off += page;
            continue;
        };
        let rec = h.record_len();
        let fits = usize::try_from(rec)
            .ok()
            .filter(|r| *r <= here.len())
            .is_some();
        if h.segment != segment || h.offset != off as u64 || !fits {
            s.skipped_pages += 1;
            off += page;
            continue;
        }
        if verify_payload && decode_record(here).is_err() {
            s.corrupt_records += 1;
            off += page;
            continue;
        }
        s.records.push(h);
        off += rec as usize;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seg: u32, off: u64, key: u64, payload: &[u8]) -> Vec<u8> {
        let h = RecordHeader {
            key: BlockKey::from_u64(key),
            len: payload.len() as u64,
            seq: key,
            segment: seg,
            offset: off,
            payload_crc: crc32c::crc32c(payload),
            flags: 0,
            guard: 0,
        };
        let mut v = vec![0u8; h.record_len() as usize];
        h.encode_into(&mut v).unwrap();
        v[PAGE as usize..PAGE as usize + payload.len()].copy_from_slice(payload);
        v
    }

    #[test]
    fn round_trip_and_scan_skips_torn() {
        let mut seg = Vec::new();
        let a = record(3, 0, 1, &[7u8; 5000]);
        seg.extend_from_slice(&a);
        let mut b = record(3, seg.len() as u64, 2, &[8u8; 100]);
        b[PAGE as usize + 10] ^= 1; // torn payload
        seg.extend_from_slice(&b);
        let c = record(3, seg.len() as u64, 3, &[9u8; 4096]);
        seg.extend_from_slice(&c);
        seg.extend_from_slice(&[0u8; 8192]);
        let (h, p) = decode_record(&a).unwrap();
        assert_eq!((h.len, p.len(), p[4999]), (5000, 5000, 7));
        assert!(matches!(decode_record(&b), Err(Error::Corrupt(_))));
        let s = scan_segment(3, &seg, true);
        let keys: Vec<_> = s.records.iter().map(|r| r.seq).collect();
        assert_eq!(keys, vec![1, 3]);
        assert_eq!(s.corrupt_records, 1);
        // Without payload checks the torn record's header is accepted (reads check later).
        assert_eq!(scan_segment(3, &seg, false).records.len(), 3);
        // A record found in the wrong segment is not trusted.
        assert!(scan_segment(4, &seg, true).records.is_empty());
    }

    #[test]
    fn tombstones_round_trip_and_bad_flags_are_corrupt() {
        let t = RecordHeader {
            key: BlockKey::from_u64(5),
            len: 0,
            seq: 9,
            segment: 2,
            offset: 0,
            payload_crc: crc32c::crc32c(&[]),
            flags: FLAG_TOMBSTONE,
            guard: 2,
        };
        let mut page = vec![0u8; PAGE as usize];
        t.encode_into(&mut page).unwrap();
        let (h, p) = decode_record(&page).unwrap();
        assert!(h.is_tombstone() && p.is_empty());
        assert_eq!(h, t);
        assert_eq!(scan_segment(2, &page, true).records, vec![t]);
        for (flags, len) in [(2u16, 0u64), (FLAG_TOMBSTONE, 10)] {
            let mut b = vec![0u8; 2 * PAGE as usize];
            RecordHeader { flags, len, ..t }
                .encode_into(&mut b)
                .unwrap();
            assert!(
                matches!(decode_header(&b), Err(Error::Corrupt(_))),
                "{flags} {len}"
            );
        }
    }
}
