//! The durable disk spool of the Kafka sink: events that could not go straight to Kafka wait
//! here, in order, until they are replayed and acknowledged.
//!
//! Layout of the spool directory:
//! - `EEEEEEEEEEEEEEEEEEEE-L-SSSSSSSSSS.spool`: segment files, read in name order. `E` is the
//!   episode (one per stretch of spooling, and one per process start), `L` the lane and `S` a
//!   sequence number within the lane. Lane 0 holds events that had already been handed to the
//!   producer when spooling started and came back undelivered (purged or failed): they are
//!   older than lane 1, which holds the events that arrived afterwards. Reading lane 0 first
//!   keeps every tenant's events in order.
//! - `cursor`: the position of the first record not yet acknowledged by Kafka (text, replaced
//!   atomically). Segments wholly before it are deleted. After a crash, replay restarts there,
//!   so a record may be sent twice (same `event_id`: readers drop it) but never skipped.
//! - `dead-letter.spool`: records Kafka refused permanently (same format), never replayed.
//!
//! A record is `len: u32 LE | crc32(body): u32 LE | body`, body = `topic: u8 | timestamp_ms:
//! i64 LE | key_len: u16 LE | key | payload`. A process never appends to a segment it did not
//! create, so a record torn by a crash can only be the last one of an older segment: at open it
//! is detected (short or failed checksum), reported, and the file truncated before it.
//!
//! Durability (fsync policy): appends are buffered and written to the file by [`Spool::flush`],
//! which the Kafka sink calls at the end of every loop turn (every few milliseconds), so a
//! process crash loses at most the current turn's appends; written data is `fdatasync`ed at
//! most every `fsync_interval` (a power loss or kernel crash loses at most that much more),
//! when a segment is closed, and at shutdown; a new file's directory entry is synced when the
//! file is created, and the cursor file is replaced atomically (write, fsync, rename).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::wire::{Topic, WireMessage};

const HEADER: u64 = 8;
/// Larger "records" are damage, not data.
const MAX_RECORD: u64 = 64 * 1024 * 1024;
const READ_CHUNK: usize = 256 * 1024;
const CURSOR_FILE: &str = "cursor";
const DEAD_LETTER_FILE: &str = "dead-letter.spool";

/// Which part of an episode a segment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Events handed to the producer before spooling began that came back undelivered.
    Undelivered = 0,
    /// Events that arrived after spooling began.
    New = 1,
}

/// A segment file's place in the replay order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub episode: u64,
    pub lane: Lane,
    pub seq: u32,
}

impl SegmentId {
    fn file_name(self) -> String {
        format!(
            "{:020}-{}-{:010}.spool",
            self.episode, self.lane as u8, self.seq
        )
    }

    fn parse(name: &str) -> Option<SegmentId> {
        let stem = name.strip_suffix(".spool")?;
        let mut parts = stem.split('-');
        let episode = parts.next()?.parse().ok()?;
        let lane = match parts.next()? {
            "0" => Lane::Undelivered,
            "1" => Lane::New,
            _ => return None,
        };
        let seq = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(SegmentId { episode, lane, seq })
    }
}

/// A place in the spool: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: SegmentId,
    pub offset: u64,
}

impl Position {
    const START: Position = Position {
        segment: SegmentId {
            episode: 0,
            lane: Lane::Undelivered,
            seq: 0,
        },
        offset: 0,
    };
}

/// One spooled event.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolRecord {
    pub topic: Topic,
    pub timestamp_ms: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

