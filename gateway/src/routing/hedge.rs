//! Hedging: when the first attempt has not produced its first byte after a delay, a second
//! attempt goes to another deployment; whichever succeeds first is used and the other is
//! cancelled (its future dropped, which closes its upstream connection).
//!
//! The race is generic over the attempt's output so that it is tested without sockets. What
//! is billed: only the winner's completion; the loser's estimated cost is recorded beside it
//! (see [`super::HedgeLoser`]).

use std::future::Future;
use std::time::Duration;

use futures_util::future::{select, Either};

/// How a hedged race ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Raced<T> {
    /// The first attempt finished before the delay (or no second could be started).
    Alone(T),
    /// Both were sent; `winner` (0: the first, 1: the second) succeeded first and the other
    /// was cancelled.
    Won { winner: usize, result: T },
    /// Both were sent and both finished: the first to finish failed (results in attempt order).
    Both([T; 2]),
}

/// Runs `first`; after `delay` without a result, starts `second()` (if it gives a future) and
/// takes whichever succeeds first (`is_ok`).
pub async fn race<T, F1, F2>(
    first: F1,
    second: impl FnOnce() -> Option<F2>,
    delay: Duration,
    is_ok: impl Fn(&T) -> bool,
) -> Raced<T>
where
    F1: Future<Output = T>,
    F2: Future<Output = T>,
{
    let first = std::pin::pin!(first);
    let timer = std::pin::pin!(tokio::time::sleep(delay));
    let first = match select(first, timer).await {
        Either::Left((result, _)) => return Raced::Alone(result),
        Either::Right(((), first)) => first,
    };
    let Some(second) = second() else {
        return Raced::Alone(first.await);
    };
    let second = std::pin::pin!(second);
    match select(first, second).await {
        Either::Left((a, second)) => {
            if is_ok(&a) {
                Raced::Won {
                    winner: 0,
                    result: a,
                }
            } else {
                let b = second.await;
                Raced::Both([a, b])
            }
        }
        Either::Right((b, first)) => {
            if is_ok(&b) {
                Raced::Won {
                    winner: 1,
                    result: b,
                }
            } else {
                let a = first.await;
                Raced::Both([a, b])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    async fn after(
        ms: u64,
        v: Result<&'static str, &'static str>,
    ) -> Result<&'static str, &'static str> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        v
    }

    fn ok(r: &Result<&str, &str>) -> bool {
        r.is_ok()
    }

    #[tokio::test]
    async fn a_fast_first_attempt_sends_no_second() {
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        let r = race(
            after(1, Ok("a")),
            move || {
                s.store(true, Ordering::SeqCst);
                Some(after(1, Ok("b")))
            },
            Duration::from_secs(5),
            ok,
        )
        .await;
        assert_eq!(r, Raced::Alone(Ok("a")));
        assert!(!started.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_slow_first_attempt_loses_to_the_hedge() {
        let r = race(
            after(5_000, Ok("slow")),
            || Some(after(1, Ok("fast"))),
            Duration::from_millis(10),
            ok,
        )
        .await;
        assert_eq!(
            r,
            Raced::Won {
                winner: 1,
                result: Ok("fast")
            }
        );
    }

    #[tokio::test]
    async fn a_failed_hedge_waits_for_the_first() {
        let r = race(
            after(60, Ok("first")),
            || Some(after(1, Err("503"))),
            Duration::from_millis(10),
            ok,
        )
        .await;
        assert_eq!(r, Raced::Both([Ok("first"), Err("503")]));
    }

    #[tokio::test]
    async fn no_second_deployment_means_no_hedge() {
        let r = race(
            after(30, Ok("only")),
            || None::<std::future::Ready<Result<&str, &str>>>,
            Duration::from_millis(1),
            ok,
        )
        .await;
        assert_eq!(r, Raced::Alone(Ok("only")));
    }
}
