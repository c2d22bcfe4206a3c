//! Invoices end to end: the real `tollgate` binary, a fresh data directory, the embedded
//! billing pipeline. Two tenants (one on a plan with a fee, one with a discount) use
//! `mock/fast` under two successive list prices; `tollgate invoices export` of the current
//! month (drafts) must show one line per price with the exact metered cost rounded by the
//! documented rule, discounts of the rounded lines, the plan fee and a total that is the sum
//! of the lines, identically in JSON, CSV, HTML and the admin API, byte for byte on re-export.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)] // test code: failing loudly is the point

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tollgate_tests::process::{tollgate, GatewayProcess};

const MODEL: &str = "mock/fast";
const ADMIN_TOKEN: &str = "invoice-test-admin-token";
/// (input, cached input, output) per million tokens: the first and the second list price.
/// Large enough that lines come to cents and dollars, with digits that any rounding would show.
const PRICE_A: (&str, &str, &str) = ("1234.567891", "300.5", "9876.54321");
const PRICE_B: (&str, &str, &str) = ("2500.25", "500.5", "12345.678901");

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// The invoice rounding rule, computed independently: 2 places, half away from zero.
fn money(d: Decimal) -> Decimal {
    let mut r = d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    if r.is_zero() {
        r = Decimal::ZERO;
    }
    r.rescale(2);
    r
}

fn cost(price: (&str, &str, &str), prompt: i64, cached: i64, completion: i64) -> Decimal {
    (Decimal::from(prompt - cached) * dec(price.0)
        + Decimal::from(cached) * dec(price.1)
        + Decimal::from(completion) * dec(price.2))
        / Decimal::from(1_000_000)
}

fn run(data: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--data-dir", data];
    all.extend_from_slice(args);
    tollgate(&all, &[])
}

