//! [`Redacted`]: an upstream body with the deployment's own credential replaced wherever it
//! appears, error frames in the middle of a stream included, before any adapter or client
//! sees a byte of it.
//!
//! An upstream that echoes the key it was given (in an error's `param`, a debug field, a
//! model's output) must not hand it to the tenant. The credential can be split across two
//! reads, so a read that ends with a proper prefix of it keeps that tail back until the next
//! read shows whether the credential follows; a read without any part of the credential
//! (the usual case: SSE reads end in a blank line) passes through untouched, without a copy.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use super::BodyStream;
use crate::error::GatewayError;

/// What a credential is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// A body stream with every occurrence of `secret` replaced by [`REDACTED`].
pub struct Redacted {
    inner: BodyStream,
    finder: memchr::memmem::Finder<'static>,
    /// The end of the last read that could begin the credential.
    held: BytesMut,
    done: bool,
}

impl Redacted {
    pub fn new(inner: BodyStream, secret: &str) -> Redacted {
        Redacted {
            inner,
            finder: memchr::memmem::Finder::new(secret.as_bytes()).into_owned(),
            held: BytesMut::new(),
            done: false,
        }
    }

    /// `bytes` (after what was held) with the credential replaced, minus a tail that could
    /// begin it.
    fn filter(&mut self, bytes: Bytes) -> Bytes {
        let secret = self.finder.needle();
        if self.held.is_empty()
            && self.finder.find(&bytes).is_none()
            && partial_suffix(&bytes, secret) == 0
        {
            return bytes;
        }
        self.held.extend_from_slice(&bytes);
        let mut out = BytesMut::with_capacity(self.held.len());
        let mut at = 0;
        while let Some(i) = self.finder.find(&self.held[at..]) {
            out.extend_from_slice(&self.held[at..at + i]);
            out.extend_from_slice(REDACTED.as_bytes());
            at += i + secret.len();
        }
        let keep = partial_suffix(&self.held[at..], secret);
        let end = self.held.len() - keep;
        out.extend_from_slice(&self.held[at..end]);
        let _ = self.held.split_to(end);
        out.freeze()
    }
}

/// Length of the longest proper prefix of `secret` that `bytes` ends with.
fn partial_suffix(bytes: &[u8], secret: &[u8]) -> usize {
    let longest = secret.len().saturating_sub(1).min(bytes.len());
    (1..=longest)
        .rev()
        .find(|&n| bytes.ends_with(&secret[..n]))
        .unwrap_or(0)
}

impl Stream for Redacted {
    type Item = Result<Bytes, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    let out = self.filter(bytes);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    // A tail that never became the credential is the upstream's own text.
                    let rest = std::mem::take(&mut self.held);
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(rest.freeze())));
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures_util::StreamExt;

    use super::*;

    async fn run(reads: &[&str], secret: &str) -> (String, usize) {
        let items: Vec<Result<Bytes, GatewayError>> = reads
            .iter()
            .map(|r| Ok(Bytes::copy_from_slice(r.as_bytes())))
            .collect();
        let inner: BodyStream = Box::pin(futures_util::stream::iter(items));
        let out: Vec<Bytes> = Redacted::new(inner, secret)
            .map(|r| r.unwrap())
            .collect()
            .await;
        let text = out.iter().map(|b| String::from_utf8_lossy(b)).collect();
        (text, out.len())
    }

    #[tokio::test]
    async fn the_credential_is_replaced_even_across_reads() {
        let key = "sk-live-abcdef123456";
        let (t, _) = run(
            &["data: {\"param\":\"Bearer sk-live-abcdef123456\"}\n\n"],
            key,
        )
        .await;
        assert_eq!(t, "data: {\"param\":\"Bearer [REDACTED]\"}\n\n");
        let (t, _) = run(
            &["event: error\ndata: bad key sk-li", "ve-abcdef123456 x\n\n"],
            key,
        )
        .await;
        assert_eq!(t, "event: error\ndata: bad key [REDACTED] x\n\n");
        // Split into single bytes, twice in a row.
        let text = format!("{key}{key} end");
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let reads: Vec<&str> = bytes.iter().map(String::as_str).collect();
        let (t, _) = run(&reads, key).await;
        assert_eq!(t, "[REDACTED][REDACTED] end");
    }

    #[tokio::test]
    async fn other_text_passes_untouched_and_a_held_tail_that_is_not_the_key_comes_out() {
        let key = "sk-live-abcdef123456";
        let (t, n) = run(&["data: a\n\n", "data: b\n\n"], key).await;
        assert_eq!((t.as_str(), n), ("data: a\n\ndata: b\n\n", 2));
        let (t, _) = run(&["costs sk-li", "ttle\n"], key).await;
        assert_eq!(t, "costs sk-little\n");
        let (t, _) = run(&["ends with sk-li"], key).await;
        assert_eq!(t, "ends with sk-li");
    }
}
