//! Incremental scanner for a streamed response body: counts SSE data events and notices the
//! stream terminator without copying or parsing JSON.
//!
//! Lines may be split across body frames at any byte, so an incomplete trailing line is carried
//! over to the next frame; complete lines are scanned in place. Lines end in `\n` (a preceding
//! `\r` is stripped); bare-`\r` line endings are not recognised, as no LLM API emits them.

use super::WireFormat;

/// Running state of one response stream.
#[derive(Debug)]
pub struct SseScanner {
    format: WireFormat,
    /// Bytes of a line that has not ended yet.
    partial: Vec<u8>,
    /// A `data:` line has been seen since the last blank line.
    event_has_data: bool,
    /// SSE events that carried data, not counting the OpenAI `[DONE]` sentinel.
    data_events: u64,
    saw_data: bool,
    terminated: bool,
}

impl SseScanner {
    /// A scanner for a stream in the given wire format.
    pub fn new(format: WireFormat) -> Self {
        Self {
            format,
            partial: Vec::new(),
            event_has_data: false,
            data_events: 0,
            saw_data: false,
            terminated: false,
        }
    }

    /// Scans one body frame. Returns `true` if this frame completed the stream's first `data:`
    /// line, i.e. the moment that counts as time to first token.
    pub fn feed(&mut self, mut buf: &[u8]) -> bool {
        let had_data = self.saw_data;
        if !self.partial.is_empty() {
            match buf.iter().position(|&b| b == b'\n') {
                None => {
                    self.partial.extend_from_slice(buf);
                    return false;
                }
                Some(nl) => {
                    let mut line = std::mem::take(&mut self.partial);
                    line.extend_from_slice(&buf[..nl]);
                    self.line(&line);
                    // Keep the allocation for the next split line.
                    line.clear();
                    self.partial = line;
                    buf = &buf[nl + 1..];
                }
            }
        }
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            self.line(&buf[..nl]);
            buf = &buf[nl + 1..];
        }
        self.partial.extend_from_slice(buf);
        !had_data && self.saw_data
    }

    /// Ends the stream: a final line without a newline still counts, as does a last event
    /// without its blank line (lenient, like most SDKs).
    pub fn finish(&mut self) -> bool {
        let had_data = self.saw_data;
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line);
        }
        if self.event_has_data {
            self.event_has_data = false;
            self.data_events += 1;
        }
        !had_data && self.saw_data
    }

    /// SSE data events seen so far (the `[DONE]` sentinel excluded).
    pub fn data_events(&self) -> u64 {
        self.data_events
    }

    /// Whether the format's terminator was seen: `data: [DONE]` for OpenAI,
    /// `event: message_stop` for Anthropic.
    pub fn terminated(&self) -> bool {
        self.terminated
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.event_has_data {
                self.event_has_data = false;
                self.data_events += 1;
            }
        } else if let Some(value) = line.strip_prefix(b"data:") {
            self.saw_data = true;
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.format == WireFormat::OpenAi && value == b"[DONE]" {
                self.terminated = true;
            } else {
                self.event_has_data = true;
            }
        } else if let Some(value) = line.strip_prefix(b"event:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.format == WireFormat::Anthropic && value == b"message_stop" {
                self.terminated = true;
            }
        }
        // Comments (`: keep-alive`), `id:` and `retry:` lines carry nothing we measure.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI: &[u8] = b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\n: keep-alive\n\ndata: [DONE]\n\n";

    #[test]
    fn counts_openai_events_and_done() {
        let mut s = SseScanner::new(WireFormat::OpenAi);
        assert!(s.feed(OPENAI));
        assert!(!s.finish());
        assert_eq!(s.data_events(), 2);
        assert!(s.terminated());
    }

    #[test]
    fn any_split_point_gives_the_same_result() {
        for split in 0..=OPENAI.len() {
            let mut s = SseScanner::new(WireFormat::OpenAi);
            let first = s.feed(&OPENAI[..split]);
            let second = s.feed(&OPENAI[split..]);
            s.finish();
            assert_eq!(s.data_events(), 2, "split at {split}");
            assert!(s.terminated(), "split at {split}");
            // The first data line ends at byte 13 (its newline); only then is TTFT taken.
            assert_eq!(first, split > 13, "split at {split}");
            assert_eq!(second, split <= 13, "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte_with_crlf() {
        let body = OPENAI
            .split(|&b| b == b'\n')
            .flat_map(|l| l.iter().copied().chain(*b"\r\n"))
            .collect::<Vec<u8>>();
        let mut s = SseScanner::new(WireFormat::OpenAi);
        let firsts = body
            .iter()
            .filter(|b| s.feed(std::slice::from_ref(b)))
            .count();
        s.finish();
        assert_eq!(firsts, 1);
        assert_eq!(s.data_events(), 2);
        assert!(s.terminated());
    }

    #[test]
    fn stream_cut_short_is_not_terminated() {
        let mut s = SseScanner::new(WireFormat::OpenAi);
        s.feed(b"data: {\"a\":1}\n\ndata: {\"a\"");
        s.finish();
        assert_eq!(s.data_events(), 2);
        assert!(!s.terminated());
    }

    #[test]
    fn anthropic_message_stop() {
        let body = b"event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\n\
                     event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut s = SseScanner::new(WireFormat::Anthropic);
        s.feed(body);
        s.finish();
        assert_eq!(s.data_events(), 3);
        assert!(s.terminated());

        // `[DONE]` means nothing to an Anthropic client.
        let mut s = SseScanner::new(WireFormat::Anthropic);
        s.feed(b"data: [DONE]\n\n");
        assert!(!s.terminated());
    }
}