impl SpoolRecord {
    pub fn from_wire(m: WireMessage) -> SpoolRecord {
        SpoolRecord {
            topic: m.topic,
            timestamp_ms: m.timestamp_ms,
            key: m.key.into_bytes(),
            payload: m.payload,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let key_len = self.key.len().min(usize::from(u16::MAX));
        let body_len = 1 + 8 + 2 + key_len + self.payload.len();
        let start = out.len();
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.push(self.topic as u8);
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&(key_len as u16).to_le_bytes());
        out.extend_from_slice(&self.key[..key_len]);
        out.extend_from_slice(&self.payload);
        let crc = crc32fast::hash(&out[start + HEADER as usize..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(body: &[u8]) -> Option<SpoolRecord> {
        let topic = Topic::from_index(*body.first()?)?;
        let timestamp_ms = i64::from_le_bytes(body.get(1..9)?.try_into().ok()?);
        let key_len = usize::from(u16::from_le_bytes(body.get(9..11)?.try_into().ok()?));
        let key = body.get(11..11 + key_len)?.to_vec();
        let payload = body.get(11 + key_len..)?.to_vec();
        Some(SpoolRecord {
            topic,
            timestamp_ms,
            key,
            payload,
        })
    }
}

/// A damaged record found at the end of a segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Corruption {
    pub segment: PathBuf,
    pub offset: u64,
    pub skipped_bytes: u64,
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub segment_max_bytes: u64,
    pub fsync_interval: Duration,
}

#[derive(Debug)]
struct Segment {
    bytes: u64,
}

struct Writer {
    id: SegmentId,
    file: BufWriter<File>,
    bytes: u64,
    unsynced: bool,
}

/// The spool. Single-threaded: owned by the Kafka sink's producer thread.
pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    segments: BTreeMap<SegmentId, Segment>,
    episode: u64,
    writers: [Option<Writer>; 2],
    /// Everything before it has been acknowledged.
    committed: Position,
    cursor_unsynced: bool,
    /// Next record to read.
    read_pos: Position,
    reader: Option<(SegmentId, File)>,
    rbuf: Vec<u8>,
    rbuf_start: u64,
    /// Records from `committed` on.
    records: u64,
    bytes: u64,
    last_sync: Instant,
    corruptions: Vec<Corruption>,
    encode_buf: Vec<u8>,
}

fn io_at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_at(dir, e))
}

