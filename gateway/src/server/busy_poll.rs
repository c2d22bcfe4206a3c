//! Busy polling on a serving thread (`server.busy_poll_us`).
//!
//! A thread that sleeps between two events pays a wake-up for the second one: in a virtual
//! machine that is an inter-processor interrupt and a halted virtual CPU to resume, tens of
//! microseconds, and it lands on the time to first token twice per request (the upstream's
//! answer, the client's next request). With busy polling on, a serving thread that has just
//! handled something keeps polling its sockets (with zero timeout) for a short window before
//! it sleeps; HAProxy's `busy-polling` and Go's spinning scheduler threads do the same.
//!
//! The cost is CPU: at most one window per quiet period per thread, and none while the thread
//! has work anyway. What counts as "handled something": a wake-up from sleep, bytes read from
//! a client connection ([`Active`]) and bytes read from an upstream connection
//! ([`activity`] called by the HTTP/1.1 client).

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

thread_local! {
    /// Bumped by every activity on this thread.
    static ACTIVITY: Cell<u64> = const { Cell::new(0) };
    /// The poller, while it waits for activity (none on threads without one).
    static IDLE_POLLER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Notes that this thread just handled something: its poller (if it has one) keeps polling
/// for another window. Cheap: a thread-local increment, plus a local wake when idle.
pub fn activity() {
    let _ = ACTIVITY.try_with(|a| a.set(a.get().wrapping_add(1)));
    if let Ok(Some(poller)) = IDLE_POLLER.try_with(|p| p.borrow_mut().take()) {
        poller.wake();
    }
}

/// The poller task of a single-threaded runtime: after each activity it yields back to the
/// runtime, which then polls its sockets and timers with zero timeout instead of sleeping,
/// until `window` has passed with no activity; then it waits for the next one. The time spent
/// in these windows is added to `polling`.
pub async fn spin(window: Duration, polling: Option<prometheus::Counter>) {
    loop {
        let seen = ACTIVITY.with(Cell::get);
        std::future::poll_fn(|cx| {
            if ACTIVITY.with(Cell::get) != seen {
                Poll::Ready(())
            } else {
                IDLE_POLLER.with(|p| *p.borrow_mut() = Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        let mut seen = ACTIVITY.with(Cell::get);
        let started = Instant::now();
        let mut deadline = started + window;
        loop {
            tokio::task::yield_now().await;
            // Spinning must not delay other processes' threads that want this CPU (the
            // upstream's or the client's, on a small machine): give way to any that is ready.
            std::thread::yield_now();
            let now = Instant::now();
            let current = ACTIVITY.with(Cell::get);
            if current != seen {
                seen = current;
                deadline = now + window;
            } else if now >= deadline {
                break;
            }
        }
        if let Some(polling) = &polling {
            polling.inc_by(started.elapsed().as_secs_f64());
        }
    }
}

/// A connection whose reads count as activity.
pub struct Active<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            activity();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Whether the poller is waiting for activity (rather than spinning).
    fn poller_idle() -> bool {
        IDLE_POLLER.with(|p| p.borrow().is_some())
    }

    #[test]
    fn the_poller_spins_for_a_window_after_the_last_activity_then_waits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let window = Duration::from_millis(400);
            let polling = prometheus::Counter::new("polling", "test").unwrap();
            tokio::spawn(spin(window, Some(polling.clone())));
            tokio::task::yield_now().await;
            assert!(poller_idle(), "a quiet thread does not spin");
            activity();
            assert!(!poller_idle(), "activity wakes the poller");
            tokio::time::sleep(window / 2).await;
            assert!(!poller_idle(), "it spins for the window");
            // Activity within the window restarts it: past the first window's end, it spins.
            activity();
            let restarted = Instant::now();
            tokio::time::sleep(window * 3 / 4).await;
            assert!(!poller_idle(), "the window restarted at the last activity");
            while !poller_idle() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                assert!(
                    restarted.elapsed() < window * 20,
                    "the poller never stopped"
                );
            }
            assert!(restarted.elapsed() >= window);
            // Counted: from the first activity to a window past the last.
            assert!(polling.get() >= window.as_secs_f64());
        });
    }

    #[test]
    fn activity_on_a_thread_without_a_poller_is_harmless() {
        activity();
        activity();
        assert!(!poller_idle());
    }
}