fn run_ok(data: &str, args: &[&str]) -> String {
    let out = run(data, args);
    assert!(
        out.status.success(),
        "tollgate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn run_err(data: &str, args: &[&str], needle: &str) {
    let out = run(data, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tollgate {args:?} should fail");
    assert!(stderr.contains(needle), "tollgate {args:?}: {stderr}");
}

fn set_price(data: &str, price: (&str, &str, &str), from: &str) {
    run_ok(
        data,
        &[
            "prices",
            "set",
            "--model",
            MODEL,
            "--input",
            price.0,
            "--cached-input",
            price.1,
            "--output",
            price.2,
            "--effective-from",
            from,
        ],
    );
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn period_of(t: OffsetDateTime) -> String {
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

/// Sends `n` completions with `key`; returns the exact cost under `price` of what the
/// responses reported.
async fn send(base: &str, key: &str, n: usize, price: (&str, &str, &str)) -> Decimal {
    let client = reqwest::Client::new();
    let mut total = Decimal::ZERO;
    for i in 0..n {
        let r = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": format!("invoice {i}{}", " more".repeat(i))}],
                "max_tokens": 3 + i % 7,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let n = |p: &str| v["usage"].pointer(p).and_then(Value::as_i64).unwrap_or(0);
        total += cost(
            price,
            n("/prompt_tokens"),
            n("/prompt_tokens_details/cached_tokens"),
            n("/completion_tokens"),
        );
    }
    total
}

/// Polls `/v1/usage` until the ledger holds `requests` requests of this key's tenant.
async fn wait_for_ledger(base: &str, key: &str, requests: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = reqwest::Client::new()
            .get(format!("{base}/v1/usage"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["total"]["requests"].as_i64() >= Some(requests) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ledger never reached {requests}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn export(data: &str, period: &str, format: &str, out: &Path) -> BTreeMap<String, Vec<u8>> {
    run_ok(
        data,
        &[
            "invoices",
            "export",
            "--period",
            period,
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    files(out)
}

/// What one tenant's invoice must say.
struct Want {
    number: String,
    cost_a: Decimal,
    cost_b: Decimal,
    discount_percent: Option<Decimal>,
    plan_fee: Decimal,
}

impl Want {
    fn lines(&self) -> (Decimal, Decimal, Decimal, Decimal) {
        let (a, b) = (money(self.cost_a), money(self.cost_b));
        let disc = |x: Decimal| {
            self.discount_percent
                .map(|p| money(-(x * p / Decimal::ONE_HUNDRED)))
                .unwrap_or(Decimal::ZERO)
        };
        (a, b, disc(a), disc(b))
    }

    fn total(&self) -> Decimal {
        let (a, b, da, db) = self.lines();
        a + b + da + db + self.plan_fee
    }

    fn check_json(&self, inv: &Value, period: &str) {
        let (a, b, da, db) = self.lines();
        assert_eq!(inv["number"], self.number.as_str(), "{inv}");
        assert_eq!(inv["period"], period);
        assert_eq!(inv["status"], "draft");
        assert!(inv["issue_date"].is_null());
        assert_eq!(inv["currency"], "USD");
        let lines = inv["lines"].as_array().unwrap();
        let amounts = |kind: &str| -> Vec<(String, String)> {
            lines
                .iter()
                .filter(|l| l["kind"] == kind)
                .map(|l| {
                    (
                        l["price_from"].as_str().unwrap().to_string(),
                        l["amount"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        let usage = amounts("usage");
        assert_eq!(usage.len(), 2, "{inv}");
        assert_eq!(usage[0].0, "2020-01-01T00:00:00Z", "{inv}");
        assert_eq!(usage[0].1, a.to_string(), "{inv}");
        assert_eq!(usage[1].1, b.to_string(), "{inv}");
        assert_eq!(lines[0]["input_per_mtok"], PRICE_A.0);
        assert_eq!(lines[1]["output_per_mtok"], PRICE_B.2);
        let discounts = amounts("discount");
        if self.discount_percent.is_some() {
            assert_eq!(discounts.len(), 2, "{inv}");
            assert_eq!(discounts[0].1, da.to_string(), "{inv}");
            assert_eq!(discounts[1].1, db.to_string(), "{inv}");
        } else {
            assert!(discounts.is_empty(), "{inv}");
        }
        let fee: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "plan_fee").collect();
        assert_eq!(fee.len(), usize::from(!self.plan_fee.is_zero()), "{inv}");
        let sum: Decimal = lines
            .iter()
            .map(|l| dec(l["amount"].as_str().unwrap()))
            .sum();
        assert_eq!(sum, self.total(), "{inv}");
        assert_eq!(inv["total"], self.total().to_string(), "{inv}");
        assert_eq!(inv["subtotal"], (a + b).to_string(), "{inv}");
    }
}

#[tokio::test]
async fn invoices_export_the_exact_rounded_ledger_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data = data_dir.to_str().unwrap();
    let now = OffsetDateTime::now_utc();
    let period = period_of(now);
    let next = now.replace_day(28).unwrap() + time::Duration::days(5);
    let previous = now.replace_day(1).unwrap() - time::Duration::days(1);

    let plan: Value = serde_json::from_str(&run_ok(
        data,
        &["plans", "create", "pro", "--monthly-fee", "19.995"],
    ))
    .unwrap();
    assert_eq!(plan["monthly_fee"], "19.995");
    let acme = run_ok(data, &["tenants", "create", "acme", "--plan", "pro"]);
    let beta = run_ok(data, &["tenants", "create", "beta"]);
    let acme_key = run_ok(data, &["keys", "create", "--tenant", &acme]);
    let beta_key = run_ok(data, &["keys", "create", "--tenant", &beta]);
    set_price(data, PRICE_A, "2020-01-01T00:00:00Z");
    run_ok(
        data,
        &[
            "discounts",
            "add",
            "--tenant",
            &acme,
            "--percent",
            "12.5",
            "--from",
            "2020-01-01T00:00:00Z",
        ],
    );

    let gw = GatewayProcess::start(
        &["--data-dir", data],
        &[("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
        dir.path().join("gw.log"),
    )
    .await;
    let base = gw.base_url.clone();
    let acme_a = send(&base, &acme_key, 5, PRICE_A).await;
    let beta_a = send(&base, &beta_key, 4, PRICE_A).await;
    wait_for_ledger(&base, &acme_key, 5).await;
    wait_for_ledger(&base, &beta_key, 4).await;

    // A second list price from two seconds on; the pipeline refreshes its price book every second.
    set_price(
        data,
        PRICE_B,
        &rfc3339(OffsetDateTime::now_utc() + time::Duration::seconds(2)),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let acme_b = send(&base, &acme_key, 3, PRICE_B).await;
    let beta_b = send(&base, &beta_key, 6, PRICE_B).await;
    wait_for_ledger(&base, &acme_key, 8).await;
    wait_for_ledger(&base, &beta_key, 10).await;

    let compact = period.replace('-', "");
    let want = [
        Want {
            number: format!("TG-{compact}-{acme}"),
            cost_a: acme_a,
            cost_b: acme_b,
            discount_percent: Some(dec("12.5")),
            plan_fee: dec("20.00"),
        },
        Want {
            number: format!("TG-{compact}-{beta}"),
            cost_a: beta_a,
            cost_b: beta_b,
            discount_percent: None,
            plan_fee: Decimal::ZERO,
        },
    ];

    // JSON, twice: byte-identical.
    let json1 = export(data, &period, "json", &dir.path().join("json1"));
    let json2 = export(data, &period, "json", &dir.path().join("json2"));
    assert_eq!(json1, json2);
    let mut names: Vec<String> = want.iter().map(|w| format!("{}.json", w.number)).collect();
    names.sort();
    assert_eq!(json1.keys().cloned().collect::<Vec<_>>(), names);
    let mut api_expected = Vec::new();
    for w in &want {
        let inv: Value = serde_json::from_slice(&json1[&format!("{}.json", w.number)]).unwrap();
        w.check_json(&inv, &period);
        api_expected.push(inv);
    }
    api_expected.sort_by_key(|v| v["tenant_id"].as_str().unwrap().to_string());

    // The admin API serves the same objects.
    let api: Value = reqwest::Client::new()
        .get(format!("{base}/admin/v1/invoices?period={period}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api, Value::Array(api_expected));
    let r = reqwest::Client::new()
        .post(format!("{base}/admin/v1/billing-periods/{period}/close"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has not ended"),
        "{body}"
    );

    // CSV: the same amounts, and a total row.
    let csv = export(data, &period, "csv", &dir.path().join("csv"));
    for w in &want {
        let text = String::from_utf8(csv[&format!("{}.csv", w.number)].clone()).unwrap();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        let amount = |kind: &str| -> Vec<Decimal> {
            rows.iter()
                .filter(|r| r[7] == kind)
                .map(|r| dec(r.last().unwrap()))
                .collect()
        };
        let (a, b, _, _) = w.lines();
        assert_eq!(amount("usage"), vec![a, b], "{text}");
        assert_eq!(amount("total"), vec![w.total()], "{text}");
        assert!(rows.iter().all(|r| r[0] == w.number), "{text}");
    }

    // HTML: self-contained, with the header, the total and the rounding rule.
    let html = export(data, &period, "html", &dir.path().join("html"));
    for w in &want {
        let text = String::from_utf8(html[&format!("{}.html", w.number)].clone()).unwrap();
        assert!(text.starts_with("<!DOCTYPE html>"));
        assert!(text.contains(&w.number) && text.contains("DRAFT"), "{text}");
        assert!(text.contains(&format!("{} USD", w.total())), "{text}");
        assert!(text.contains("half away from zero"), "{text}");
        assert!(
            !text.contains("<script") && !text.contains("http"),
            "{text}"
        );
    }

    // One tenant only, by name.
    let one = dir.path().join("one");
    run_ok(
        data,
        &[
            "invoices",
            "export",
            "--period",
            &period,
            "--tenant",
            "beta",
            "--format",
            "json",
            "--out",
            one.to_str().unwrap(),
        ],
    );
    assert_eq!(files(&one).len(), 1);

    // Bad inputs: a non-zero exit and nothing written.
    let bad = dir.path().join("bad");
    let bad_out = bad.to_str().unwrap();
    run_err(
        data,
        &[
            "invoices", "export", "--period", "2026-13", "--format", "json", "--out", bad_out,
        ],
        "malformed period",
    );
    run_err(
        data,
        &[
            "invoices", "export", "--period", "26-01", "--format", "json", "--out", bad_out,
        ],
        "malformed period",
    );
    run_err(
        data,
        &[
            "invoices",
            "export",
            "--period",
            &period_of(next),
            "--format",
            "json",
            "--out",
            bad_out,
        ],
        "has not started",
    );
    run_err(
        data,
        &[
            "invoices", "export", "--period", &period, "--tenant", "nobody", "--format", "json",
            "--out", bad_out,
        ],
        "no tenant",
    );
    run_err(
        data,
        &[
            "invoices", "export", "--period", &period, "--format", "pdf", "--out", bad_out,
        ],
        "[possible values: csv, json, html]",
    );
    assert!(!bad.exists());
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "a file, not a directory").unwrap();
    let under_file = blocker.join("out");
    run_err(
        data,
        &[
            "invoices",
            "export",
            "--period",
            &period,
            "--format",
            "json",
            "--out",
            under_file.to_str().unwrap(),
        ],
        "cannot create directory",
    );
    assert!(!under_file.exists());

    // Closing: not the current month (it has not ended); the previous one once, not twice.
    run_err(
        data,
        &["invoices", "close", "--period", &period],
        "has not ended",
    );
    run_err(
        data,
        &["invoices", "close", "--period", "2026-1"],
        "malformed period",
    );
    let closed: Value = serde_json::from_str(&run_ok(
        data,
        &["invoices", "close", "--period", &period_of(previous)],
    ))
    .unwrap();
    assert_eq!(closed["period"], period_of(previous).as_str());
    run_err(
        data,
        &["invoices", "close", "--period", &period_of(previous)],
        "already closed",
    );
    // The tenants did not exist yet then: the closed period has nothing to invoice.
    let prev_out = dir.path().join("prev");
    assert!(export(data, &period_of(previous), "json", &prev_out).is_empty());
    drop(gw);
}

/// A completion of an already closed period arrives late (as the gateway's spool replays it
/// into the event log): the closed invoice does not change; the next invoice carries an
/// adjustment line for it, and `reconcile` of the closed period still agrees.
#[tokio::test]
async fn a_late_completion_of_a_closed_period_becomes_an_adjustment_in_the_next_invoice() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data = data_dir.to_str().unwrap();
    let now = OffsetDateTime::now_utc();
    let period = period_of(now);
    let previous_day = now.replace_day(1).unwrap() - time::Duration::days(1);
    let previous = period_of(previous_day);

    let tenant = run_ok(data, &["tenants", "create", "late"]);
    let key = run_ok(data, &["keys", "create", "--tenant", &tenant]);
    set_price(data, PRICE_A, "2020-01-01T00:00:00Z");
    run_ok(data, &["invoices", "close", "--period", &previous]);
    let out = dir.path().join("closed-before");
    std::fs::create_dir_all(&out).unwrap();
    let closed_before = export(data, &previous, "json", &out);

    let gw = GatewayProcess::start(&["--data-dir", data], &[], dir.path().join("gw.log")).await;
    let base = gw.base_url.clone();
    let current = send(&base, &key, 3, PRICE_A).await;
    wait_for_ledger(&base, &key, 3).await;

    // The late event: the same shape the gateway writes, with an event time in the closed
    // period, appended to the local log as a spool replay would.
    let at = previous_day.replace_hour(12).unwrap();
    let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap();
    let event_time = tollgate_schemas::events::format_event_time(at.into());
    let (prompt, cached, completion) = (1234_i64, 200_i64, 567_i64);
    let event = json!({
        "schema_version": 1, "event_id": tollgate_schemas::events::new_event_id(),
        "event_time": event_time, "request_id": "req_late", "tenant_id": tenant,
        "key_id": "key_late", "route": "chat", "requested_model": MODEL, "model_alias": MODEL,
        "deployment": "mock", "provider": "mock", "upstream_model": MODEL, "stream": false,
        "status": "completed", "finish_reason": "stop", "error": null,
        "usage": {"input_tokens": prompt, "cached_input_tokens": cached,
                  "cache_write_input_tokens": 0, "output_tokens": completion, "source": "provider"},
        "chunks": 0, "ttft_ms": 40, "latency_ms": 90, "gateway_overhead_us": 80, "retries": 0,
        "fallbacks": 0, "cache_hit": false, "price_book_version": null, "received_at": event_time,
    });
    let log = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        data_dir.join("events.sqlite").display()
    ))
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO event_log (topic, event_key, event_id, timestamp_ms, payload) VALUES ('llm.completions', ?, ?, ?, ?)",
    )
    .bind(&tenant)
    .bind(event["event_id"].as_str().unwrap())
    .bind(ms)
    .bind(event.to_string())
    .execute(&log)
    .await
    .unwrap();
    let late = cost(PRICE_A, prompt, cached, completion);

    // Wait until the ledger booked it (into the open period, as an adjustment).
    let ledger = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        data_dir.join("tollgate.db").display()
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM usage_price_lines WHERE period = ? AND event_period = ?",
        )
        .bind(&period)
        .bind(&previous)
        .fetch_one(&ledger)
        .await
        .unwrap();
        if n > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late completion was not booked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The closed period's invoice is unchanged, byte for byte.
    let after = dir.path().join("closed-after");
    std::fs::create_dir_all(&after).unwrap();
    let closed_after = export(data, &previous, "json", &after);
    assert_eq!(closed_before, closed_after);
    // The open period's invoice carries the usage and the adjustment.
    let files = export(data, &period, "json", &dir.path().join("open"));
    let invoices: Vec<Value> = files
        .values()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    let inv = invoices
        .iter()
        .find(|i| i["tenant_id"] == tenant.as_str())
        .expect("an invoice for the tenant");
    let lines = inv["lines"].as_array().unwrap();
    let adjustment: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "adjustment").collect();
    assert_eq!(adjustment.len(), 1, "{lines:?}");
    assert_eq!(adjustment[0]["event_period"], previous.as_str());
    assert_eq!(dec(adjustment[0]["amount"].as_str().unwrap()), money(late));
    assert_eq!(
        dec(inv["total"].as_str().unwrap()),
        money(current) + money(late),
        "{inv}"
    );
    // Events, ledger and invoices of the closed period still agree.
    drop(gw);
    let report = run_ok(data, &["reconcile", "--period", &previous, "--all"]);
    assert!(report.contains(", 0 with differences"), "{report}");
    assert!(
        report.contains(&format!("{tenant}\t{MODEL}\t1 / ")),
        "{report}"
    );
}
