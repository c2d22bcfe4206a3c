//! Live balances in Redis: the production [`BalanceStore`], read by the gateway's budget
//! checks.
//!
//! One balance is one HASH at [`balance_key`] (`{prefix}balance:{tenant}:{period}:{currency}`,
//! default prefix [`DEFAULT_KEY_PREFIX`]) with the fields `spend` (an exact decimal string,
//! never a float), `requests`, `input_tokens`, `cached_input_tokens`, `output_tokens` and
//! `version` (the ledger commit's sequence number), plus `updated_ms` (Redis's clock when it
//! was written: the gateway's budget checks add what was settled since then).
//!
//! A publish runs one Lua script per balance (pipelined, by `EVALSHA`), which writes the hash
//! only if the stored `version` is missing or strictly smaller than the new one. The check and
//! the write are one atomic step in Redis, so a late or replayed publish never moves a balance
//! backwards, whichever pipeline instance sends it. Versions are compared as decimal strings
//! in Lua (whose numbers are doubles and would round above 2^53).

use redis::aio::ConnectionManager;
use rust_decimal::Decimal;
use std::collections::HashMap;

use super::{Balance, BalanceStore, SinkError};

/// The key prefix when none is configured.
pub const DEFAULT_KEY_PREFIX: &str = "tollgate:";

/// Balances per pipelined round trip, to bound the size of one request.
const PUBLISH_CHUNK: usize = 1_000;

/// KEYS[1]: the balance hash. ARGV: version, spend, requests, input_tokens,
/// cached_input_tokens, output_tokens. Returns 1 when written, 0 when the stored version is
/// newer or equal.
const PUBLISH_LUA: &str = r"
local new = ARGV[1]
local cur = redis.call('HGET', KEYS[1], 'version')
if cur then
  if #cur > #new or (#cur == #new and cur >= new) then
    return 0
  end
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1],
  'updated_ms', tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)),
  'version', new,
  'spend', ARGV[2],
  'requests', ARGV[3],
  'input_tokens', ARGV[4],
  'cached_input_tokens', ARGV[5],
  'output_tokens', ARGV[6])
return 1
";

/// The Redis key of a balance; the gateway reads the same key.
pub fn balance_key(prefix: &str, tenant_id: &str, period: &str, currency: &str) -> String {
    format!("{prefix}balance:{tenant_id}:{period}:{currency}")
}

/// Balances in Redis, through a connection manager that reconnects after a failure.
#[derive(Clone)]
pub struct RedisBalances {
    conn: ConnectionManager,
    prefix: String,
    script: redis::Script,
}

