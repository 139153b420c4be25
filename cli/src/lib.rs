//! The accrete command line as a library: sweep specs, the research/ledger client with its
//! printing, and the self-contained demo.
//!
//! Layout: `sweep` (parse and expand sweep files), `client` (API calls, tables, JSON),
//! `demo` (database, server, workers and a sweep in one process).

pub mod client;
pub mod demo;
pub mod sweep;
