//! Server-sent-event framing: rendering frames into one shared buffer, turning a list of
//! frames into a timed [`Step`] script, and the `split-frames` wire mangling.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::body::Step;

/// Renders SSE frames into one growing buffer; each frame is split off as its own [`Bytes`]
/// sharing the allocation, so a whole response costs about one allocation.
pub(crate) struct SseWriter {
    buf: BytesMut,
    eol: &'static str,
}

impl SseWriter {
    /// `crlf` selects `\r\n` line endings (the `split-frames` scenario) instead of `\n`.
    pub(crate) fn new(crlf: bool, capacity: usize) -> SseWriter {
        SseWriter {
            buf: BytesMut::with_capacity(capacity),
            eol: if crlf { "\r\n" } else { "\n" },
        }
    }

    /// `data: <parts...>` and a blank line (OpenAI style).
    pub(crate) fn data(&mut self, parts: &[&str]) -> Bytes {
        self.buf.extend_from_slice(b"data: ");
        for part in parts {
            self.buf.extend_from_slice(part.as_bytes());
        }
        self.end_frame()
    }

    /// `event: <name>`, `data: <parts...>` and a blank line (Anthropic style).
    pub(crate) fn event(&mut self, name: &str, parts: &[&str]) -> Bytes {
        self.buf.extend_from_slice(b"event: ");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(self.eol.as_bytes());
        self.data(parts)
    }

    fn end_frame(&mut self) -> Bytes {
        self.buf.extend_from_slice(self.eol.as_bytes());
        self.buf.extend_from_slice(self.eol.as_bytes());
        self.buf.split().freeze()
    }
}

/// A rendered frame and how many content chunks it carries.
pub(crate) struct SseFrame {
    pub(crate) bytes: Bytes,
    pub(crate) content: usize,
}

impl SseFrame {
    pub(crate) fn meta(bytes: Bytes) -> SseFrame {
        SseFrame { bytes, content: 0 }
    }

    pub(crate) fn content(bytes: Bytes) -> SseFrame {
        SseFrame { bytes, content: 1 }
    }
}

/// Timing applied to a streamed reply.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    /// Before the first frame.
    pub(crate) first: Duration,
    /// Before every content frame except the first one.
    pub(crate) between: Duration,
}

/// One [`Step`] per frame, paced: `pace.first` before the first frame, `pace.between`
/// before each content frame after the first content frame.
pub(crate) fn paced(frames: Vec<SseFrame>, pace: Pace) -> Vec<Step> {
    let mut steps = Vec::with_capacity(frames.len() * 2 + 1);
    if !pace.first.is_zero() {
        steps.push(Step::Sleep(pace.first));
    }
    let mut seen_content = false;
    for frame in frames {
        if frame.content > 0 {
            if seen_content && !pace.between.is_zero() {
                steps.push(Step::Sleep(pace.between));
            }
            seen_content = true;
        }
        steps.push(Step::Data {
            bytes: frame.bytes,
            content: frame.content,
        });
    }
    steps
}

/// The `huge-line` scenario's line: a data line `bytes` long without its newline, in
/// 64 KiB writes (one shared buffer).
pub(crate) fn huge_line(bytes: usize) -> Vec<Step> {
    const WRITE: usize = 64 * 1024;
    let head = Bytes::from_static(br#"data: {"choices":[{"index":0,"delta":{"content":""#);
    let filler = Bytes::from(vec![b'x'; WRITE]);
    let mut steps = vec![Step::data(head)];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(WRITE);
        steps.push(Step::data(filler.slice(..n)));
        left -= n;
    }
    steps
}

/// The `keepalive-only` scenario's tail: `n` keep-alive comments, `every` apart, and no data.
pub(crate) fn keepalives(every: Duration, n: usize) -> Vec<Step> {
    let mut steps = Vec::with_capacity(2 * n);
    for _ in 0..n {
        steps.push(Step::Sleep(every));
        steps.push(Step::data(Bytes::from_static(b": ping\n\n")));
    }
    steps
}

/// Pause between the pieces of a split stream, long enough that each piece reaches the
/// client in its own read.
pub const SPLIT_PIECE_DELAY: Duration = Duration::from_millis(1);

/// Comment lines interleaved by `split-frames`, as aggregators send them while they wait.
const KEEP_ALIVES: [&str; 2] = [": OPENROUTER PROCESSING\r\n\r\n", ": keep-alive\r\n"];

