//! The relay: carries an upstream response to the client, counts what it carries, and records
//! one completion per request however it ends (finished, upstream error, client gone).
//!
//! | file | owns |
//! |---|---|
//! | `sse.rs` | incremental SSE frame parser |
//! | `passthrough.rs` | same-dialect stream adapters (bytes forwarded untouched where possible) |
//! | `stream.rs` | [`RelayStream`]: the response body; drives an adapter, writes a burst's first output at once, reports the request (late) and each SSE data event relayed, finalizes on end or drop |
//! | `usage_trailer.rs` | a finished stream's token count as the trailer `x-tollgate-usage-tokens` (for Envoy's rate limit at stream end) |
//! | `exchange.rs` | [`Exchange`]: one request's context, and the request, chunk and completion records it produces |
//!
//! Cross-dialect adapters (OpenAI ↔ Anthropic) live in `crate::translate::stream`.

pub mod exchange;
pub mod passthrough;
pub mod rename;
pub mod sse;
pub mod stream;
pub mod usage_trailer;

use std::time::Instant;

use bytes::BytesMut;
use tollgate_schemas::TokenUsage;

pub use exchange::{ChunkRecord, CompletionRecord, Exchange, Outcome, RequestRecord, StreamInfo};
pub use sse::{SseFrame, SseParser};
pub use stream::RelayStream;

/// What an adapter learned from the stream so far.
#[derive(Debug, Default, Clone)]
pub struct StreamState {
    /// Usage the upstream reported, merged across events.
    pub usage: Option<TokenUsage>,
    /// Whether `usage` is the final figure (a usage chunk, or Anthropic's `message_delta`).
    pub usage_final: bool,
    /// The upstream reported usage that does not add up (then `usage` is not billed).
    pub usage_rejected: Option<crate::translate::usage::Implausible>,
    /// The finish/stop reason, in the client's dialect.
    pub finish_reason: Option<String>,
    /// Content-bearing events relayed to the client.
    pub chunks: u64,
    /// When the first event was relayed to the client.
    pub first_output_at: Option<Instant>,
    /// An error the upstream reported mid-stream.
    pub upstream_error: Option<String>,
    /// Whether the stream's terminal event (`[DONE]`, `message_stop`) was seen.
    pub terminated: bool,
}

/// Turns upstream SSE frames into what the client receives.
pub trait StreamAdapter: Send {
    /// Handles one upstream frame, appending the client's bytes to `out`.
    fn on_frame(&mut self, frame: SseFrame, out: &mut BytesMut);
    /// The upstream body ended; append any closing frames the client still needs.
    fn on_end(&mut self, out: &mut BytesMut);
    /// The upstream connection failed mid-stream; end the client's stream with an error event.
    fn on_error(&mut self, message: &str, out: &mut BytesMut);
    /// What was learned so far.
    fn state(&self) -> &StreamState;
    /// The output text relayed so far, for counting tokens when the upstream reported none
    /// (and for the audit trail).
    fn output_text(&self) -> String;
    /// Keep the whole output text for [`StreamAdapter::output_text`] even once the upstream's
    /// usage report makes counting moot (an audited request). Adapters that always keep it
    /// need do nothing.
    fn keep_output_text(&mut self) {}
}

/// The output text one SSE event carries, as the client received it in `format` (content,
/// tool names and arguments, reasoning); empty for events that carry none.
pub fn event_output_text(format: crate::api::WireFormat, event: &[u8]) -> String {
    let mut data: Vec<u8> = Vec::new();
    for line in event.split(|b| *b == b'\n' || *b == b'\r') {
        if let Some(rest) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    let mut text = String::new();
    match format {
        crate::api::WireFormat::OpenAi => {
            if let Ok(chunk) = serde_json::from_slice::<crate::api::openai::ChatChunk>(&data) {
                passthrough::append_chunk_text(&chunk, &mut text);
            }
        }
        crate::api::WireFormat::Anthropic => {
            if let Ok(crate::api::anthropic::StreamEvent::ContentBlockDelta { delta, .. }) =
                serde_json::from_slice(&data)
            {
                passthrough::append_block_delta_text(&delta, &mut text);
            }
        }
    }
    text
}

impl StreamState {
    /// Takes an upstream's usage report, read from its dialect: believed if it adds up,
    /// otherwise remembered as rejected.
    pub fn report_usage(
        &mut self,
        reported: Result<TokenUsage, crate::translate::usage::Implausible>,
    ) {
        match reported {
            Ok(u) => self.usage = Some(u),
            Err(why) => {
                self.usage = None;
                self.usage_rejected = Some(why);
            }
        }
    }
}

/// Writes one `data:` frame.
pub fn write_data(out: &mut BytesMut, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// Writes one `event:` + `data:` frame (Anthropic style).
pub fn write_event(out: &mut BytesMut, event: &str, json: &[u8]) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}
