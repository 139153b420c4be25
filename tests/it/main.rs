//! Integration tests on real parts: a fresh PostgreSQL database per test, the server over real
//! gRPC sockets, and workers running the real wasmtime sandbox (in-process or as processes).

mod auth;
mod bad_input;
mod cross_arch;
mod devdb;
mod e2e;
mod faults;
mod ledger;
mod ops;
mod plans;
mod scale_out;
mod sim;
mod trust;
mod validation;
mod worker_loop;

use std::time::Duration;

use accrete_tests::{Binaries, v1 as pb};

pub const BINS: Binaries = Binaries {
    server: env!("CARGO_BIN_EXE_it-server"),
    worker: env!("CARGO_BIN_EXE_it-worker"),
};

/// Generous for a 2-core CI machine running tests in parallel.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// An honest worker's successful result: the output and its true hash.
pub fn success(replica_id: u64, output: &[u8]) -> pb::ReplicaResult {
    pb::ReplicaResult {
        replica_id,
        outcome: Some(pb::replica_result::Outcome::Success(pb::Success {
            output: output.to_vec(),
            output_hash: blake3::hash(output).as_bytes().to_vec(),
            fuel_used: 1,
        })),
        wall_micros: 1,
    }
}

pub fn policy(min_quorum: u32) -> pb::ReplicationPolicy {
    pb::ReplicationPolicy {
        min_quorum,
        delay_bound_secs: 60,
        ..Default::default()
    }
}

pub fn bounds() -> pb::ResourceBounds {
    pb::ResourceBounds::default()
}

/// Tiny-model inputs that differ in their hyperparameters, `steps` SGD steps each.
pub fn tiny_model_inputs(n: usize, steps: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let lr = [0.01, 0.03, 0.1, 0.3, 1.0][i % 5];
            let hidden = [0, 4, 8, 16][i / 5 % 4];
            serde_json::json!({ "seed": i as u64 % 5, "lr": lr, "hidden": hidden, "steps": steps })
                .to_string()
                .into_bytes()
        })
        .collect()
}

/// What the guest computes, computed natively from the same library.
pub fn native_tiny_model(input: &[u8]) -> Vec<u8> {
    accrete_guest::execute(input, tiny_model::run).unwrap()
}

pub fn native_signal_search(input: &[u8]) -> Vec<u8> {
    accrete_guest::execute(input, signal_search::run).unwrap()
}

/// Counts rows for a query returning one bigint.
pub async fn count(app: &accrete_tests::TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}
