//! Fuzz tests of every hand-written reader of untrusted bytes: the SSE parser (unbounded and
//! with a small bound on one event), upstream usage reports (billed only in range), the HTTP/1.1
//! response head parser and chunked decoder (provider responses), the RESP reader (Redis),
//! the request body parsers of each API, the stream adapters (same dialect and translated),
//! the model renamer, and the billing pipeline's event decoder.
//!
//! A small mutation fuzzer, run for a bounded number of cases per target: each target's
//! corpus (`tests/fuzz/corpus/<target>/`, kept in the repo) is run as is, then
//! `TOLLGATE_FUZZ_CASES` (default 3000) inputs made by mutating corpus entries (bit flips,
//! byte insertions and deletions, interesting bytes, splices of two entries, truncation),
//! each cut into random pieces where the reader is incremental. Nothing may panic; readers
//! fed in pieces must read what they read whole. The seed is printed;
//! `TOLLGATE_FUZZ_SEED` replays a run. A crash found goes into the corpus with its fix.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::path::PathBuf;

use tollgate_gateway::fuzz_targets as t;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b"data: ",
    b"event: ",
    b":",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b"0",
    b"-1",
    b"18446744073709551616",
    b"ffffffffffffffff",
    b"$",
    b"*",
    b"\x00",
    b"\xff",
    b"\xc3\x28",
    b"\xe2\x82",
    b"null",
    b"[DONE]",
    b"\"model\":",
    b"1e999",
];

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let out: Vec<Vec<u8>> = entries.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!out.is_empty(), "{}: empty corpus", dir.display());
    out
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.insert(at, rng.next() as u8),
            2 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                let start = at.min(end.saturating_sub(1));
                v.drain(start..end);
            }
            3 => {
                let s = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(at..at, s.iter().copied());
            }
            4 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            5 => v.truncate(at),
            _ => {
                // Repeat a slice (long lines, deep nesting).
                let end = (at + rng.below(32)).min(v.len());
                let piece = v[at..end].to_vec();
                for _ in 0..rng.below(64) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
        }
    }
    v
}

/// Sorted cut positions within `len`.
fn cuts(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut c: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(len + 1)).collect();
    c.sort_unstable();
    c
}

