//! The billing dataflow: Kafka (or the embedded event log) in; ledger, balances and analytics out.
//!
//! Not built yet: it arrives with the issue "Exactly-once billing pipeline on
//! timely/differential dataflow". The crate exists so that the workspace shows the data flow.
