//! Incremental server-sent-events parser for upstream bodies.
//!
//! Frames may be split anywhere across reads; lines may end in LF, CRLF or CR; comment lines
//! (`: keep-alive`) and `event:` lines are kept. Each frame keeps its raw bytes so a
//! same-dialect relay can forward it untouched, and its `data` as a zero-copy slice when the
//! frame has a single data line (the common case).

use bytes::{Bytes, BytesMut};

/// One complete SSE frame.
#[derive(Debug, Clone, PartialEq)]
pub struct SseFrame {
    /// The frame exactly as received, blank-line terminator included.
    pub raw: Bytes,
    /// The `event:` field, if any.
    pub event: Option<Bytes>,
    /// The `data:` lines joined with `\n`; `None` for a comment-only frame.
    pub data: Option<Bytes>,
}

impl SseFrame {
    /// The event name as text ("" when absent or not UTF-8).
    pub fn event_name(&self) -> &str {
        self.event
            .as_deref()
            .and_then(|e| std::str::from_utf8(e).ok())
            .unwrap_or("")
    }
}

/// The default bound on one upstream event (`server.max_upstream_event_bytes`): all its
/// lines up to the blank line that ends it. The largest legitimate events are base64
/// payloads (a 1536×1024 PNG is about 4 MB in base64); ordinary chunks are under 1 KB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// Splits a byte stream into frames, in time linear in its length: the scan for a frame's
/// end resumes where the previous one stopped, and an unfinished frame is bounded (past the
/// bound the parser stops buffering and reports [`SseParser::overflowed`]).
#[derive(Debug)]
pub struct SseParser {
    buf: BytesMut,
    /// Where the scan for the end of the first frame resumes (bytes before it are lines
    /// already seen).
    scan: usize,
    /// Where the line being scanned starts.
    line_start: usize,
    max_event_bytes: usize,
    overflowed: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    pub fn new() -> Self {
        SseParser::default()
    }

    /// A parser that gives up on an event longer than `max` bytes.
    pub fn with_max_event_bytes(max: usize) -> Self {
        SseParser {
            buf: BytesMut::new(),
            scan: 0,
            line_start: 0,
            max_event_bytes: max.max(1),
            overflowed: false,
        }
    }

    /// The bound on one event, in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// Whether an event grew past the bound: the parser has dropped what it held and
    /// ignores what follows (the stream cannot be resynchronized safely).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Appends bytes read from upstream.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.overflowed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame, if the buffer holds one.
    pub fn next_frame(&mut self) -> Option<SseFrame> {
        if self.overflowed {
            return None;
        }
        let Some(end) = self.frame_end() else {
            if self.buf.len() > self.max_event_bytes {
                self.overflowed = true;
                self.buf = BytesMut::new();
                self.scan = 0;
                self.line_start = 0;
            }
            return None;
        };
        self.scan = 0;
        self.line_start = 0;
        let raw = self.buf.split_to(end).freeze();
        Some(parse_frame(raw))
    }

    /// What is left when the upstream closed: a final frame without its blank line, if any
    /// data is in it.
    pub fn finish(&mut self) -> Option<SseFrame> {
        self.scan = 0;
        self.line_start = 0;
        if self.overflowed || self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            self.buf.clear();
            return None;
        }
        let raw = self.buf.split().freeze();
        let frame = parse_frame(raw);
        frame.data.as_ref()?;
        Some(frame)
    }

    /// The index just past the blank line that ends the first frame in the buffer, scanning
    /// from where the last call stopped.
    fn frame_end(&mut self) -> Option<usize> {
        let buf = &self.buf[..];
        let mut i = self.scan;
        while let Some(off) = memchr::memchr2(b'\n', b'\r', &buf[i..]) {
            let pos = i + off;
            let mut next = pos + 1;
            if buf[pos] == b'\r' {
                match buf.get(next) {
                    // A CR at the end of the buffer may be the first half of a CRLF: look
                    // at it again when more has arrived.
                    None => {
                        self.scan = pos;
                        return None;
                    }
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                }
            }
            if pos == self.line_start {
                return Some(next);
            }
            self.line_start = next;
            i = next;
        }
        self.scan = buf.len();
        None
    }
}

