//! The accrete command line as a library: sweep specs, the research/ledger client with its
//! printing, and the self-contained demo.
//!
//! Layout: `sweep` (parse and expand sweep files), `client` (API calls, tables, JSON),
//! `demo` (database, server, workers and a sweep in one process), `ledger` (verify and export
//! the hash chain), `report` (a study's Validated Findings Report in Markdown).

pub mod client;
pub mod demo;
pub mod ledger;
pub mod report;
pub mod sweep;
