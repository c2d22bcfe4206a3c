//! Cost of authenticating a request: from the key cache, and on a cache miss (SQLite store,
//! and PostgreSQL when `TOLLGATE_DATABASE_URL` is set). Prints p50/p99/max per case.
//!
//! Run: `cargo bench -p tollgate-gateway --bench auth`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)] // a benchmark's output is its product

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use hdrhistogram::Histogram;
use tollgate_gateway::auth::{keys, Authenticator};
use tollgate_gateway::store::postgres::PostgresStore;
use tollgate_gateway::store::sqlite::SqliteStore;
use tollgate_gateway::store::{MetaStore, NewKey};

async fn measure(label: &str, auth: &Authenticator, headers: &HeaderMap, n: usize) {
    for _ in 0..n / 10 {
        auth.authenticate(headers).await.expect("valid key");
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    for _ in 0..n {
        let t = Instant::now();
        auth.authenticate(headers).await.expect("valid key");
        h.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    println!(
        "{label:<28} n={n:<7} p50={:>8.2} µs  p99={:>8.2} µs  max={:>9.2} µs",
        h.value_at_quantile(0.50) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
}

async fn bench_store(name: &str, store: Arc<dyn MetaStore>) {
    let tenant = store
        .create_tenant(&format!("bench-{}", uuid::Uuid::new_v4()), None)
        .await
        .unwrap();
    let k = keys::generate();
    let spec = NewKey {
        tenant_id: tenant.id,
        name: "bench".into(),
        ..Default::default()
    };
    store
        .create_key(&spec, &k.hash, &k.display_prefix)
        .await
        .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", k.secret)).unwrap(),
    );

    let cached = Arc::new(Authenticator::new(store.clone(), Duration::from_secs(3600)));
    cached.follow().await.unwrap();
    measure(&format!("{name}: cache hit"), &cached, &headers, 200_000).await;

    let uncached = Arc::new(Authenticator::new(store.clone(), Duration::ZERO));
    uncached.follow().await.unwrap();
    measure(&format!("{name}: cache miss"), &uncached, &headers, 5_000).await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        bench_store("sqlite", Arc::new(SqliteStore::open(dir.path()).await.unwrap())).await;
        match std::env::var("TOLLGATE_DATABASE_URL") {
            Ok(url) => bench_store("postgres", Arc::new(PostgresStore::connect(&url).await.unwrap())).await,
            Err(_) => println!("postgres: skipped (set TOLLGATE_DATABASE_URL, e.g. after scripts/services.sh up postgres)"),
        }
    });
}
