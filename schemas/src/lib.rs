//! Contracts shared by the gateway, the pipeline and the analytics tables.
//!
//! | item | owns |
//! |---|---|
//! | [`usage`] | token usage as billed: input, cached input, cache writes, output |
//! | `migrations/sqlite/` | SQL migrations of the embedded (SQLite) metadata store |

pub mod usage;

pub use usage::{TokenUsage, UsageSource};
