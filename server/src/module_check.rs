//! Checks an uploaded module before it is stored: valid WebAssembly, a WASI preview 1 command
//! (exports `_start` and a memory), and imports nothing but the allowed WASI functions.

use wasmparser::{Parser, Payload, TypeRef, Validator, WasmFeatures};

/// The WASI preview 1 functions a guest may import. The sandbox gives stdin and stdout only,
/// a virtual clock and seeded randomness; file and socket calls find nothing to act on, but
/// importing sockets is refused outright so a module says plainly that it wants none.
const ALLOWED_WASI: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
];

/// Largest table the workers instantiate (worker/src/sandbox.rs keeps the same number).
const MAX_TABLE_ELEMENTS: u64 = 100_000;

/// Most locals (parameters included) a function may have: wasmparser's limit of 50,000, less
/// the five scratch locals each worker adds to every function when it rewrites the module for
/// its NaN checks and fuel meter (worker/src/sandbox/rewrite.rs).
const MAX_GUEST_LOCALS: u64 = 50_000 - 5;

/// Export names the workers' rewrite gives to what it adds (the fuel meter, worker/src/sandbox/
/// meter.rs); a guest's own export of such a name would collide.
const RESERVED_EXPORT_PREFIX: &str = "__accrete_";

/// Why a module was refused.
pub fn check(wasm: &[u8]) -> Result<(), String> {
    if !wasm.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (bad magic number)".into());
    }
    // Exactly what the workers' engine runs (worker/src/sandbox.rs): the deterministic subset
    // (no threads or shared memory, no relaxed SIMD), and nothing whose resource use depends on
    // the host's allocator (multi-memory, memory64, GC). Anything else would pass here and
    // then fail on every worker.
    let features = WasmFeatures::default()
        & !(WasmFeatures::THREADS
            | WasmFeatures::SHARED_EVERYTHING_THREADS
            | WasmFeatures::RELAXED_SIMD
            | WasmFeatures::MULTI_MEMORY
            | WasmFeatures::MEMORY64
            | WasmFeatures::GC
            | WasmFeatures::COMPONENT_MODEL
            | WasmFeatures::EXCEPTIONS
            | WasmFeatures::LEGACY_EXCEPTIONS
            | WasmFeatures::STACK_SWITCHING
            | WasmFeatures::CUSTOM_PAGE_SIZES
            | WasmFeatures::WIDE_ARITHMETIC);
    Validator::new_with_features(features)
        .validate_all(wasm)
        .map_err(|e| format!("invalid WebAssembly: {e}"))?;
    let (mut start, mut memory) = (false, false);
    // Parameter counts by type, each defined function's type, and how many are imported: to
    // count a body's locals with its parameters.
    let (mut type_params, mut function_types) = (Vec::new(), Vec::new());
    let (mut imported_functions, mut bodies) = (0usize, 0usize);
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| format!("invalid WebAssembly: {e}"))? {
            Payload::Version {
                encoding: wasmparser::Encoding::Component,
                ..
            } => {
                return Err(
                    "components are not supported; build a wasm32-wasip1 command module".into(),
                );
            }
            Payload::TableSection(tables) => {
                for table in tables {
                    let table = table.map_err(|e| format!("invalid WebAssembly: {e}"))?;
                    if table.ty.initial > MAX_TABLE_ELEMENTS {
                        return Err(format!(
                            "a table of {} elements is over the workers' limit of {MAX_TABLE_ELEMENTS}",
                            table.ty.initial
                        ));
                    }
                }
            }
            Payload::TypeSection(types) => {
                for ty in types.into_iter_err_on_gc_types() {
                    let ty = ty.map_err(|e| format!("invalid WebAssembly: {e}"))?;
                    type_params.push(ty.params().len() as u64);
                }
            }
            Payload::FunctionSection(functions) => {
                for ty in functions {
                    function_types.push(ty.map_err(|e| format!("invalid WebAssembly: {e}"))?);
                }
            }
            Payload::CodeSectionEntry(body) => {
                let ty = function_types.get(bodies).copied().unwrap_or_default();
                let mut locals = type_params.get(ty as usize).copied().unwrap_or_default();
                for pair in body
                    .get_locals_reader()
                    .map_err(|e| format!("invalid WebAssembly: {e}"))?
                {
                    locals += u64::from(pair.map_err(|e| format!("invalid WebAssembly: {e}"))?.0);
                }
                if locals > MAX_GUEST_LOCALS {
                    return Err(format!(
                        "function {} has {locals} locals and parameters; the workers' limit is \
                         {MAX_GUEST_LOCALS}",
                        imported_functions + bodies
                    ));
                }
                bodies += 1;
            }
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import.map_err(|e| format!("invalid WebAssembly: {e}"))?;
                    if matches!(import.ty, TypeRef::Func(_)) {
                        imported_functions += 1;
                    }
                    if import.module != "wasi_snapshot_preview1" {
                        return Err(format!(
                            "imports {}::{}; only wasi_snapshot_preview1 is available",
                            import.module, import.name
                        ));
                    }
                    if !matches!(import.ty, TypeRef::Func(_))
                        || !ALLOWED_WASI.contains(&import.name)
                    {
                        return Err(format!(
                            "imports wasi_snapshot_preview1::{}, which the sandbox does not allow",
                            import.name
                        ));
                    }
                }
            }
            Payload::ExportSection(exports) => {
                for export in exports {
                    let export = export.map_err(|e| format!("invalid WebAssembly: {e}"))?;
                    match (export.name, export.kind) {
                        ("_start", wasmparser::ExternalKind::Func) => start = true,
                        ("memory", wasmparser::ExternalKind::Memory) => memory = true,
                        (name, _) if name.starts_with(RESERVED_EXPORT_PREFIX) => {
                            return Err(format!(
                                "exports {name:?}: names starting with {RESERVED_EXPORT_PREFIX} \
                                 are reserved for the workers' sandbox"
                            ));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !start {
        return Err("no exported _start function: build a WASI command module".into());
    }
    if !memory {
        return Err("no exported memory".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    fn wat(src: &str) -> Vec<u8> {
        wat::parse_str(src).unwrap()
    }

    #[test]
    fn accepts_a_command_module() {
        let m = wat(r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")))"#);
        assert_eq!(check(&m), Ok(()));
    }

    #[test]
    fn refuses_what_is_not_an_allowed_command_module() {
        assert!(check(b"hello").unwrap_err().contains("not a WebAssembly"));
        assert!(
            check(b"\0asm\x01\0\0\0\x99")
                .unwrap_err()
                .contains("invalid")
        );
        let env = wat(
            r#"(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
        );
        assert!(check(&env).unwrap_err().contains("env::f"));
        let sock = wat(
            r#"(module (import "wasi_snapshot_preview1" "sock_accept" (func (param i32 i32 i32) (result i32)))
            (memory (export "memory") 1) (func (export "_start")))"#,
        );
        assert!(check(&sock).unwrap_err().contains("sock_accept"));
        let two_memories =
            wat(r#"(module (memory (export "memory") 1) (memory 1) (func (export "_start")))"#);
        assert!(check(&two_memories).unwrap_err().contains("invalid"));
        let big_table = wat(
            r#"(module (table 200000 funcref) (memory (export "memory") 1) (func (export "_start")))"#,
        );
        assert!(check(&big_table).unwrap_err().contains("table"));
        let lib = wat(r#"(module (memory (export "memory") 1) (func (export "f")))"#);
        assert!(check(&lib).unwrap_err().contains("_start"));
        let reserved = wat(
            r#"(module (memory (export "memory") 1) (func (export "_start")) (global (export "__accrete_fuel") i64 (i64.const 0)))"#,
        );
        assert!(check(&reserved).unwrap_err().contains("__accrete_fuel"));
    }

    /// A module with `_start` and a function with `params` parameters and `locals` locals.
    fn with_locals(params: usize, locals: usize) -> Vec<u8> {
        wat(&format!(
            r#"(module (memory (export "memory") 1) (func (export "_start"))
                 (func (param {}) (local {})))"#,
            "i32 ".repeat(params),
            "f64 ".repeat(locals)
        ))
    }

    #[test]
    fn refuses_a_function_with_no_room_for_the_workers_scratch_locals() {
        // 49,995 in all is the most a worker can add its five to.
        assert_eq!(check(&with_locals(5, 49_990)), Ok(()));
        let err = check(&with_locals(6, 49_990)).unwrap_err();
        assert!(err.contains("function 1 has 49996 locals"), "{err}");
    }
}
