//! Test support for Tollgate's end-to-end tests and benchmarks.

pub mod harness;
pub mod load;
pub mod mock_upstream;
pub mod process;
