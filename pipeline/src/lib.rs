//! Tollgate's billing pipeline: completion events in; an exactly-once ledger, live balances
//! and analytics tables out.
//!
//! | module | owns |
//! |---|---|
//! | [`fact`] | what flows through the dataflow: facts, priced facts, the [`fact::Totals`] monoid |
//! | [`source`] | reading partitions: Kafka, the gateway's local log, memory (tests, benchmarks) |
//! | [`dataflow`] | the timely/differential dataflow and the worker loop that drives it |
//! | [`sink`] | ledger (PostgreSQL, SQLite), balances (Redis, memory), analytics (ClickHouse) |
//! | [`config`] | what to read and where to write, from flags or the gateway's config |

pub mod fact;
pub mod sink;
