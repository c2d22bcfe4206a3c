//! A finished stream's token count as an HTTP trailer (`x-tollgate-usage-tokens`), for a proxy
//! in front that counts tokens per minute when a stream ends (Envoy's rate-limit filter, see
//! `crate::edge`).
//!
//! The count is what the gateway's own tokens-per-minute limits settle for the request (input
//! plus output tokens, as billed), known only once the stream has ended, so it travels after
//! the body. Over HTTP/1.1 hyper sends it only to a client that said `TE: trailers` (Envoy is
//! told to) and when the response named it in its `Trailer` header ([`RelayStream`] responses
//! do); over HTTP/2 trailers always go. Other clients never see it.
//!
//! [`RelayStream`]: super::RelayStream

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures_util::Stream;
use hyper::body::Frame;

use crate::edge::USAGE_TOKENS_HEADER;

/// Where a stream leaves its token count when it finishes (set once).
#[derive(Debug, Clone, Default)]
pub struct UsageSlot(Arc<OnceLock<u64>>);

impl UsageSlot {
    /// Records the stream's tokens; a second call changes nothing.
    pub fn set(&self, tokens: u64) {
        let _ = self.0.set(tokens);
    }

    /// The recorded tokens, once the stream has finished.
    pub fn get(&self) -> Option<u64> {
        self.0.get().copied()
    }
}

/// A response body: `stream`'s bytes, then the slot's count as a trailer (when it was set).
pub struct UsageTrailer<S> {
    stream: S,
    slot: UsageSlot,
    ended: bool,
}

impl<S> UsageTrailer<S> {
    pub fn new(stream: S, slot: UsageSlot) -> Self {
        UsageTrailer {
            stream,
            slot,
            ended: false,
        }
    }
}

/// The trailers carrying `tokens`.
pub fn trailers(tokens: u64) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert(USAGE_TOKENS_HEADER, HeaderValue::from(tokens));
    t
}

impl<S> hyper::body::Body for UsageTrailer<S>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.stream).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(this.slot.get().map(|n| Ok(Frame::trailers(trailers(n)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn the_count_follows_the_bytes_once_set() {
        let slot = UsageSlot::default();
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"data: a\n\n")),
            Ok(Bytes::from_static(b"data: b\n\n")),
        ];
        let filler = slot.clone();
        // The stream sets the count as it ends, as RelayStream does.
        let stream =
            futures_util::stream::iter(chunks).chain(futures_util::stream::poll_fn(move |_| {
                filler.set(42);
                filler.set(7);
                Poll::Ready(None)
            }));
        let collected = UsageTrailer::new(stream, slot).collect().await.unwrap();
        assert_eq!(
            collected
                .trailers()
                .and_then(|t| t.get(USAGE_TOKENS_HEADER)),
            Some(&HeaderValue::from_static("42"))
        );
        assert_eq!(collected.to_bytes(), "data: a\n\ndata: b\n\n");

        // A stream that never set it (dropped before finishing) sends no trailer.
        let plain = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"x"))]);
        let collected = UsageTrailer::new(plain, UsageSlot::default())
            .collect()
            .await
            .unwrap();
        assert!(collected.trailers().is_none());
    }
}
