//! Cost of PII masking: detection and masking of a chat request's body (every detector,
//! placeholders, the body re-serialized) at a typical 4 KB prompt and at 100 KB, with a few
//! entities per kilobyte and without any; and restoring a response. The numbers are in
//! `docs/measurements/pii-masking.md`.
//!
//! Run: `cargo bench -p tollgate-gateway --bench pii`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate_gateway::privacy::Masker;

const WITH_PII: &str = "Customer Jane Doe (jane.doe@example.com, +44 20 7946 0958) asked on \
    2024-03-01 about the refund of order 88231 paid with card 4111 1111 1111 1111; her IBAN \
    is GB82 WEST 1234 5698 7654 32 and she wrote from 192.168.10.24. ";
const PROSE: &str = "The gateway streams every token to the client and bills it once; the \
    meeting moved to room 12 at 10:30 and the budget is 1,250,000 EUR for the year. ";

/// A chat request whose messages hold about `bytes` of `unit` (three turns).
fn body(unit: &str, bytes: usize) -> Vec<u8> {
    let text = unit.repeat(bytes / unit.len() / 3 + 1);
    serde_json::to_vec(&serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": text},
        {"role": "user", "content": text},
        {"role": "user", "content": [{"type": "text", "text": text}]}]}))
    .unwrap()
}

fn masking(c: &mut Criterion) {
    let mut group = c.benchmark_group("pii_mask_body");
    for bytes in [4 * 1024, 100 * 1024] {
        for (name, unit) in [("with_pii", WITH_PII), ("prose", PROSE)] {
            let input = body(unit, bytes);
            group.throughput(Throughput::Bytes(input.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(name, format!("{}KB", bytes / 1024)),
                &input,
                |b, input| {
                    b.iter(|| {
                        let mut m = Masker::new(b"bench-key-0123456789", "tenant");
                        m.mask_body(input).unwrap()
                    })
                },
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("pii_restore_body");
    for bytes in [4 * 1024, 100 * 1024] {
        let input = body(WITH_PII, bytes);
        let mut m = Masker::new(b"bench-key-0123456789", "tenant");
        let masked = m.mask_body(&input).unwrap().unwrap();
        let restorer = m.restorer().unwrap();
        group.throughput(Throughput::Bytes(masked.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("with_pii", format!("{}KB", bytes / 1024)),
            &masked,
            |b, masked| b.iter(|| restorer.restore_body(masked).unwrap()),
        );
    }
    group.finish();
}

criterion_group!(benches, masking);
criterion_main!(benches);
