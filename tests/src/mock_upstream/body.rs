//! The response body the mock writes: either a complete buffer, or a *script* of byte pieces,
//! pauses and failures played one body frame at a time, so that timing on the wire is real.
//!
//! A scripted body owns a [`StreamGuard`]. If the body is dropped before its script has played
//! to the end (hyper drops it when it notices the client went away, through a failed write or
//! an EOF on the read half), the guard records a [`CancelledStream`] with the instant it happened.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::{CancelledStream, Shared};

/// One step of a scripted body.
#[derive(Debug)]
pub(crate) enum Step {
    /// Write these bytes as one body frame; `content` says how many generated content chunks
    /// (text deltas, tool-argument fragments) the bytes complete, for [`CancelledStream::chunks_sent`].
    Data { bytes: Bytes, content: usize },
    /// Pause before the next step.
    Sleep(Duration),
    /// End the body with an I/O error: hyper then drops the connection without the final
    /// zero-length chunk (or short of the announced content-length).
    Abort,
    /// Never produce another frame; only the client going away ends this body.
    Hang,
}

impl Step {
    pub(crate) fn data(bytes: impl Into<Bytes>) -> Step {
        Step::Data {
            bytes: bytes.into(),
            content: 0,
        }
    }
}

/// Records a [`CancelledStream`] when dropped before [`StreamGuard::finish`] was called.
pub(crate) struct StreamGuard {
    shared: Arc<Shared>,
    path: &'static str,
    model: String,
    chunks_sent: usize,
    finished: bool,
}

impl StreamGuard {
    pub(crate) fn new(shared: Arc<Shared>, path: &'static str, model: &str) -> StreamGuard {
        StreamGuard {
            shared,
            path,
            model: model.to_owned(),
            chunks_sent: 0,
            finished: false,
        }
    }

    /// The response reached its planned end (which may be a deliberate abort): not a cancellation.
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            let noticed_at = Instant::now();
            tracing::debug!(path = self.path, model = %self.model, chunks_sent = self.chunks_sent,
                "mock upstream: client went away mid-response");
            self.shared.cancelled.lock().push(CancelledStream {
                path: self.path.to_owned(),
                model: std::mem::take(&mut self.model),
                chunks_sent: self.chunks_sent,
                noticed_at,
            });
        }
    }
}

/// A played-back script of [`Step`]s.
pub(crate) struct Script {
    steps: VecDeque<Step>,
    sleep: Option<Pin<Box<Sleep>>>,
    guard: StreamGuard,
}

/// The body of every response the mock sends.
pub(crate) enum MockBody {
    Full(Option<Bytes>),
    Script(Box<Script>),
}

impl MockBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> MockBody {
        let bytes = bytes.into();
        if bytes.is_empty() {
            MockBody::Full(None)
        } else {
            MockBody::Full(Some(bytes))
        }
    }

    pub(crate) fn script(steps: Vec<Step>, guard: StreamGuard) -> MockBody {
        MockBody::Script(Box::new(Script {
            steps: steps.into(),
            sleep: None,
            guard,
        }))
    }
}

impl Script {
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            let Some(step) = self.steps.pop_front() else {
                self.guard.finish();
                return Poll::Ready(None);
            };
            match step {
                Step::Data { bytes, content } => {
                    self.guard.chunks_sent += content;
                    if self.steps.is_empty() {
                        // hyper may stop polling once it has the last frame.
                        self.guard.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Step::Sleep(duration) => {
                    if !duration.is_zero() {
                        self.sleep = Some(Box::pin(tokio::time::sleep(duration)));
                    }
                }
                Step::Abort => {
                    self.guard.finish();
                    self.steps.clear();
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "mock upstream aborts the response mid-body",
                    ))));
                }
                Step::Hang => {
                    // No waker is registered on purpose: nothing will ever wake this body.
                    self.steps.push_front(Step::Hang);
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Script(script) => script.poll_step(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Script(script) => script.steps.is_empty() && script.sleep.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Script(_) => SizeHint::default(),
        }
    }
}
