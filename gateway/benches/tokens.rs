//! Cost of token counting on hostile inputs: long runs without spaces, one repeated
//! character, CJK, emoji, mixed scripts and (for comparison) ordinary prose, at 100 KB and
//! 400 KB, as the pre-flight estimate and the fallback output count see them. Counting must
//! stay linear in the input (see `tollgate_gateway::tokens::count_with`); the numbers are in
//! `docs/measurements/hostile-input.md`.
//!
//! Run: `cargo bench -p tollgate-gateway --bench tokens`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate_gateway::tokens;

/// `unit` repeated to at least `bytes` bytes.
fn repeat_to(unit: &str, bytes: usize) -> String {
    unit.repeat(bytes / unit.len() + 1)
}

fn inputs(bytes: usize) -> Vec<(&'static str, String)> {
    vec![
        (
            "no_spaces_base64",
            repeat_to("aGVsbG8gd29ybGQsIHRoaXMgaXM", bytes),
        ),
        ("one_char_x", "x".repeat(bytes)),
        ("cjk", repeat_to("漢字かな交じり文の長い段落", bytes)),
        ("emoji", repeat_to("🦀🚀✨👍🏽", bytes)),
        ("mixed_scripts", repeat_to("abcабвαβγ١٢٣אבג", bytes)),
        ("whitespace", " ".repeat(bytes)),
        (
            "prose",
            repeat_to(
                "The gateway streams every token to the client, and bills it once. ",
                bytes,
            ),
        ),
    ]
}

fn counting(c: &mut Criterion) {
    tokens::warm_up();
    let mut group = c.benchmark_group("count_text");
    group.sample_size(10);
    for bytes in [100_000usize, 400_000] {
        for (name, text) in inputs(bytes) {
            group.throughput(Throughput::Bytes(text.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(name, format!("{}KB", bytes / 1000)),
                &text,
                |b, text| b.iter(|| tokens::count_text("gpt-4o", text)),
            );
        }
    }
    group.finish();

    // The whole pre-flight estimate of a chat request with one such message.
    let mut group = c.benchmark_group("chat_prompt");
    group.sample_size(10);
    for bytes in [100_000usize, 400_000] {
        let body = serde_json::json!({
            "model": "gpt-4o", "max_tokens": 5,
            "messages": [{"role": "user", "content": "x".repeat(bytes)}]
        });
        let request: tollgate_gateway::api::openai::ChatRequest =
            serde_json::from_value(body).unwrap();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(
            BenchmarkId::new("no_spaces", format!("{}KB", bytes / 1000)),
            &request,
            |b, r| b.iter(|| tokens::count_openai_prompt(r)),
        );
    }
    group.finish();
}

criterion_group!(benches, counting);
criterion_main!(benches);
