//! Test support for Tollgate's end-to-end tests and benchmarks.

pub mod load;
pub mod mock_upstream;