fn parse_frame(raw: Bytes) -> SseFrame {
    // SSE is UTF-8 text: invalid bytes from an upstream become U+FFFD here, once, so that a
    // relayed frame is valid for every client and a translated one is not dropped by its
    // JSON parser. Valid frames (all of them, in practice) are checked and kept as they are.
    let raw = match std::str::from_utf8(&raw) {
        Ok(_) => raw,
        Err(_) => Bytes::from(String::from_utf8_lossy(&raw).into_owned()),
    };
    let mut event = None;
    let mut data: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut start = 0;
    let len = raw.len();
    while start < len {
        let rel = memchr::memchr2(b'\n', b'\r', &raw[start..]).unwrap_or(len - start);
        let end = start + rel;
        let mut next = end + 1;
        if end < len && raw[end] == b'\r' && raw.get(end + 1) == Some(&b'\n') {
            next += 1;
        }
        let line = &raw[start..end];
        if !line.is_empty() && line[0] != b':' {
            let (field, value_start) = match memchr::memchr(b':', line) {
                Some(c) => {
                    let mut v = c + 1;
                    if line.get(v) == Some(&b' ') {
                        v += 1;
                    }
                    (&line[..c], start + v)
                }
                None => (line, end),
            };
            let value = raw.slice(value_start.min(end)..end);
            match field {
                b"data" => {
                    if let Some(j) = joined.as_mut() {
                        j.extend_from_slice(b"\n");
                        j.extend_from_slice(&value);
                    } else if let Some(first) = data.take() {
                        let mut j = BytesMut::from(&first[..]);
                        j.extend_from_slice(b"\n");
                        j.extend_from_slice(&value);
                        joined = Some(j);
                    } else {
                        data = Some(value);
                    }
                }
                b"event" => event = Some(value),
                _ => {}
            }
        }
        start = next;
    }
    if let Some(j) = joined {
        data = Some(j.freeze());
    }
    SseFrame { raw, event, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames(pieces: &[&[u8]]) -> Vec<SseFrame> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for piece in pieces {
            p.push(piece);
            while let Some(f) = p.next_frame() {
                out.push(f);
            }
        }
        out.extend(p.finish());
        out
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        let mut p = SseParser::new();
        p.push(b"data: {\"content\":\"caf\xc3\"}\n\ndata: ok\n\n");
        let f = p.next_frame().unwrap();
        let raw = std::str::from_utf8(&f.raw).unwrap();
        assert_eq!(raw, "data: {\"content\":\"caf\u{fffd}\"}\n\n");
        assert_eq!(
            std::str::from_utf8(f.data.as_ref().unwrap()).unwrap(),
            "{\"content\":\"caf\u{fffd}\"}"
        );
        assert_eq!(p.next_frame().unwrap().data.as_deref(), Some(&b"ok"[..]));
    }
    #[test]
    fn frames_split_anywhere_reassemble() {
        let whole = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\r\n\r\ndata: [DONE]\r\n\r\n";
        let expected = all_frames(&[whole]);
        assert_eq!(expected.len(), 3);
        for cut in 1..whole.len() {
            let got = all_frames(&[&whole[..cut], &whole[cut..]]);
            assert_eq!(got, expected, "cut at {cut}");
        }
        // Byte by byte.
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(all_frames(&bytes), expected);
    }

    #[test]
    fn fields_are_parsed() {
        let f = all_frames(&[b"event: ping\ndata: {\"type\": \"ping\"}\n\n"]);
        assert_eq!(f[0].event_name(), "ping");
        assert_eq!(f[0].data.as_deref(), Some(&b"{\"type\": \"ping\"}"[..]));
        let c = all_frames(&[b": OPENROUTER PROCESSING\n\n"]);
        assert_eq!(c[0].data, None);
        let multi = all_frames(&[b"data: a\ndata: b\n\n"]);
        assert_eq!(multi[0].data.as_deref(), Some(&b"a\nb"[..]));
        let nospace = all_frames(&[b"data:x\r\r"]);
        assert_eq!(nospace[0].data.as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn an_event_over_the_bound_stops_the_parser() {
        let mut p = SseParser::with_max_event_bytes(64);
        p.push(b"data: ok\n\n");
        assert_eq!(
            p.next_frame().map(|f| f.data),
            Some(Some(Bytes::from("ok")))
        );
        // A line without its end, fed a byte at a time: never more than the bound held.
        for _ in 0..64 {
            p.push(b"x");
            assert!(p.next_frame().is_none());
            assert!(!p.overflowed());
        }
        p.push(b"x");
        assert!(p.next_frame().is_none());
        assert!(p.overflowed());
        p.push(b"\n\ndata: late\n\n");
        assert!(p.next_frame().is_none(), "nothing after an overflow");
        assert!(p.finish().is_none());
        // Many short lines without the blank line count too.
        let mut p = SseParser::with_max_event_bytes(64);
        for _ in 0..20 {
            p.push(b"data: 1234\n");
            let _ = p.next_frame();
        }
        assert!(p.overflowed());
        // Frames that fit, however many, do not.
        let mut p = SseParser::with_max_event_bytes(64);
        for _ in 0..1000 {
            p.push(b"data: 1234\n\n");
            assert!(p.next_frame().is_some());
        }
        assert!(!p.overflowed());
    }

    #[test]
    fn a_long_line_is_scanned_once() {
        // Fed in 1-byte reads, a 2 MB line costs a linear scan (this took minutes when every
        // read rescanned the buffer from its start).
        let mut p = SseParser::new();
        p.push(b"data: ");
        for _ in 0..(2 << 20) {
            p.push(b"y");
            assert!(p.next_frame().is_none());
        }
        p.push(b"\r");
        assert!(p.next_frame().is_none());
        p.push(b"\n\r\n");
        let f = p.next_frame().unwrap();
        assert_eq!(f.data.map(|d| d.len()), Some(2 << 20));
    }

    #[test]
    fn unterminated_last_frame_is_returned_by_finish() {
        let f = all_frames(&[b"data: {\"x\":1}\n\ndata: tail"]);
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].data.as_deref(), Some(&b"tail"[..]));
    }
}
