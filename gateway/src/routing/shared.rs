//! Deployment RPM/TPM accounting shared by every gateway instance through Redis
//! (`[routing.rate_limits] shared_redis_url`), so that replicas sharing one provider key stay
//! under its limits together.
//!
//! Decisions stay local and synchronous (routing never waits on Redis): [`SharedLimiter`] is
//! the instance's [`MemoryLimiter`] plus what the *other* instances used, which a background
//! task refreshes every `shared_sync_ms`. Each round it adds this instance's new requests and
//! tokens to per-deployment counters in Redis, one hash per wall-clock minute
//! (`{tollgate:deployment:NAME}:MINUTE`, kept three minutes), and reads back the current and
//! previous minute's totals in the same call (`sync.lua`); the others' share is those totals
//! less this instance's own contributions, over the same sliding minute as the local window.
//!
//! Limits: a deployment is over its limit at most one sync interval late (the other
//! instances' traffic since their last round is unknown), the minute buckets follow the
//! gateways' clocks (NTP), and the fair-share rule between tenants stays per instance. When
//! Redis cannot be reached the others' share ages out after two minutes and each instance
//! counts alone (`tollgate_routing_shared_sync_failures_total` counts the failed rounds).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::config::DeploymentLimits;
use super::limiter::{DeploymentLimiter, MemoryLimiter, MinuteUsage};
use crate::limits::resp::{Pool, Reply, Target};

const SYNC_LUA: &str = include_str!("sync.lua");
const MINUTE_MS: u64 = 60_000;

/// Usage of one deployment by the other instances, per wall-clock minute.
#[derive(Debug, Clone, Copy, Default)]
struct Others {
    /// The minute (since the epoch) `current` belongs to.
    minute: u64,
    current: MinuteUsage,
    previous: MinuteUsage,
    /// When it was read.
    read_at: Option<Instant>,
}

impl Others {
    /// The sliding-minute estimate at wall time `now_ms`.
    fn estimate(&self, now_ms: u64, now: Instant) -> MinuteUsage {
        let fresh = self
            .read_at
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(120));
        if !fresh {
            return MinuteUsage::default();
        }
        let minute = now_ms / MINUTE_MS;
        let (current, previous) = match minute.saturating_sub(self.minute) {
            0 => (self.current, self.previous),
            1 => (MinuteUsage::default(), self.current),
            _ => return MinuteUsage::default(),
        };
        let prev_share = 1.0 - (now_ms % MINUTE_MS) as f64 / MINUTE_MS as f64;
        let weigh = |p: u64, c: u64| c + (p as f64 * prev_share).ceil() as u64;
        MinuteUsage {
            requests: weigh(previous.requests, current.requests),
            tokens: weigh(previous.tokens, current.tokens),
        }
    }
}

/// What this instance has added to Redis, per deployment and minute, and what it has not yet.
#[derive(Debug, Default)]
struct Mine {
    pending: MinuteUsage,
    /// Contributions already in Redis: (minute, usage), the last two minutes.
    sent: Vec<(u64, MinuteUsage)>,
}

impl Mine {
    fn sent_in(&self, minute: u64) -> MinuteUsage {
        self.sent
            .iter()
            .find(|(m, _)| *m == minute)
            .map_or_else(MinuteUsage::default, |(_, u)| *u)
    }

    fn add_sent(&mut self, minute: u64, u: MinuteUsage) {
        match self.sent.iter_mut().find(|(m, _)| *m == minute) {
            Some((_, s)) => {
                s.requests += u.requests;
                s.tokens += u.tokens;
            }
            None => self.sent.push((minute, u)),
        }
        self.sent.retain(|(m, _)| *m + 1 >= minute);
    }
}

/// The instance's limiter plus the other instances' usage.
pub struct SharedLimiter {
    local: MemoryLimiter,
    mine: HashMap<String, Mutex<Mine>>,
    others: HashMap<String, Mutex<Others>>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SharedLimiter {
    /// Shared accounting of these deployments (others are never limited).
    pub fn new<'a>(deployments: impl IntoIterator<Item = &'a str> + Clone) -> SharedLimiter {
        SharedLimiter {
            local: MemoryLimiter::new(deployments.clone()),
            mine: deployments
                .clone()
                .into_iter()
                .map(|d| (d.to_string(), Mutex::default()))
                .collect(),
            others: deployments
                .into_iter()
                .map(|d| (d.to_string(), Mutex::default()))
                .collect(),
        }
    }

    fn others(&self, deployment: &str, now: Instant) -> MinuteUsage {
        self.others
            .get(deployment)
            .map_or_else(MinuteUsage::default, |o| o.lock().estimate(wall_ms(), now))
    }