/// Runs `check` on the corpus, then on mutated inputs.
fn fuzz(target: &str, mut check: impl FnMut(&[u8], &mut Rng)) {
    let seed = tollgate_tests::seed("TOLLGATE_FUZZ_SEED");
    let cases: usize = std::env::var("TOLLGATE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let corpus = corpus(target);
    let mut rng = Rng(seed);
    for input in &corpus {
        check(input, &mut rng);
    }
    for _ in 0..cases {
        let input = mutate(&mut rng, &corpus);
        check(&input, &mut rng);
    }
}

#[test]
fn sse_parser_reads_the_same_frames_however_the_bytes_are_cut() {
    fuzz("sse", |input, rng| {
        let whole = t::sse(input, &[]);
        let cut = t::sse(input, &cuts(rng, input.len()));
        assert_eq!(whole, cut, "{:?}", String::from_utf8_lossy(input));
        // Frames are the input, in order, nothing invented (invalid UTF-8 replaced by
        // U+FFFD, as the parser does per frame).
        let mut rebuilt: Vec<u8> = whole.0.concat().to_vec();
        if let Some(rest) = &whole.1 {
            rebuilt.extend_from_slice(rest);
        }
        let text = String::from_utf8_lossy(input);
        assert!(
            text.as_bytes().starts_with(&rebuilt),
            "{text:?} does not begin with {:?}",
            String::from_utf8_lossy(&rebuilt)
        );
    });
}

#[test]
fn a_bounded_sse_parser_reads_what_the_unbounded_one_does_until_it_gives_up() {
    fuzz("sse", |input, rng| {
        let max = 1 + rng.below(256);
        let whole = t::sse(input, &[]);
        let (frames, rest, overflowed) = t::sse_bounded(input, &cuts(rng, input.len()), max);
        // Nothing invented or reordered: what it read is what the unbounded parser read.
        assert!(frames.len() <= whole.0.len());
        assert_eq!(frames[..], whole.0[..frames.len()]);
        if overflowed {
            assert!(rest.is_none(), "nothing is returned after an overflow");
        } else {
            assert_eq!((frames, rest), whole, "{max}");
        }
    });
}

#[test]
fn usage_reports_are_billed_only_when_in_range_and_consistent() {
    fuzz("usage", |input, rng| {
        let max = [u64::MAX, 10_000_000, rng.next() % 1_000][rng.below(3)];
        for u in t::usage(input, max).into_iter().flatten() {
            let figures = [
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_input_tokens,
                u.output_tokens,
            ];
            assert!(figures.iter().all(|n| *n <= max), "{u:?} over {max}");
            assert!(u.input_tokens.checked_add(u.output_tokens).is_some());
            assert!(u.cached_input_tokens <= u.input_tokens, "{u:?}");
        }
    });
}

#[test]
fn resp_reader_never_reads_past_its_input_and_waits_on_prefixes() {
    fuzz("resp", |input, _| {
        if let Ok(Some(n)) = t::resp(input) {
            assert!(n <= input.len());
            // Every strict prefix of a whole reply is incomplete (or, cut inside a length,
            // an error), never a different whole reply.
            for k in 0..n {
                if let Ok(Some(m)) = t::resp(&input[..k]) {
                    panic!("prefix {k} of a {n}-byte reply read as a {m}-byte one");
                }
            }
        }
    });
}

#[test]
fn http_head_parser_and_chunked_decoder_hold_on_any_bytes() {
    fuzz("http_head", |input, _| {
        if let Ok(Some(n)) = t::http_head(input) {
            assert!(n <= input.len());
        }
    });
    fuzz("chunked", |input, rng| {
        let whole = t::chunked(input, &[]);
        let cut = t::chunked(input, &cuts(rng, input.len()));
        match (&whole, &cut) {
            (Ok(a), Ok(b)) => {
                // Cut or whole, the same payload once the body has ended.
                if a.1 && b.1 {
                    assert_eq!(a.0, b.0);
                }
            }
            (Err(_), _) | (_, Err(_)) => {}
        }
    });
}

#[test]
fn request_bodies_parse_or_are_refused_as_the_clients_error() {
    for (api, target) in [
        (0u8, "request_chat"),
        (1, "request_messages"),
        (2, "request_embeddings"),
    ] {
        fuzz(target, |input, _| match t::request_body(api, input) {
            Ok(()) => {}
            Err(tollgate_gateway::error::GatewayError::BadRequest { .. }) => {}
            Err(e) => panic!("{target}: {e:?} for {:?}", String::from_utf8_lossy(input)),
        });
    }
}

#[test]
fn stream_adapters_hold_on_any_upstream_stream() {
    fuzz("stream", |input, rng| {
        let c = cuts(rng, input.len());
        let fail = rng.below(2) == 0;
        t::stream_adapters(input, &c, fail);
        if let Some(renamed) = t::rename(input) {
            // Renaming keeps valid JSON valid.
            if serde_json::from_slice::<serde_json::Value>(input).is_ok() {
                serde_json::from_slice::<serde_json::Value>(&renamed).unwrap();
            }
        }
    });
}

#[test]
fn the_pipelines_event_decoder_bills_or_rejects_any_payload() {
    fuzz("event", |input, _| {
        let record = tollgate_pipeline::fact::SourceRecord {
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            payload: input.to_vec(),
            replay_only: false,
        };
        for details in [false, true] {
            if let Ok(c) = tollgate_pipeline::fact::Completion::parse(&record, details) {
                let _ = c.usage();
                let _ = c.into_fact();
            }
        }
    });
}
