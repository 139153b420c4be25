//! The accrete guest experiments, built for `wasm32-wasip1` by `build.rs` and embedded here, so
//! worker tests, the CLI demo and integration tests can submit real modules.
//!
//! Each module is a WASI command: JSON input on stdin, the output contract on stdout. The native
//! libraries (`signal_search::run`, `tiny_model::run`, rendered by `accrete_guest`) compute the
//! very bytes each module writes.

/// The SETI-style tone search (`signal-search`).
pub const SIGNAL_SEARCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/signal-search.wasm"));

/// The small-MLP training run (`tiny-model`).
pub const TINY_MODEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny-model.wasm"));

/// Every embedded module with its name.
pub fn all() -> [(&'static str, &'static [u8]); 2] {
    [("signal-search", SIGNAL_SEARCH), ("tiny-model", TINY_MODEL)]
}

/// The module of the given name, if there is one.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    all()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmparser::{ExternalKind, Parser, Payload, TypeRef, Validator};

    /// Each module validates and is a WASI preview 1 command: it imports functions only from
    /// `wasi_snapshot_preview1`, exports `_start` and its memory, and has no start function that
    /// would run before the host could set up fuel and I/O.
    #[test]
    fn modules_are_wasip1_commands() {
        for (name, bytes) in all() {
            Validator::new()
                .validate_all(bytes)
                .unwrap_or_else(|e| panic!("{name}: invalid module: {e}"));
            let mut exports = Vec::new();
            for payload in Parser::new(0).parse_all(bytes) {
                match payload.unwrap() {
                    Payload::ImportSection(section) => {
                        for import in section.into_imports() {
                            let import = import.unwrap();
                            assert_eq!(
                                import.module, "wasi_snapshot_preview1",
                                "{name}: {import:?}"
                            );
                            assert!(matches!(import.ty, TypeRef::Func(_)), "{name}: {import:?}");
                        }
                    }
                    Payload::ExportSection(section) => {
                        for export in section {
                            let export = export.unwrap();
                            exports.push((export.name.to_owned(), export.kind));
                        }
                    }
                    Payload::StartSection { .. } => panic!("{name}: has a start function"),
                    _ => {}
                }
            }
            assert!(
                exports.contains(&("_start".into(), ExternalKind::Func)),
                "{name}: {exports:?}"
            );
            assert!(
                exports.contains(&("memory".into(), ExternalKind::Memory)),
                "{name}: {exports:?}"
            );
        }
    }

    #[test]
    fn names_resolve() {
        assert_eq!(by_name("tiny-model"), Some(TINY_MODEL));
        assert_eq!(by_name("signal-search"), Some(SIGNAL_SEARCH));
        assert_eq!(by_name("nope"), None);
        assert_ne!(SIGNAL_SEARCH, TINY_MODEL);
    }
}