/// The `split-frames` wire format: the frames (rendered with CRLF line endings) plus comment
/// lines — one before the first frame and one after every third frame — are written as one
/// byte stream cut in awkward places: two bytes into each frame (`da|ta:` or `ev|ent:`), three
/// bytes into every `data:` line after the first line of a frame, between the halves of every
/// `\r\n`, in the middle of each JSON payload, and in the middle of each comment. Frame
/// boundaries are never cuts, so most pieces end one frame and begin the next. Each piece is
/// its own body frame, [`SPLIT_PIECE_DELAY`] apart.
pub(crate) fn split_frames(frames: Vec<SseFrame>, first: Duration) -> Vec<Step> {
    let total: usize = frames.iter().map(|f| f.bytes.len()).sum::<usize>() + 64 * frames.len();
    let mut stream = BytesMut::with_capacity(total);
    let mut cuts: Vec<usize> = Vec::new();
    // (offset just past a content frame's last byte, content count)
    let mut content_ends: Vec<(usize, usize)> = Vec::new();

    fn push_comment(stream: &mut BytesMut, cuts: &mut Vec<usize>, which: usize) {
        let comment = KEEP_ALIVES[which % KEEP_ALIVES.len()];
        let start = stream.len();
        stream.extend_from_slice(comment.as_bytes());
        cuts.push(start + comment.len() / 2);
    }

    push_comment(&mut stream, &mut cuts, 0);
    for (n, frame) in frames.iter().enumerate() {
        let start = stream.len();
        let bytes = &frame.bytes[..];
        stream.extend_from_slice(bytes);
        cuts.push(start + 2.min(bytes.len()));
        for (i, pair) in bytes.windows(2).enumerate() {
            if pair == b"\r\n" {
                cuts.push(start + i + 1);
                if bytes[i + 2..].starts_with(b"data:") {
                    cuts.push(start + i + 2 + 3);
                }
            }
        }
        if let Some(json_at) = find(bytes, b"data: ") {
            let json_start = json_at + 6;
            let json_end =
                find(&bytes[json_start..], b"\r\n").map_or(bytes.len(), |e| json_start + e);
            cuts.push(start + json_start + (json_end - json_start) / 2);
        }
        if frame.content > 0 {
            content_ends.push((stream.len(), frame.content));
        }
        if n % 3 == 2 {
            push_comment(&mut stream, &mut cuts, n / 3 + 1);
        }
    }

    let stream = stream.freeze();
    cuts.retain(|&c| c > 0 && c < stream.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts.push(stream.len());

    let mut steps = Vec::with_capacity(cuts.len() * 2 + 1);
    if !first.is_zero() {
        steps.push(Step::Sleep(first));
    }
    let mut from = 0;
    let mut content_iter = content_ends.into_iter().peekable();
    for (i, to) in cuts.into_iter().enumerate() {
        if i > 0 {
            steps.push(Step::Sleep(SPLIT_PIECE_DELAY));
        }
        let mut content = 0;
        while let Some(&(end, count)) = content_iter.peek() {
            if end > to {
                break;
            }
            content += count;
            content_iter.next();
        }
        steps.push(Step::Data {
            bytes: stream.slice(from..to),
            content,
        });
        from = to;
    }
    steps
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_stream_reassembles_and_cuts_crlf() {
        let mut w = SseWriter::new(true, 256);
        let frames = vec![
            SseFrame::meta(w.event("message_start", &[r#"{"type":"message_start"}"#])),
            SseFrame::content(w.data(&[r#"{"x":1}"#])),
            SseFrame::content(w.data(&[r#"{"x":2}"#])),
            SseFrame::meta(w.data(&["[DONE]"])),
        ];
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.bytes.to_vec()).collect();
        let steps = split_frames(frames, Duration::ZERO);
        let mut joined = Vec::new();
        let mut content = 0;
        let mut pieces = Vec::new();
        for step in steps {
            if let Step::Data { bytes, content: c } = step {
                joined.extend_from_slice(&bytes);
                content += c;
                pieces.push(bytes);
            }
        }
        assert_eq!(content, 2);
        assert!(pieces.iter().any(|p| p.ends_with(b"\r")));
        assert!(pieces.iter().any(|p| p.starts_with(b"\n")));
        assert!(pieces.iter().any(|p| p.ends_with(b"da")));
        let text = String::from_utf8(joined).unwrap();
        assert!(text.contains(": OPENROUTER PROCESSING\r\n\r\n"));
        let without_comments: String = text
            .split_inclusive("\r\n")
            .filter(|line| !line.starts_with(':'))
            .collect();
        // Dropping comment lines leaves the original frames (comments may add blank lines).
        assert_eq!(
            without_comments
                .trim_start_matches("\r\n")
                .replace("\r\n\r\n\r\n", "\r\n\r\n"),
            String::from_utf8(expected).unwrap()
        );
    }
}
