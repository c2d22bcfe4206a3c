//! [`RelayStream`]: the streaming response body.
//!
//! It pulls upstream bytes, splits them into SSE frames, lets the adapter write the client's
//! bytes, and yields them once per upstream read (no per-frame allocation of its own). When
//! the client disconnects, the server drops this body: the upstream body is dropped with it,
//! which closes the upstream connection (the cancellation), and `Drop` records the completion
//! with what was generated so far.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use super::{Exchange, Outcome, SseParser, StreamAdapter};
use crate::providers::BodyStream;

/// The body of a streaming response.
pub struct RelayStream {
    upstream: BodyStream,
    parser: SseParser,
    adapter: Box<dyn StreamAdapter>,
    out: BytesMut,
    exchange: Exchange,
    /// Set once the completion is recorded.
    done: bool,
    /// When the first upstream bytes arrived, until the first client bytes leave.
    first_upstream_at: Option<Instant>,
    post_processing: Duration,
}

impl RelayStream {
    pub fn new(upstream: BodyStream, adapter: Box<dyn StreamAdapter>, exchange: Exchange) -> Self {
        RelayStream {
            upstream,
            parser: SseParser::new(),
            adapter,
            out: BytesMut::with_capacity(4096),
            exchange,
            done: false,
            first_upstream_at: None,
            post_processing: Duration::ZERO,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        let state = self.adapter.state().clone();
        let outcome = match (outcome, &state.upstream_error) {
            (Outcome::Completed, Some(e)) => Outcome::UpstreamError(e.clone()),
            (o, _) => o,
        };
        let adapter = &self.adapter;
        let usage = self.exchange.settle_usage(&state, || adapter.output_text());
        self.exchange.finish(
            outcome,
            usage,
            state.finish_reason.clone(),
            state.chunks,
            state.first_output_at,
            self.post_processing,
        );
    }

    fn take_out(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            return None;
        }
        if let Some(t) = self.first_upstream_at.take() {
            self.post_processing = t.elapsed();
        }
        Some(self.out.split().freeze())
    }
}

impl Stream for RelayStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(this.take_out().map(Ok));
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    if this.first_upstream_at.is_none() && this.post_processing.is_zero() {
                        this.first_upstream_at = Some(Instant::now());
                    }
                    this.parser.push(&bytes);
                    while let Some(frame) = this.parser.next_frame() {
                        this.adapter.on_frame(frame, &mut this.out);
                    }
                    if let Some(b) = this.take_out() {
                        return Poll::Ready(Some(Ok(b)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let message = e.to_string();
                    this.adapter.on_error(&message, &mut this.out);
                    this.finish(Outcome::UpstreamError(message));
                }
                Poll::Ready(None) => {
                    if let Some(frame) = this.parser.finish() {
                        this.adapter.on_frame(frame, &mut this.out);
                    }
                    if this.adapter.state().terminated {
                        this.adapter.on_end(&mut this.out);
                        this.finish(Outcome::Completed);
                    } else {
                        let message = "upstream closed the stream before it was complete";
                        this.adapter.on_error(message, &mut this.out);
                        this.finish(Outcome::UpstreamError(message.to_string()));
                    }
                }
            }
        }
    }
}

impl Drop for RelayStream {
    fn drop(&mut self) {
        self.finish(Outcome::ClientDisconnected);
    }
}
