//! `tollgate_cost` through Arroyo's plugin interface: the dynamic library this crate builds is
//! loaded with `dlopen`, its generated entry point `__run` is called with Arrow arrays (in the
//! Arrow C data interface, as Arroyo's host passes them), and every cost equals what the
//! pipeline's pricing (`PriceRow::cost` of tollgate-schemas) computes, to the last digit.
//! Also: `pipeline.sql` parses as SQL and calls the UDF with its seven arguments.

#![allow(clippy::unwrap_used, clippy::expect_used, unsafe_code)] // test code; FFI is the point

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use arroyo_udf_plugin::arrow::array::{Array, ArrayRef, StringArray, UInt64Array};
use arroyo_udf_plugin::arrow::ffi::from_ffi;
use arroyo_udf_plugin::{FfiArrays, RunResult};
use rust_decimal::Decimal;
use tollgate_schemas::pricing::PriceRow;
use tollgate_schemas::{TokenUsage, UsageSource};

/// (input, cached input, cache-write input, output tokens; input, cached, output price).
type Case = (u64, u64, u64, u64, &'static str, &'static str, &'static str);

const CASES: &[Case] = &[
    (1000, 200, 100, 7, "0.150000000001", "0.5", "0.6"),
    (0, 0, 0, 0, "3", "0.3", "15"),
    (1, 0, 0, 1, "0.000000000001", "0", "0.000000000001"),
    (128_000, 64_000, 32_000, 4096, "2.5", "1.25", "10"),
    (
        1_000_000_000, // the most a count may hold (MAX_TOKENS_PER_COUNT)
        1,
        2,
        999_999_999,
        "999999.999999999999",
        "0.000001",
        "75",
    ),
    (500, 400, 200, 10, "1.1", "0.275", "4.4"), // cache reads + writes > input: saturates
    (
        77,
        0,
        0,
        33,
        "3.300000000000",
        "0.825000000000",
        "13.200000000000",
    ),
];

fn usage(c: &Case) -> TokenUsage {
    TokenUsage {
        input_tokens: c.0,
        cached_input_tokens: c.1,
        cache_write_input_tokens: c.2,
        output_tokens: c.3,
        source: UsageSource::Provider,
    }
}

/// The pipeline's way: a price-book row's cost.
fn pipeline_cost(c: &Case) -> Decimal {
    PriceRow {
        model: "m".into(),
        tenant_id: None,
        effective_from_ms: 0,
        input_per_mtok: Decimal::from_str(c.4).unwrap(),
        cached_input_per_mtok: Decimal::from_str(c.5).unwrap(),
        output_per_mtok: Decimal::from_str(c.6).unwrap(),
        currency: "USD".into(),
    }
    .cost(&usage(c))
    .unwrap()
}

/// The dynamic library cargo built for this crate (next to the test's deps directory).
fn dylib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(format!(
        "{}tollgate_arroyo_udf{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        path.exists(),
        "{} is missing: `cargo build` this crate before its tests",
        path.display()
    );
    path
}

type Run = unsafe extern "C-unwind" fn(FfiArrays) -> RunResult;

/// The plugin, loaded once and never unloaded (like Arroyo's host does): the arrays it returns
/// are released through callbacks that live in its code.
fn plugin() -> &'static libloading::Library {
    static LIB: std::sync::OnceLock<libloading::Library> = std::sync::OnceLock::new();
    LIB.get_or_init(|| unsafe { libloading::Library::new(dylib()) }.unwrap())
}

/// Calls the plugin's `__run` on one batch, as Arroyo's host does.
fn run_plugin(columns: Vec<ArrayRef>) -> StringArray {
    let run: libloading::Symbol<Run> = unsafe { plugin().get(b"__run") }.unwrap();
    let args = FfiArrays::from_vec(columns.iter().map(|c| c.to_data()).collect());
    let RunResult::Ok(out) = (unsafe { run(args) }) else {
        panic!("the UDF returned an error");
    };
    let data = unsafe { from_ffi(out.0, &out.1) }.unwrap();
    StringArray::from(data)
}

fn columns(cases: &[Case]) -> Vec<ArrayRef> {
    let tokens = |f: fn(&Case) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(cases.iter().map(f).collect::<Vec<_>>()))
    };
    let prices = |f: fn(&Case) -> &'static str| -> ArrayRef {
        Arc::new(StringArray::from(cases.iter().map(f).collect::<Vec<_>>()))
    };
    vec![
        tokens(|c| c.0),
        tokens(|c| c.1),
        tokens(|c| c.2),
        tokens(|c| c.3),
        prices(|c| c.4),
        prices(|c| c.5),
        prices(|c| c.6),
    ]
}

#[test]
fn the_plugin_prices_like_the_pipeline() {
    let out = run_plugin(columns(CASES));
    assert_eq!(out.len(), CASES.len());
    for (i, case) in CASES.iter().enumerate() {
        assert!(out.is_valid(i), "row {i} is NULL");
        let cost = Decimal::from_str(out.value(i)).unwrap();
        assert_eq!(cost, pipeline_cost(case), "case {case:?}");
    }
    // One figure written out by hand: (700 × 0.150000000001 + 200 × 0.5 + 100 × 0.150000000001
    // + 7 × 0.6) / 10^6.
    assert_eq!(out.value(0), "0.0002242000000008");
}

#[test]
fn bad_prices_and_missing_tokens_give_null() {
    let mut cols = columns(&CASES[..2]);
    cols[4] = Arc::new(StringArray::from(vec!["abc", "1"]));
    cols[0] = Arc::new(UInt64Array::from(vec![Some(1), None]));
    let out = run_plugin(cols);
    assert_eq!(out.len(), 2);
    assert!(out.is_null(0), "a price that is not a number");
    assert!(out.is_null(1), "a NULL token count");
    // Beyond the pricing rule's bounds (a count over 10^9, a price over 10^6): NULL, never
    // a rounded cost.
    assert_eq!(
        tollgate_arroyo_udf::tollgate_cost(4_000_000_000, 0, 0, 0, "1", "1", "1"),
        None
    );
    assert_eq!(
        tollgate_arroyo_udf::tollgate_cost(1, 0, 0, 0, "1000001", "1", "1"),
        None
    );
}

#[test]
fn the_function_itself_agrees() {
    for c in CASES {
        let s = tollgate_arroyo_udf::tollgate_cost(c.0, c.1, c.2, c.3, c.4, c.5, c.6).unwrap();
        assert_eq!(Decimal::from_str(&s).unwrap(), pipeline_cost(c));
    }
}

#[test]
fn the_example_pipeline_parses_and_calls_the_udf() {
    use sqlparser::dialect::GenericDialect;
    use sqlparser::parser::Parser;
    let sql =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipeline.sql"))
            .unwrap();
    let statements = Parser::parse_sql(&GenericDialect {}, &sql).unwrap();
    assert_eq!(statements.len(), 4, "two tables, a view, an insert");
    let text = statements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let call = text.find("tollgate_cost(").expect("the UDF is used");
    // Seven arguments: count the top-level commas of the call.
    let (mut depth, mut commas) = (0, 0);
    for ch in text[call + "tollgate_cost(".len()..].chars() {
        match ch {
            '(' => depth += 1,
            ')' if depth == 0 => break,
            ')' => depth -= 1,
            ',' if depth == 0 => commas += 1,
            _ => {}
        }
    }
    assert_eq!(commas + 1, 7, "tollgate_cost takes seven arguments");
}
