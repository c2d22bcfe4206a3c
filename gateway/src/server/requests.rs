//! What a connection knows of its requests: how many are in progress and since when none is
//! ([`Activity`], which the connection's idle watchdog reads), and the deadline of each
//! request's body ([`DeadlineBody`]).
//!
//! [`ConnectionService`] wraps the application for one connection: each request counts as in
//! progress from the moment its head is parsed until its response body has been sent (or
//! dropped), and its body must arrive within `server.body_read_timeout_ms` of its head; a
//! body that does not fails with [`BodyReadTimeout`], which the handlers answer with a 408.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response};
use axum::Router;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::service::TowerToHyperService;

/// The error of a request body that did not arrive within its deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body did not arrive within {limit_ms} ms")]
pub struct BodyReadTimeout {
    pub limit_ms: u64,
}

impl BodyReadTimeout {
    /// The body deadline's error in `error`'s chain of sources, if it is there.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<BodyReadTimeout> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(timeout) = e.downcast_ref::<BodyReadTimeout>() {
                return Some(*timeout);
            }
            current = e.source();
        }
        None
    }
}

/// A connection's requests in progress, and since when it has none.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_progress: AtomicUsize,
    /// Milliseconds after `opened` at which the last request ended.
    idle_since_ms: AtomicU64,
    served: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_progress: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
        })
    }

    /// How long the connection has had no request in progress (`None`: one is), and whether
    /// it ever had one.
    pub fn idle(&self) -> (Option<Duration>, bool) {
        let served = self.served.load(Ordering::Acquire);
        if self.in_progress.load(Ordering::Acquire) > 0 {
            return (None, served);
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        (Some(self.opened.elapsed().saturating_sub(since)), served)
    }

    fn begin(self: &Arc<Self>) -> InProgress {
        self.served.store(true, Ordering::Release);
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        InProgress(self.clone())
    }
}

/// A request in progress; dropping it ends it.
#[derive(Debug)]
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(now, Ordering::Release);
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The application, as one connection serves it.
#[derive(Clone)]
pub struct ConnectionService {
    app: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    body_read_timeout: Option<Duration>,
}

impl ConnectionService {
    pub fn new(app: Router, activity: Arc<Activity>, body_read_timeout: Option<Duration>) -> Self {
        ConnectionService {
            app: TowerToHyperService::new(app),
            activity,
            body_read_timeout,
        }
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, std::convert::Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_progress = self.activity.begin();
        let timeout = self.body_read_timeout;
        let request = request.map(|body| Body::new(DeadlineBody::new(body, timeout)));
        let response = self.app.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody {
                inner: body,
                _in_progress: in_progress,
            }))
        })
    }
}

/// A response body that keeps its request in progress until it is sent or dropped.
pub struct TrackedBody {
    inner: Body,
    _in_progress: InProgress,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails with [`BodyReadTimeout`] unless it has arrived by its deadline.
/// The timer is only set once the body is found waiting for the client: a body already
/// received costs none.
pub struct DeadlineBody {
    inner: Incoming,
    deadline: Option<(Instant, Duration)>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Option<Duration>) -> Self {
        let deadline = timeout
            .filter(|_| !inner.is_end_stream())
            .and_then(|t| Some((Instant::now().checked_add(t)?, t)));
        DeadlineBody {
            inner,
            deadline,
            timer: None,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some((deadline, limit)) = self.deadline else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                // Once: a caller that polls again reads the end.
                self.deadline = None;
                let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
                Poll::Ready(Some(Err(Box::new(BodyReadTimeout { limit_ms }))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_timeout_is_found_through_wrapping_errors() {
        let inner: Box<dyn std::error::Error + Send + Sync> =
            Box::new(BodyReadTimeout { limit_ms: 5 });
        let wrapped = axum::Error::new(inner);
        assert_eq!(BodyReadTimeout::find(&wrapped).unwrap().limit_ms, 5);
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert!(BodyReadTimeout::find(&other).is_none());
    }

    #[test]
    fn activity_counts_requests_in_progress() {
        let activity = Activity::new();
        assert!(matches!(activity.idle(), (Some(_), false)));
        let first = activity.begin();
        let second = activity.begin();
        assert!(matches!(activity.idle(), (None, true)));
        drop(first);
        assert!(matches!(activity.idle(), (None, true)));
        drop(second);
        assert!(matches!(activity.idle(), (Some(_), true)));
    }
}
