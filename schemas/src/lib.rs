//! Contracts shared by the gateway, the pipeline and the analytics tables.
//!
//! | item | owns |
//! |---|---|
//! | [`usage`] | token usage as billed: input, cached input, cache writes, output |
//! | [`pricing`] | the effective-dated price book: which price applies, and what a completion costs |
//! | [`events`] | the event published per topic (request, chunk, completion), versioned |
//! | `json/` | JSON Schema (draft 2020-12) of each topic's events, tested to match [`events`] |
//! | `migrations/sqlite/` | SQL migrations of the embedded (SQLite) metadata store and ledger |
//! | `migrations/postgres/` | SQL migrations of the PostgreSQL metadata store and ledger |
//! | `clickhouse/` | ClickHouse DDL of the analytics tables (18.16 and modern) |

pub mod events;
pub mod pricing;
pub mod usage;

pub use usage::{TokenUsage, UsageSource};
