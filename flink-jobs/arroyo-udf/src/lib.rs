//! `tollgate_cost`: Tollgate's pricing rule as an Arroyo UDF, so that an Arroyo pipeline over
//! `llm.completions` bills exactly like the timely pipeline and the Flink SQL job.
//!
//! A thin wrapper: the rule itself is [`tollgate_schemas::pricing::cost`], the function the
//! pipeline's `PriceRow::cost` calls. Arroyo's UDF interface (arroyo-udf-plugin 0.2) has no
//! decimal type, so prices come in and the cost goes out as decimal strings, exact; an Arroyo
//! query casts the result: `CAST(tollgate_cost(...) AS DECIMAL(38, 18))`. A price that is not
//! a decimal number, or a price or count beyond the pricing rule's bounds, gives NULL (never
//! a panic inside the engine).
//!
//! Built with `cargo build --release`, the dynamic library
//! (`target/release/libtollgate_arroyo_udf.so`) exports `__run`, the entry point that
//! `#[udf]` generates; `pipeline.sql` beside this crate is an example Arroyo pipeline using it.

use std::str::FromStr;

use arroyo_udf_plugin::udf;
use rust_decimal::Decimal;
use tollgate_schemas::{TokenUsage, UsageSource};

/// The exact cost of one completion: tokens (input counts every prompt token, cached and
/// cache-written ones included) at prices per million tokens, as a decimal string.
#[udf]
pub fn tollgate_cost(
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_input_tokens: u64,
    output_tokens: u64,
    input_per_mtok: &str,
    cached_input_per_mtok: &str,
    output_per_mtok: &str,
) -> Option<String> {
    let usage = TokenUsage {
        input_tokens,
        cached_input_tokens,
        cache_write_input_tokens,
        output_tokens,
        source: UsageSource::Provider,
    };
    let price = |s: &str| Decimal::from_str(s.trim()).ok();
    let cost = tollgate_schemas::pricing::cost(
        &usage,
        price(input_per_mtok)?,
        price(cached_input_per_mtok)?,
        price(output_per_mtok)?,
    )?;
    Some(cost.to_string())
}