impl Spool {
    /// Opens (or creates) the spool in `dir`: finds its segments, truncates a torn last record,
    /// and positions the reader at the first unacknowledged record.
    pub fn open(dir: &Path, opts: SpoolOptions) -> io::Result<Spool> {
        fs::create_dir_all(dir).map_err(|e| io_at(dir, e))?;
        let mut segments = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(|e| io_at(dir, e))? {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(SegmentId::parse) {
                segments.insert(id, Segment { bytes: 0 });
            }
        }
        let committed = read_cursor(dir).unwrap_or(Position::START);
        let episode = segments
            .keys()
            .map(|s| s.episode)
            .chain([committed.segment.episode])
            .max()
            .unwrap_or(0)
            + 1;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            opts,
            segments,
            episode,
            writers: [None, None],
            committed,
            cursor_unsynced: false,
            read_pos: committed,
            reader: None,
            rbuf: Vec::new(),
            rbuf_start: 0,
            records: 0,
            bytes: 0,
            last_sync: Instant::now(),
            corruptions: Vec::new(),
            encode_buf: Vec::new(),
        };
        // Segments wholly before the cursor were acknowledged: a crash came before deleting them.
        let before: Vec<SegmentId> = spool
            .segments
            .range(..committed.segment)
            .map(|(id, _)| *id)
            .collect();
        for id in before {
            spool.delete_segment(id)?;
        }
        let ids: Vec<SegmentId> = spool.segments.keys().copied().collect();
        for id in ids {
            let from = if id == committed.segment {
                committed.offset
            } else {
                0
            };
            spool.scan_segment(id, from)?;
        }
        if !spool.segments.contains_key(&committed.segment) {
            spool.committed = spool.first_position();
            spool.read_pos = spool.committed;
        }
        Ok(spool)
    }

    fn path(&self, id: SegmentId) -> PathBuf {
        self.dir.join(id.file_name())
    }

    fn first_position(&self) -> Position {
        self.segments
            .keys()
            .next()
            .map(|&segment| Position { segment, offset: 0 })
            .unwrap_or(Position::START)
    }

    /// Counts a segment's records from `from` on, truncating a damaged tail.
    fn scan_segment(&mut self, id: SegmentId, from: u64) -> io::Result<()> {
        let path = self.path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_at(&path, e))?;
        let len = file.metadata()?.len();
        let mut offset = 0;
        let mut records = 0;
        let mut header = [0u8; HEADER as usize];
        let mut body = Vec::new();
        let valid_end = loop {
            if offset == len {
                break len;
            }
            if offset + HEADER > len || file.read_exact_at(&mut header, offset).is_err() {
                break offset;
            }
            let (body_len, crc) = split_header(&header);
            if body_len > MAX_RECORD || offset + HEADER + body_len > len {
                break offset;
            }
            body.resize(body_len as usize, 0);
            file.read_exact_at(&mut body, offset + HEADER)?;
            if crc32fast::hash(&body) != crc || SpoolRecord::decode(&body).is_none() {
                break offset;
            }
            if offset >= from {
                records += 1;
            }
            offset += HEADER + body_len;
        };
        if valid_end < len {
            file.set_len(valid_end)?;
            file.sync_all()?;
            self.corruptions.push(Corruption {
                segment: path,
                offset: valid_end,
                skipped_bytes: len - valid_end,
            });
        }
        self.records += records;
        self.bytes += valid_end;
        if let Some(s) = self.segments.get_mut(&id) {
            s.bytes = valid_end;
        }
        Ok(())
    }

    /// Starts a new episode: later appends go to new segments after every existing one.
    pub fn begin_episode(&mut self) -> io::Result<()> {
        self.seal(Lane::Undelivered)?;
        self.seal(Lane::New)?;
        self.episode += 1;
        Ok(())
    }

    /// Closes `lane`'s open segment (written out and synced); the next append starts a new one.
    pub fn seal(&mut self, lane: Lane) -> io::Result<()> {
        if let Some(mut w) = self.writers[lane as usize].take() {
            w.file.flush()?;
            w.file.get_ref().sync_data()?;
        }
        Ok(())
    }

    /// Appends one event to `lane` (buffered: [`Spool::flush`] writes it out).
    pub fn append(&mut self, lane: Lane, record: &SpoolRecord) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.encode_buf);
        buf.clear();
        record.encode_into(&mut buf);
        let result = self.append_encoded(lane, &buf);
        self.encode_buf = buf;
        result
    }

    fn append_encoded(&mut self, lane: Lane, bytes: &[u8]) -> io::Result<()> {
        let slot = lane as usize;
        let roll = self.writers[slot].as_ref().is_some_and(|w| {
            w.bytes > 0 && w.bytes + bytes.len() as u64 > self.opts.segment_max_bytes
        });
        if roll {
            self.seal(lane)?;
        }
        if self.writers[slot].is_none() {
            let seq = self
                .segments
                .keys()
                .filter(|s| s.episode == self.episode && s.lane == lane)
                .map(|s| s.seq + 1)
                .max()
                .unwrap_or(0);
            let id = SegmentId {
                episode: self.episode,
                lane,
                seq,
            };
            let path = self.path(id);
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_at(&path, e))?;
            sync_dir(&self.dir)?;
            self.segments.insert(id, Segment { bytes: 0 });
            self.writers[slot] = Some(Writer {
                id,
                file: BufWriter::with_capacity(256 * 1024, file),
                bytes: 0,
                unsynced: false,
            });
        }
        let Some(w) = self.writers[slot].as_mut() else {
            return Err(io::Error::other("spool writer missing"));
        };
        w.file.write_all(bytes)?;
        w.bytes += bytes.len() as u64;
        w.unsynced = true;
        if let Some(s) = self.segments.get_mut(&w.id) {
            s.bytes = w.bytes;
        }
        self.records += 1;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Writes buffered appends to the files (a process crash no longer loses them).
    pub fn flush(&mut self) -> io::Result<()> {
        for w in self.writers.iter_mut().flatten() {
            w.file.flush()?;
        }
        Ok(())
    }

    /// Syncs written data and the cursor if `fsync_interval` has passed (or `force`).
    pub fn sync(&mut self, force: bool) -> io::Result<()> {
        if !force && self.last_sync.elapsed() < self.opts.fsync_interval {
            return Ok(());
        }
        self.last_sync = Instant::now();
        for w in self.writers.iter_mut().flatten() {
            if w.unsynced {
                w.file.flush()?;
                w.file.get_ref().sync_data()?;
                w.unsynced = false;
            }
        }
        if self.cursor_unsynced {
            write_cursor(&self.dir, self.committed)?;
            self.cursor_unsynced = false;
        }
        Ok(())
    }

    /// The next record to replay and the position just after it; `None` when every record
    /// written so far has been read.
    pub fn read_next(&mut self) -> io::Result<Option<(SpoolRecord, Position)>> {
        loop {
            let id = self.read_pos.segment;
            let Some(seg) = self.segments.get(&id) else {
                match self.next_segment(id) {
                    Some(next) => {
                        self.read_pos = Position {
                            segment: next,
                            offset: 0,
                        };
                        continue;
                    }
                    None => return Ok(None),
                }
            };
            let end = seg.bytes;
            if self.read_pos.offset >= end {
                if self.is_open(id) {
                    return Ok(None);
                }
                match self.next_segment(id) {
                    Some(next) => {
                        self.read_pos = Position {
                            segment: next,
                            offset: 0,
                        };
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            if let Some(w) = self.writers.iter_mut().flatten().find(|w| w.id == id) {
                w.file.flush()?;
            }
            match self.read_at(id, self.read_pos.offset, end)? {
                Some((record, len)) => {
                    self.read_pos.offset += len;
                    return Ok(Some((record, self.read_pos)));
                }
                None => {
                    // Damage in a segment that passed the scan at open: skip the rest of it.
                    let path = self.path(id);
                    self.corruptions.push(Corruption {
                        segment: path,
                        offset: self.read_pos.offset,
                        skipped_bytes: end - self.read_pos.offset,
                    });
                    if let Some(s) = self.segments.get_mut(&id) {
                        s.bytes = self.read_pos.offset;
                    }
                    if self.is_open(id) {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn next_segment(&self, id: SegmentId) -> Option<SegmentId> {
        self.segments
            .range((Bound::Excluded(id), Bound::Unbounded))
            .next()
            .map(|(id, _)| *id)
    }

    fn is_open(&self, id: SegmentId) -> bool {
        self.writers.iter().flatten().any(|w| w.id == id)
    }

    /// Reads the record at `offset` of segment `id` (which holds `end` valid bytes).
    fn read_at(
        &mut self,
        id: SegmentId,
        offset: u64,
        end: u64,
    ) -> io::Result<Option<(SpoolRecord, u64)>> {
        if self.reader.as_ref().map(|(r, _)| *r) != Some(id) {
            let path = self.path(id);
            let file = File::open(&path).map_err(|e| io_at(&path, e))?;
            self.reader = Some((id, file));
            self.rbuf.clear();
            self.rbuf_start = 0;
        }
        let Some(header) = self.buffered(offset, HEADER, end)? else {
            return Ok(None);
        };
        let (body_len, crc) = split_header(header.try_into().unwrap_or(&[0; 8]));
        if body_len > MAX_RECORD {
            return Ok(None);
        }
        let Some(body) = self.buffered(offset + HEADER, body_len, end)? else {
            return Ok(None);
        };
        if crc32fast::hash(body) != crc {
            return Ok(None);
        }
        Ok(SpoolRecord::decode(body).map(|r| (r, HEADER + body_len)))
    }

    /// `len` bytes at `offset` of the open reader's file, refilling the buffer as needed;
    /// `None` if they go past `end`.
    fn buffered(&mut self, offset: u64, len: u64, end: u64) -> io::Result<Option<&[u8]>> {
        if offset + len > end {
            return Ok(None);
        }
        let in_buf =
            offset >= self.rbuf_start && offset + len <= self.rbuf_start + self.rbuf.len() as u64;
        if !in_buf {
            let Some((_, file)) = &self.reader else {
                return Ok(None);
            };
            let want = (len as usize).max(READ_CHUNK).min((end - offset) as usize);
            self.rbuf.resize(want, 0);
            file.read_exact_at(&mut self.rbuf, offset)?;
            self.rbuf_start = offset;
        }
        let start = (offset - self.rbuf_start) as usize;
        Ok(Some(&self.rbuf[start..start + len as usize]))
    }

    /// Everything before `upto` has been acknowledged (`records` of them since the last call):
    /// moves the cursor and deletes segments wholly before it.
    pub fn commit(&mut self, upto: Position, records: u64) -> io::Result<()> {
        if upto <= self.committed {
            return Ok(());
        }
        self.committed = upto;
        self.cursor_unsynced = true;
        self.records = self.records.saturating_sub(records);
        let done: Vec<SegmentId> = self
            .segments
            .range(..upto.segment)
            .map(|(id, _)| *id)
            .filter(|id| !self.is_open(*id))
            .collect();
        // The cursor must be on disk before the segments it covers are deleted.
        if !done.is_empty() {
            write_cursor(&self.dir, self.committed)?;
            self.cursor_unsynced = false;
        }
        for id in done {
            self.delete_segment(id)?;
        }
        Ok(())
    }

    fn delete_segment(&mut self, id: SegmentId) -> io::Result<()> {
        if let Some(seg) = self.segments.remove(&id) {
            self.bytes = self.bytes.saturating_sub(seg.bytes);
        }
        if self.reader.as_ref().is_some_and(|(r, _)| *r == id) {
            self.reader = None;
        }
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&path, e)),
        }
    }

    /// When every record is acknowledged and no segment is open, removes the last segments
    /// too (the cursor covers them).
    pub fn compact_if_empty(&mut self) -> io::Result<()> {
        if self.records > 0 || self.writers.iter().any(Option::is_some) {
            return Ok(());
        }
        if self.read_pos < self.end_position() {
            return Ok(());
        }
        let ids: Vec<SegmentId> = self.segments.keys().copied().collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.committed = self.end_position();
        write_cursor(&self.dir, self.committed)?;
        self.cursor_unsynced = false;
        for id in ids {
            self.delete_segment(id)?;
        }
        // New segments must sort after the cursor.
        self.episode += 1;
        Ok(())
    }

    /// The position just after the last record appended.
    pub fn end_position(&self) -> Position {
        self.segments
            .iter()
            .next_back()
            .map(|(&segment, s)| Position {
                segment,
                offset: s.bytes,
            })
            .unwrap_or(self.committed)
    }

    /// Rereads from the first unacknowledged record (after sent records were taken back).
    pub fn rewind(&mut self) {
        self.read_pos = self.committed;
    }

    /// Where the next [`Spool::read_next`] reads.
    pub fn read_position(&self) -> Position {
        self.read_pos
    }

    /// Moves the reader back to `pos` (a record read but not sent).
    pub fn unread(&mut self, pos: Position) {
        self.read_pos = pos;
    }

    /// Records not yet acknowledged.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Damage found since the last call.
    pub fn take_corruptions(&mut self) -> Vec<Corruption> {
        std::mem::take(&mut self.corruptions)
    }

    /// Keeps a record Kafka refused permanently; returns the dead-letter file's path.
    pub fn dead_letter(&mut self, record: &SpoolRecord) -> io::Result<PathBuf> {
        let path = self.dir.join(DEAD_LETTER_FILE);
        let mut buf = Vec::new();
        record.encode_into(&mut buf);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_at(&path, e))?;
        f.write_all(&buf)?;
        f.sync_data()?;
        Ok(path)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn split_header(h: &[u8; 8]) -> (u64, u32) {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    (u64::from(len), crc)
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = fs::read_to_string(dir.join(CURSOR_FILE)).ok()?;
    let mut parts = text.split_whitespace();
    let segment = SegmentId::parse(parts.next()?)?;
    let offset = parts.next()?.parse().ok()?;
    Some(Position { segment, offset })
}

fn write_cursor(dir: &Path, pos: Position) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut f = File::create(&tmp).map_err(|e| io_at(&tmp, e))?;
    writeln!(f, "{} {}", pos.segment.file_name(), pos.offset)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(CURSOR_FILE))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn opts() -> SpoolOptions {
        SpoolOptions {
            segment_max_bytes: 1024,
            fsync_interval: Duration::from_millis(0),
        }
    }

    fn rec(i: u64) -> SpoolRecord {
        SpoolRecord {
            topic: Topic::ALL[(i % 3) as usize],
            timestamp_ms: 1_700_000_000_000 + i as i64,
            key: format!("tenant-{}", i % 4).into_bytes(),
            payload: format!(
                "{{\"n\":{i},\"pad\":\"{}\"}}",
                "x".repeat((i % 50) as usize)
            )
            .into_bytes(),
        }
    }

    fn drain(s: &mut Spool) -> Vec<(SpoolRecord, Position)> {
        let mut v = Vec::new();
        while let Some(r) = s.read_next().unwrap() {
            v.push(r);
        }
        v
    }

    fn n_of(r: &SpoolRecord) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        v["n"].as_u64().unwrap()
    }

    #[test]
    fn records_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        for i in 0..100 {
            s.append(Lane::New, &rec(i)).unwrap();
        }
        s.flush().unwrap();
        let segments = fs::read_dir(dir.path()).unwrap().count();
        assert!(segments > 3, "segments roll at 1 KiB: {segments}");
        let got = drain(&mut s);
        assert_eq!(got.len(), 100);
        for (i, (r, _)) in got.iter().enumerate() {
            assert_eq!(r, &rec(i as u64));
        }
        assert_eq!(s.records(), 100);
    }

    #[test]
    fn the_undelivered_lane_is_replayed_before_later_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        s.append(Lane::New, &rec(10)).unwrap();
        s.append(Lane::Undelivered, &rec(1)).unwrap();
        s.append(Lane::New, &rec(11)).unwrap();
        s.append(Lane::Undelivered, &rec(2)).unwrap();
        s.seal(Lane::Undelivered).unwrap();
        let got: Vec<u64> = drain(&mut s).iter().map(|(r, _)| n_of(r)).collect();
        assert_eq!(got, vec![1, 2, 10, 11]);
    }

    #[test]
    fn reading_follows_the_writer_and_resumes_after_more_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        s.append(Lane::New, &rec(0)).unwrap();
        assert_eq!(drain(&mut s).len(), 1);
        assert!(s.read_next().unwrap().is_none());
        for i in 1..40 {
            s.append(Lane::New, &rec(i)).unwrap();
        }
        let got: Vec<u64> = drain(&mut s).iter().map(|(r, _)| n_of(r)).collect();
        assert_eq!(got, (1..40).collect::<Vec<_>>());
    }

    #[test]
    fn a_reopened_spool_resumes_at_the_committed_cursor_and_deletes_acknowledged_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), opts()).unwrap();
            for i in 0..60 {
                s.append(Lane::New, &rec(i)).unwrap();
            }
            let got = drain(&mut s);
            // Kafka acknowledged the first 45.
            s.commit(got[44].1, 45).unwrap();
            s.sync(true).unwrap();
            assert_eq!(s.records(), 15);
            // A crash: nothing else is done.
        }
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(s.records(), 15);
        let got: Vec<u64> = drain(&mut s).iter().map(|(r, _)| n_of(r)).collect();
        assert_eq!(got, (45..60).collect::<Vec<_>>());
        // New events of this run go after the old ones.
        s.append(Lane::New, &rec(60)).unwrap();
        let got: Vec<u64> = drain(&mut s).iter().map(|(r, _)| n_of(r)).collect();
        assert_eq!(got, vec![60]);
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_truncated_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), opts()).unwrap();
            for i in 0..5 {
                s.append(Lane::New, &rec(i)).unwrap();
            }
            s.sync(true).unwrap();
        }
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "spool"))
            .unwrap();
        let full = fs::metadata(&seg).unwrap().len();
        // A crash in the middle of writing the sixth record.
        let mut tail = Vec::new();
        rec(5).encode_into(&mut tail);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&tail[..tail.len() / 2]).unwrap();
        drop(f);

        let mut s = Spool::open(dir.path(), opts()).unwrap();
        let c = s.take_corruptions();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].offset, full);
        assert_eq!(fs::metadata(&seg).unwrap().len(), full, "truncated");
        let got: Vec<u64> = drain(&mut s).iter().map(|(r, _)| n_of(r)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_record_with_a_bad_checksum_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), opts()).unwrap();
            for i in 0..3 {
                s.append(Lane::New, &rec(i)).unwrap();
            }
            s.sync(true).unwrap();
        }
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "spool"))
            .unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(s.take_corruptions().len(), 1);
        assert_eq!(drain(&mut s).len(), 2);
    }

    #[test]
    fn rewind_rereads_unacknowledged_records_and_an_empty_spool_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        for i in 0..10 {
            s.append(Lane::New, &rec(i)).unwrap();
        }
        let got = drain(&mut s);
        s.commit(got[3].1, 4).unwrap();
        s.rewind();
        let again: Vec<u64> = drain(&mut s).iter().map(|(r, _)| n_of(r)).collect();
        assert_eq!(again, (4..10).collect::<Vec<_>>());
        s.seal(Lane::New).unwrap();
        s.commit(got[9].1, 6).unwrap();
        assert_eq!(s.records(), 0);
        s.compact_if_empty().unwrap();
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".spool"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(s.bytes(), 0);
        // And it is usable afterwards, from a reopened state too.
        s.begin_episode().unwrap();
        s.append(Lane::New, &rec(77)).unwrap();
        s.sync(true).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        let got: Vec<u64> = drain(&mut s).iter().map(|(r, _)| n_of(r)).collect();
        assert_eq!(got, vec![77]);
    }

    #[test]
    fn dead_letters_are_kept_apart_and_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), opts()).unwrap();
        let path = s.dead_letter(&rec(1)).unwrap();
        assert!(path.exists());
        assert!(s.read_next().unwrap().is_none());
        let s = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(s.records(), 0);
    }

    #[test]
    fn segment_names_sort_in_replay_order() {
        let a = SegmentId {
            episode: 2,
            lane: Lane::New,
            seq: 9,
        };
        let b = SegmentId {
            episode: 10,
            lane: Lane::Undelivered,
            seq: 0,
        };
        assert!(a < b);
        assert!(a.file_name() < b.file_name());
        assert_eq!(SegmentId::parse(&b.file_name()), Some(b));
        assert_eq!(SegmentId::parse("cursor"), None);
    }
}