    /// One round with Redis: adds this instance's new usage of every deployment, and reads
    /// back everyone's. A failed round keeps the usage for the next one.
    pub async fn sync(&self, pool: &Pool, sha: &str) -> Result<(), String> {
        let minute = wall_ms() / MINUTE_MS;
        let (minute_s, previous_s) = (minute.to_string(), minute.saturating_sub(1).to_string());
        for (deployment, mine) in &self.mine {
            let pending = std::mem::take(&mut mine.lock().pending);
            let base = format!("{{tollgate:deployment:{deployment}}}:");
            let (cur, prev) = (format!("{base}{minute_s}"), format!("{base}{previous_s}"));
            let (r, t) = (pending.requests.to_string(), pending.tokens.to_string());
            let reply = pool
                .eval(
                    sha,
                    SYNC_LUA,
                    &[cur.as_bytes(), prev.as_bytes()],
                    &[r.as_bytes(), t.as_bytes()],
                )
                .await;
            let totals = match reply.map_err(|e| e.0).and_then(four_ints) {
                Ok(v) => v,
                Err(e) => {
                    // Not counted in Redis: sent again next round.
                    let mut m = mine.lock();
                    m.pending.requests += pending.requests;
                    m.pending.tokens += pending.tokens;
                    return Err(e);
                }
            };
            let mut m = mine.lock();
            m.add_sent(minute, pending);
            let own_cur = m.sent_in(minute);
            let own_prev = m.sent_in(minute.saturating_sub(1));
            drop(m);
            if let Some(o) = self.others.get(deployment) {
                *o.lock() = Others {
                    minute,
                    current: MinuteUsage {
                        requests: totals[0].saturating_sub(own_cur.requests),
                        tokens: totals[1].saturating_sub(own_cur.tokens),
                    },
                    previous: MinuteUsage {
                        requests: totals[2].saturating_sub(own_prev.requests),
                        tokens: totals[3].saturating_sub(own_prev.tokens),
                    },
                    read_at: Some(Instant::now()),
                };
            }
        }
        Ok(())
    }
}

/// The script's reply: current requests, tokens, previous requests, tokens.
fn four_ints(reply: Reply) -> Result<[u64; 4], String> {
    let Reply::Array(items) = reply else {
        return Err(format!("unexpected reply {reply:?}"));
    };
    let mut out = [0u64; 4];
    if items.len() != 4 {
        return Err(format!("unexpected reply length {}", items.len()));
    }
    for (slot, item) in out.iter_mut().zip(items) {
        *slot = match item {
            Reply::Int(n) => u64::try_from(n).unwrap_or(0),
            other => return Err(format!("unexpected reply item {other:?}")),
        };
    }
    Ok(out)
}

impl DeploymentLimiter for SharedLimiter {
    fn check(
        &self,
        deployment: &str,
        tenant: &str,
        limits: &DeploymentLimits,
        tokens: u64,
        now: Instant,
    ) -> Result<(), Instant> {
        let others = self.others(deployment, now);
        self.local
            .check_with(deployment, tenant, limits, tokens, now, others)
    }

    fn record_request(&self, deployment: &str, tenant: &str, now: Instant) {
        self.local.record_request(deployment, tenant, now);
        if let Some(m) = self.mine.get(deployment) {
            m.lock().pending.requests += 1;
        }
    }

    fn record_tokens(&self, deployment: &str, tenant: &str, tokens: u64, now: Instant) {
        self.local.record_tokens(deployment, tenant, tokens, now);
        if let Some(m) = self.mine.get(deployment) {
            let mut m = m.lock();
            m.pending.tokens = m.pending.tokens.saturating_add(tokens);
        }
    }

    fn usage(&self, deployment: &str, now: Instant) -> MinuteUsage {
        let (local, others) = (
            self.local.usage(deployment, now),
            self.others(deployment, now),
        );
        MinuteUsage {
            requests: local.requests + others.requests,
            tokens: local.tokens.saturating_add(others.tokens),
        }
    }
}

/// Runs [`SharedLimiter::sync`] every `every` against the Redis at `url`, for as long as the
/// process lives.
pub fn spawn_sync(
    limiter: Arc<SharedLimiter>,
    url: &str,
    every: Duration,
    failures: prometheus::IntCounter,
) -> Result<(), String> {
    let pool = Pool::new(Target::parse(url)?);
    let sha = ::redis::Script::new(SYNC_LUA).get_hash().to_string();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match limiter.sync(&pool, &sha).await {
                Ok(()) => failing = false,
                Err(e) => {
                    failures.inc();
                    if !failing {
                        tracing::warn!(error = %e, "deployment usage cannot be shared through Redis; counting per instance");
                    }
                    failing = true;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_others_share_slides_out_with_the_minute_and_ages_out() {
        let now = Instant::now();
        let o = Others {
            minute: 100,
            current: MinuteUsage {
                requests: 10,
                tokens: 1000,
            },
            previous: MinuteUsage {
                requests: 20,
                tokens: 0,
            },
            read_at: Some(now),
        };
        // A quarter into minute 100: all of it and three quarters of minute 99.
        let at = 100 * MINUTE_MS + MINUTE_MS / 4;
        assert_eq!(o.estimate(at, now).requests, 10 + 15);
        // Half into minute 101: half of minute 100.
        assert_eq!(o.estimate(101 * MINUTE_MS + MINUTE_MS / 2, now).requests, 5);
        assert_eq!(o.estimate(102 * MINUTE_MS, now), MinuteUsage::default());
        // Two minutes without a read: forgotten.
        let later = now + Duration::from_secs(121);
        assert_eq!(o.estimate(at, later), MinuteUsage::default());
    }

    #[test]
    fn the_others_usage_counts_against_the_limit() {
        let l = SharedLimiter::new(["a"]);
        let limits = DeploymentLimits {
            rpm: Some(10),
            tpm: None,
        };
        let now = Instant::now();
        let minute = wall_ms() / MINUTE_MS;
        *l.others["a"].lock() = Others {
            minute,
            current: MinuteUsage {
                requests: 9,
                tokens: 0,
            },
            previous: MinuteUsage::default(),
            read_at: Some(now),
        };
        assert_eq!(l.check("a", "t", &limits, 1, now), Ok(()));
        l.record_request("a", "t", now);
        assert!(l.check("a", "t", &limits, 1, now).is_err(), "9 + 1 of 10");
        assert_eq!(l.mine["a"].lock().pending.requests, 1);
    }
}
