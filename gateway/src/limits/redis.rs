//! The shared limiter: every gateway reserves and settles through the same Redis, one Lua
//! call each (`reserve.lua`, `settle.lua`), so checks and counters move atomically across
//! instances. Keys carry the tenant as a hash tag (`{tenant}`), so one tenant's counters
//! stay on one node; the pipeline's balance is read from the same server. Redis's own clock
//! (`TIME`) dates every window, so gateways' clocks need not agree.

use std::time::Duration;

use ::redis::aio::ConnectionManager;
use tokio::sync::Mutex;

use super::{Ask, LimitsConfig, Settlement, Unavailable, Verdict};

const RESERVE_LUA: &str = include_str!("reserve.lua");
const SETTLE_LUA: &str = include_str!("settle.lua");

/// Limits counted in Redis.
pub struct RedisLimiter {
    client: ::redis::Client,
    /// Connected on first use, then reconnecting by itself.
    conn: Mutex<Option<ConnectionManager>>,
    timeout: Duration,
    lease_ms: u64,
    lag_ms: u64,
    reserve: ::redis::Script,
    settle: ::redis::Script,
}

impl RedisLimiter {
    pub fn new(url: &str, config: &LimitsConfig) -> Result<Self, ::redis::RedisError> {
        Ok(RedisLimiter {
            client: ::redis::Client::open(url)?,
            conn: Mutex::new(None),
            timeout: Duration::from_millis(config.redis_timeout_ms.max(1)),
            lease_ms: config.lease_ms,
            lag_ms: config.ledger_lag_ms,
            reserve: ::redis::Script::new(RESERVE_LUA),
            settle: ::redis::Script::new(SETTLE_LUA),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, Unavailable> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            self.timeout * 4,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| Unavailable("connecting to Redis timed out".to_string()))?
        .map_err(|e| Unavailable(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `script` within the timeout.
    async fn run<T: ::redis::FromRedisValue>(
        &self,
        invocation: ::redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let mut conn = self.connection().await?;
        tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| Unavailable("Redis did not answer in time".to_string()))?
            .map_err(|e| Unavailable(e.to_string()))
    }

    pub async fn ping(&self) -> Result<(), Unavailable> {
        let mut conn = self.connection().await?;
        tokio::time::timeout(
            self.timeout,
            ::redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        .map_err(|_| Unavailable("Redis did not answer in time".to_string()))?
        .map(drop)
        .map_err(|e| Unavailable(e.to_string()))
    }

    pub async fn reserve(&self, ask: &Ask<'_>) -> Result<Verdict, Unavailable> {
        let mut inv = self.reserve.prepare_invoke();
        inv.arg(ask.request_id)
            .arg(self.lease_ms)
            .arg(ask.tokens)
            .arg(ask.micros)
            .arg(self.lag_ms)
            .arg(ask.checks.len())
            .arg(if ask.extend { "extend" } else { "admit" });
        for c in ask.checks {
            inv.key(&c.key)
                .arg(c.kind.code(c.balance.is_some()))
                .arg(c.limit)
                .arg(if c.soft { "1" } else { "0" })
                .arg(c.balance.as_ref().map_or("", |b| b.key.as_str()));
        }
        let out: Vec<i64> = self.run(inv).await?;
        if out.len() != 3 + 2 * ask.checks.len() {
            return Err(Unavailable(format!(
                "unexpected reply of {} values from the reserve script",
                out.len()
            )));
        }
        let failed = usize::try_from(out[1])
            .ok()
            .filter(|i| *i > 0)
            .map(|i| i - 1);
        Ok(Verdict {
            failed,
            window: out[2],
            used: out[3..]
                .chunks(2)
                .map(|c| u64::try_from(c[0]).unwrap_or(0))
                .collect(),
        })
    }

    pub async fn settle(&self, s: &Settlement<'_>) -> Result<(), Unavailable> {
        let mut inv = self.settle.prepare_invoke();
        inv.arg(s.request_id)
            .arg(s.tokens_delta)
            .arg(s.window)
            .arg(s.micros)
            .arg(s.checks.len());
        for c in s.checks {
            inv.key(&c.key).arg(c.kind.code(c.balance.is_some()));
        }
        let _: i64 = self.run(inv).await?;
        Ok(())
    }
}
