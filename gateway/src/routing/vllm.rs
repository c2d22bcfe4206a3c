//! Load-aware routing for vLLM: a deployment with `metrics_url` has it polled, and the
//! server's running and waiting requests and KV-cache usage feed `least_in_flight` (load is
//! the larger of this gateway's in-flight count and the server's running + waiting) and every
//! strategy's tiers (a KV cache ≥ 95 % full puts the deployment behind the others).
//!
//! Metric names read (summed over label sets): `vllm:num_requests_running`,
//! `vllm:num_requests_waiting`, and `vllm:gpu_cache_usage_perc` or (newer servers)
//! `vllm:kv_cache_usage_perc`, a fraction 0..=1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::health::{Health, ServerLoad};

/// Largest metrics page read.
const MAX_METRICS_BYTES: usize = 4 * 1024 * 1024;

/// Polls `url` every `every` until the runtime stops; failures keep the last reading (which
/// then goes stale and is ignored).
pub fn spawn_poller(deployment: String, url: String, every: Duration, health: Arc<Health>) {
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .timeout(every.max(Duration::from_millis(500)))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%deployment, "cannot build the vLLM metrics client: {e}");
                return;
            }
        };
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match fetch(&client, &url).await {
                Some(text) => {
                    if let Some(load) = parse(&text, Instant::now()) {
                        *health.server_load.lock() = Some(load);
                    }
                }
                None => tracing::debug!(%deployment, "vLLM metrics unavailable"),
            }
        }
    });
}

async fn fetch(client: &reqwest::Client, url: &str) -> Option<String> {
    let response = client.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let bytes = response.bytes().await.ok()?;
    if bytes.len() > MAX_METRICS_BYTES {
        return None;
    }
    String::from_utf8(bytes.to_vec()).ok()
}

/// Reads the load from a Prometheus text exposition; `None` when it has none of the metrics.
pub fn parse(text: &str, at: Instant) -> Option<ServerLoad> {
    let (mut running, mut waiting, mut kv) = (None::<f64>, None::<f64>, None::<f64>);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let slot = match name {
            "vllm:num_requests_running" => &mut running,
            "vllm:num_requests_waiting" => &mut waiting,
            "vllm:gpu_cache_usage_perc" | "vllm:kv_cache_usage_perc" => &mut kv,
            _ => continue,
        };
        // The value follows the labels: the first field after the closing brace (or name).
        let rest = match line[name_end..].find('}') {
            Some(close) if line[name_end..].starts_with('{') => &line[name_end + close + 1..],
            _ => &line[name_end..],
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        *slot = Some(slot.unwrap_or(0.0) + value);
    }
    if running.is_none() && waiting.is_none() && kv.is_none() {
        return None;
    }
    Some(ServerLoad {
        running: running.unwrap_or(0.0) as u64,
        waiting: waiting.unwrap_or(0.0) as u64,
        kv_cache_usage: kv.unwrap_or(0.0).min(1.0),
        at,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_vllm_metrics() {
        let text = r#"
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
vllm:num_preemptions_total{model_name="x"} 12.0
"#;
        let now = Instant::now();
        let l = parse(text, now).unwrap();
        assert_eq!((l.running, l.waiting), (7, 3));
        assert!((l.kv_cache_usage - 0.42).abs() < 1e-9);
        assert_eq!(parse("# nothing\nother_metric 1\n", now), None);
        // Newer name, no labels, garbage lines ignored.
        let l = parse(
            "vllm:kv_cache_usage_perc 0.97\nvllm:num_requests_running{a=\"}\"} x\n",
            now,
        )
        .unwrap();
        assert!((l.kv_cache_usage - 0.97).abs() < 1e-9);
        assert_eq!(l.running, 0);
    }
}