impl std::fmt::Debug for RedisBalances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBalances")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBalances {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`); keys start with `key_prefix`.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<RedisBalances, SinkError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(RedisBalances {
            conn,
            prefix: key_prefix.to_string(),
            script: redis::Script::new(PUBLISH_LUA),
        })
    }

    /// The key prefix of this store.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, tenant_id: &str, period: &str, currency: &str) -> String {
        balance_key(&self.prefix, tenant_id, period, currency)
    }

    /// Sends one `MULTI`/`EXEC` pipeline: the script load (so `EVALSHA` finds it even after a
    /// Redis restart or a `SCRIPT FLUSH`, which cannot slip in between inside a transaction)
    /// followed by one invocation per balance.
    async fn publish_chunk(&self, balances: &[Balance]) -> Result<(), SinkError> {
        let invocations: Vec<redis::ScriptInvocation<'_>> = balances
            .iter()
            .map(|b| {
                let mut inv = self.script.prepare_invoke();
                inv.key(self.key(&b.tenant_id, &b.period, &b.currency))
                    .arg(b.version.to_string())
                    .arg(b.spend.to_string())
                    .arg(b.requests)
                    .arg(b.input_tokens)
                    .arg(b.cached_input_tokens)
                    .arg(b.output_tokens);
                inv
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.load_script(&self.script).ignore();
        for inv in &invocations {
            pipe.invoke_script(inv).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl BalanceStore for RedisBalances {
    async fn publish(&self, balances: &[Balance]) -> Result<(), SinkError> {
        for chunk in balances.chunks(PUBLISH_CHUNK) {
            self.publish_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn get(
        &self,
        tenant_id: &str,
        period: &str,
        currency: &str,
    ) -> Result<Option<Balance>, SinkError> {
        let key = self.key(tenant_id, period, currency);
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| {
            fields
                .get(name)
                .map(String::as_str)
                .ok_or_else(|| SinkError::Invalid(format!("redis {key}: missing field {name}")))
        };
        let int = |name: &str| -> Result<i64, SinkError> {
            let v = field(name)?;
            v.parse()
                .map_err(|e| SinkError::Invalid(format!("redis {key}: {name} {v:?}: {e}")))
        };
        let spend_str = field("spend")?;
        let spend = Decimal::from_str_exact(spend_str)
            .map_err(|e| SinkError::Invalid(format!("redis {key}: spend {spend_str:?}: {e}")))?;
        let version_str = field("version")?;
        let version = version_str.parse().map_err(|e| {
            SinkError::Invalid(format!("redis {key}: version {version_str:?}: {e}"))
        })?;
        Ok(Some(Balance {
            tenant_id: tenant_id.to_string(),
            period: period.to_string(),
            currency: currency.to_string(),
            spend,
            requests: int("requests")?,
            input_tokens: int("input_tokens")?,
            cached_input_tokens: int("cached_input_tokens")?,
            output_tokens: int("output_tokens")?,
            version,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::str::FromStr;

    use super::*;

    /// A store with a unique key prefix, or `None` (test skipped) without `TOLLGATE_REDIS_URL`.
    async fn store(test: &str) -> Option<(RedisBalances, redis::aio::ConnectionManager)> {
        let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") else {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("SKIPPED {test}: TOLLGATE_REDIS_URL is not set");
            }
            return None;
        };
        let prefix = format!("tollgate_test_{}:", uuid::Uuid::new_v4().simple());
        let store = RedisBalances::connect(&url, &prefix).await.unwrap();
        let raw = ConnectionManager::new(redis::Client::open(url.as_str()).unwrap())
            .await
            .unwrap();
        Some((store, raw))
    }

    async fn cleanup(store: &RedisBalances, raw: &mut ConnectionManager) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", store.key_prefix()))
            .query_async(raw)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(raw).await.unwrap();
        }
    }

    fn balance(tenant: &str, spend: &str, requests: i64, version: u64) -> Balance {
        Balance {
            tenant_id: tenant.into(),
            period: "2026-03".into(),
            currency: "USD".into(),
            spend: Decimal::from_str(spend).unwrap(),
            requests,
            input_tokens: requests * 10,
            cached_input_tokens: requests,
            output_tokens: requests * 2,
            version,
        }
    }

    #[test]
    fn key_layout() {
        assert_eq!(
            balance_key(DEFAULT_KEY_PREFIX, "t1", "2026-03", "USD"),
            "tollgate:balance:t1:2026-03:USD"
        );
    }

    #[tokio::test]
    async fn redis_newer_version_wins_and_older_or_equal_is_ignored() {
        let Some((store, mut raw)) = store("redis_newer_version_wins").await else {
            return;
        };
        assert_eq!(store.get("t1", "2026-03", "USD").await.unwrap(), None);

        store.publish(&[balance("t1", "1.5", 3, 5)]).await.unwrap();
        store.publish(&[balance("t1", "0.5", 1, 4)]).await.unwrap();
        store.publish(&[balance("t1", "9", 9, 5)]).await.unwrap();
        assert_eq!(
            store.get("t1", "2026-03", "USD").await.unwrap(),
            Some(balance("t1", "1.5", 3, 5))
        );

        // Versions compare as integers, not as strings ("10" > "9").
        store.publish(&[balance("t1", "2", 4, 9)]).await.unwrap();
        store.publish(&[balance("t1", "3", 5, 10)]).await.unwrap();
        store.publish(&[balance("t1", "2", 4, 9)]).await.unwrap();
        assert_eq!(
            store
                .get("t1", "2026-03", "USD")
                .await
                .unwrap()
                .unwrap()
                .version,
            10
        );

        // Near u64::MAX, beyond what a Lua double holds exactly.
        store
            .publish(&[balance("t1", "4", 6, u64::MAX - 1)])
            .await
            .unwrap();
        store
            .publish(&[balance("t1", "5", 7, u64::MAX - 2)])
            .await
            .unwrap();
        let got = store.get("t1", "2026-03", "USD").await.unwrap().unwrap();
        assert_eq!((got.version, got.requests), (u64::MAX - 1, 6));

        let raw_key = balance_key(store.key_prefix(), "t1", "2026-03", "USD");
        let spend: String = redis::cmd("HGET")
            .arg(&raw_key)
            .arg("spend")
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(spend, "4");
        cleanup(&store, &mut raw).await;
    }

    #[tokio::test]
    async fn redis_decimals_round_trip_exactly() {
        let Some((store, mut raw)) = store("redis_decimals_round_trip_exactly").await else {
            return;
        };
        let tiny = balance("tiny", "0.000000000000000001", 1, 1);
        let big = balance("big", "123456789.123456789012345678", 2, 1);
        let trailing = balance("trailing", "1.500000000000000000", 3, 1);
        store
            .publish(&[tiny.clone(), big.clone(), trailing.clone()])
            .await
            .unwrap();
        for b in [tiny, big, trailing] {
            let got = store
                .get(&b.tenant_id, "2026-03", "USD")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got.spend.to_string(), b.spend.to_string());
            assert_eq!(got, b);
        }
        cleanup(&store, &mut raw).await;
    }

    #[tokio::test]
    async fn redis_publish_survives_script_flush_and_large_batches() {
        let Some((store, mut raw)) = store("redis_publish_survives_script_flush").await else {
            return;
        };
        let many: Vec<Balance> = (0..2_500)
            .map(|i| balance(&format!("t{i}"), "0.25", i, 7))
            .collect();
        store.publish(&many).await.unwrap();
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw)
            .await
            .unwrap();
        store.publish(&[balance("t42", "1", 1, 8)]).await.unwrap();
        assert_eq!(
            store
                .get("t41", "2026-03", "USD")
                .await
                .unwrap()
                .unwrap()
                .requests,
            41
        );
        assert_eq!(
            store
                .get("t42", "2026-03", "USD")
                .await
                .unwrap()
                .unwrap()
                .version,
            8
        );
        assert_eq!(
            store
                .get("t2499", "2026-03", "USD")
                .await
                .unwrap()
                .unwrap()
                .version,
            7
        );
        cleanup(&store, &mut raw).await;
    }
}
