//! Entry points for the fuzz tests (`tests/tests/fuzz.rs`): every hand-written reader of bytes
//! that come from clients, providers or Redis, run on arbitrary input. Each returns what the
//! tests compare (the same input cut differently must read the same); none may panic. Not an
//! API: it exists so that the private parsers can be fuzzed from outside the crate.

use bytes::{Bytes, BytesMut};

use crate::api::WireFormat;
use crate::error::GatewayError;
use crate::relay::SseParser;

/// The SSE frames of `input` fed in pieces cut at `cuts` (sorted, within `input`), and what
/// is left at the end.
pub fn sse(input: &[u8], cuts: &[usize]) -> (Vec<Bytes>, Option<Bytes>) {
    let mut parser = SseParser::new();
    let mut frames = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        parser.push(&input[from..cut]);
        from = cut;
        while let Some(f) = parser.next_frame() {
            frames.push(f.raw);
        }
    }
    (frames, parser.finish().map(|f| f.raw))
}

/// Like [`sse`] with a parser bounded to `max` bytes per event: the frames read, what is
/// left at the end, and whether the bound was passed.
pub fn sse_bounded(input: &[u8], cuts: &[usize], max: usize) -> (Vec<Bytes>, Option<Bytes>, bool) {
    let mut parser = SseParser::with_max_event_bytes(max);
    let mut frames = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        parser.push(&input[from..cut]);
        from = cut;
        while let Some(f) = parser.next_frame() {
            frames.push(f.raw);
        }
    }
    let rest = parser.finish().map(|f| f.raw);
    (frames, rest, parser.overflowed())
}

/// `input` read as an OpenAI and as an Anthropic usage object: the usage that would be
/// billed from each (`None` when it is not believed, or does not parse).
pub fn usage(input: &[u8], max: u64) -> [Option<tollgate_schemas::TokenUsage>; 2] {
    use crate::translate::usage;
    let openai = serde_json::from_slice::<crate::api::openai::Usage>(input)
        .ok()
        .and_then(|u| {
            usage::from_openai(&u)
                .and_then(|u| usage::within(u, max))
                .ok()
        });
    let anthropic = serde_json::from_slice::<crate::api::anthropic::Usage>(input)
        .ok()
        .and_then(|u| {
            usage::from_anthropic(&u)
                .and_then(|u| usage::within(u, max))
                .ok()
        });
    [openai, anthropic]
}

/// One RESP reply read from the start of `input`: its length if complete.
pub fn resp(input: &[u8]) -> Result<Option<usize>, String> {
    crate::limits::resp::parse_reply(input)
}

/// An HTTP/1.1 response head read from the start of `input`: its length if complete.
pub fn http_head(input: &[u8]) -> Result<Option<usize>, String> {
    crate::providers::http1::parse_head_len(input)
}

/// A chunked body fed in pieces cut at `cuts`: the payload and whether it ended.
pub fn chunked(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), String> {
    crate::providers::http1::decode_chunked(input, cuts)
}

/// A request body of each inference API (0: chat completions, 1: messages, 2: embeddings);
/// when it parses, its token estimate, cache key and upstream bodies in both dialects are
/// computed too.
pub fn request_body(api: u8, input: &[u8]) -> Result<(), GatewayError> {
    crate::routes::inference::fuzz_request(api, Bytes::copy_from_slice(input))
}

/// `input` as an upstream SSE stream through every stream adapter (same dialect and
/// translated), cut at `cuts`, then ended, or failed when `fail` is set.
pub fn stream_adapters(input: &[u8], cuts: &[usize], fail: bool) {
    for mut adapter in crate::routes::inference::fuzz_adapters() {
        let mut parser = SseParser::new();
        let mut out = BytesMut::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            parser.push(&input[from..cut]);
            from = cut;
            while let Some(frame) = parser.next_frame() {
                adapter.on_frame(frame, &mut out);
            }
        }
        if let Some(frame) = parser.finish() {
            adapter.on_frame(frame, &mut out);
        }
        if fail {
            adapter.on_error("cut", &mut out);
        } else {
            adapter.on_end(&mut out);
        }
        let _ = adapter.output_text();
        let _ = adapter.state();
        for format in [WireFormat::OpenAi, WireFormat::Anthropic] {
            let _ = crate::relay::event_output_text(format, &out);
        }
    }
}

/// The model renamed in `input` (a response body or event).
pub fn rename(input: &[u8]) -> Option<Vec<u8>> {
    crate::relay::rename::rename_model(input, br#""alias""#)
}
