//! The shared limiter: every gateway reserves and settles through the same Redis, one Lua
//! call each (`reserve.lua`, `settle.lua`), so checks and counters move atomically across
//! instances. Keys carry the tenant as a hash tag (`{tenant}`), so one tenant's counters
//! stay on one node; the pipeline's balance is read from the same server. Redis's own clock
//! (`TIME`) dates every window, so gateways' clocks need not agree.

use std::time::Duration;

use super::resp::{Pool, Reply, Target};
use super::{Ask, LimitsConfig, Settlement, Unavailable, Verdict};

const RESERVE_LUA: &str = include_str!("reserve.lua");
const SETTLE_LUA: &str = include_str!("settle.lua");

/// A script and its SHA-1 (what `EVALSHA` names it by).
struct Script {
    text: &'static str,
    sha: String,
}

impl Script {
    fn new(text: &'static str) -> Script {
        Script {
            text,
            sha: ::redis::Script::new(text).get_hash().to_string(),
        }
    }
}

/// Limits counted in Redis.
pub struct RedisLimiter {
    pool: Pool,
    timeout: Duration,
    lease_ms: String,
    lag_ms: String,
    reserve: Script,
    settle: Script,
}

fn ints(reply: Reply) -> Result<Vec<i64>, Unavailable> {
    match reply {
        Reply::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Reply::Int(n) => Ok(n),
                other => Err(Unavailable(format!("unexpected reply item {other:?}"))),
            })
            .collect(),
        Reply::Error(e) => Err(Unavailable(format!("script failed: {e}"))),
        other => Err(Unavailable(format!("unexpected reply {other:?}"))),
    }
}

impl RedisLimiter {
    pub fn new(url: &str, config: &LimitsConfig) -> Result<Self, String> {
        Ok(RedisLimiter {
            pool: Pool::new(Target::parse(url)?),
            timeout: Duration::from_millis(config.redis_timeout_ms.max(1)),
            lease_ms: config.lease_ms.to_string(),
            lag_ms: config.ledger_lag_ms.to_string(),
            reserve: Script::new(RESERVE_LUA),
            settle: Script::new(SETTLE_LUA),
        })
    }

    /// Runs `script` within the timeout.
    async fn run(
        &self,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Reply, Unavailable> {
        tokio::time::timeout(
            self.timeout,
            self.pool.eval(&script.sha, script.text, keys, args),
        )
        .await
        .map_err(|_| Unavailable("Redis did not answer in time".to_string()))?
    }

    pub async fn ping(&self) -> Result<(), Unavailable> {
        match tokio::time::timeout(self.timeout, self.pool.call(&[b"PING"])).await {
            Ok(Ok(Reply::Simple(_))) => Ok(()),
            Ok(Ok(other)) => Err(Unavailable(format!("unexpected PING reply {other:?}"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Unavailable("Redis did not answer in time".to_string())),
        }
    }

    pub async fn reserve(&self, ask: &Ask<'_>) -> Result<Verdict, Unavailable> {
        let numbers = [
            ask.tokens.to_string(),
            ask.micros.to_string(),
            ask.checks.len().to_string(),
        ];
        let limits: Vec<String> = ask.checks.iter().map(|c| c.limit.to_string()).collect();
        let mut args: Vec<&[u8]> = vec![
            ask.request_id.as_bytes(),
            self.lease_ms.as_bytes(),
            numbers[0].as_bytes(),
            numbers[1].as_bytes(),
            self.lag_ms.as_bytes(),
            numbers[2].as_bytes(),
            if ask.extend { b"extend" } else { b"admit" },
        ];
        for (c, limit) in ask.checks.iter().zip(&limits) {
            args.push(c.kind.code(c.balance.is_some()).as_bytes());
            args.push(limit.as_bytes());
            args.push(if c.soft { b"1" } else { b"0" });
            args.push(c.balance.as_ref().map_or(&b""[..], |b| b.key.as_bytes()));
        }
        let keys: Vec<&[u8]> = ask.checks.iter().map(|c| c.key.as_bytes()).collect();
        let out = ints(self.run(&self.reserve, &keys, &args).await?)?;
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
        let numbers = [
            s.tokens_delta.to_string(),
            s.window.to_string(),
            s.micros.to_string(),
            s.checks.len().to_string(),
        ];
        let mut args: Vec<&[u8]> = vec![s.request_id.as_bytes()];
        args.extend(numbers.iter().map(|n| n.as_bytes()));
        for c in s.checks {
            args.push(c.kind.code(c.balance.is_some()).as_bytes());
        }
        let keys: Vec<&[u8]> = s.checks.iter().map(|c| c.key.as_bytes()).collect();
        match self.run(&self.settle, &keys, &args).await? {
            Reply::Error(e) => Err(Unavailable(format!("settle script failed: {e}"))),
            _ => Ok(()),
        }
    }
}
