//! Fuzzes the guest output contract (`accrete_proto::output::parse_metrics`): what a guest
//! writes to stdout, checked by workers and again by the server. Never panics; whatever it
//! accepts is finite metrics with names PostgreSQL's jsonb can store.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|output: &[u8]| {
    if let Ok(metrics) = accrete_proto::output::parse_metrics(output) {
        for (name, value) in &metrics {
            assert!(value.is_finite(), "{name}: {value}");
            assert!(!name.contains('\0'));
        }
        // Accepted output was UTF-8 JSON (the server stores it as such).
        assert!(std::str::from_utf8(output).is_ok());
    }
});
