//! Contracts shared by the gateway, the pipeline and the analytics tables.
//!
//! | item | owns |
//! |---|---|
//! | [`usage`] | token usage as billed: input, cached input, cache writes, output |
//! | [`events`] | the event published per topic (request, chunk, completion), versioned |
//! | `json/` | JSON Schema (draft 2020-12) of each topic's events, tested to match [`events`] |
//! | `migrations/sqlite/` | SQL migrations of the embedded (SQLite) metadata store |

pub mod events;
pub mod usage;

pub use usage::{TokenUsage, UsageSource};
