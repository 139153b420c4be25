//! Builds the guest experiments for `wasm32-wasip1` with a nested `cargo build` (the pattern of
//! wasmtime's `crates/test-programs/artifacts/build.rs`) and copies the modules into `OUT_DIR`,
//! where `src/lib.rs` embeds them.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGET: &str = "wasm32-wasip1";
/// Guest packages, each with one binary of the same name.
const GUESTS: [&str; 2] = ["signal-search", "tiny-model"];
/// Directories under `wasm-tasks/` whose contents the guests are built from.
const SOURCES: [&str; 3] = ["guest", "signal-search", "tiny-model"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let tasks_dir = manifest_dir.parent().expect("wasm-tasks/").to_path_buf();
    let workspace = tasks_dir.parent().expect("workspace root").to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    for dir in SOURCES {
        println!(
            "cargo:rerun-if-changed={}",
            tasks_dir.join(dir).join("src").display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            tasks_dir.join(dir).join("Cargo.toml").display()
        );
    }
    // Dependency versions and the workspace's release profile shape the modules too.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.toml").display()
    );

    ensure_target_installed();

    // A target directory of our own: the outer build holds the lock on its own, so sharing it
    // would deadlock, and the outer build's flags must not reach the guests anyway.
    let target_dir = out_dir.join("wasm-target");
    let status = nested_cargo(&workspace)
        .arg("build")
        .arg("--release")
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args(GUESTS.iter().flat_map(|g| ["-p", g]))
        .arg("--bins")
        // Small modules: no debug info or symbol names (the workspace release profile keeps line
        // tables for native backtraces); one codegen unit and LTO for speed under fuel.
        .args(["--config", "profile.release.debug=false"])
        .args(["--config", "profile.release.strip=true"])
        .args(["--config", "profile.release.lto=true"])
        .args(["--config", "profile.release.codegen-units=1"])
        .args(["--config", "profile.release.panic=\"abort\""])
        // Cargo's progress goes to stderr; anything on our stdout would be read as directives.
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .unwrap_or_else(|e| panic!("cannot run the nested cargo build for {TARGET}: {e}"));
    assert!(
        status.success(),
        "the nested `cargo build --target {TARGET}` of the guests failed ({status}); see its output \
         above"
    );

    for guest in GUESTS {
        let built = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{guest}.wasm"));
        let dest = out_dir.join(format!("{guest}.wasm"));
        std::fs::copy(&built, &dest).unwrap_or_else(|e| {
            panic!("cannot copy {} to {}: {e}", built.display(), dest.display())
        });
    }
}

/// A `cargo` command that shares the outer build's toolchain and jobserver but none of its
/// target or flag settings.
fn nested_cargo(workspace: &Path) -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    for var in [
        // Host flags such as `-C target-cpu=native` are wrong for wasm.
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        // We choose the target and target directory.
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        // Set by `cargo clippy` (clippy-driver): it would lint the guests with the outer
        // invocation's arguments. Plain RUSTC_WRAPPER (sccache and the like) is kept: caching
        // wrappers are harmless and make the nested build faster.
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        // Profile settings the outer build was given through the environment.
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_PROFILE_RELEASE_STRIP",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    // Remap absolute paths that panic locations would embed, so the module (and its BLAKE3 hash)
    // does not depend on where the workspace or the cargo home is.
    let mut flags = vec![remap(workspace, "/accrete")];
    // 128-bit SIMD, on in every wasmtime as SSE2 and NEON are on every x86_64 and aarch64
    // worker: LLVM then vectorises the guests' loops as it does natively (the signal-search
    // FFT runs its butterflies two at a time). Vectorising never reorders float operations,
    // and the sandbox canonicalises vector NaNs where their bits can be observed, so the output
    // bytes stay those of the native build (BENCHMARKS.md has what it buys).
    flags.push("-Ctarget-feature=+simd128".into());
    if let Some(home) = cargo_home() {
        flags.push(remap(
            &home.join("registry").join("src"),
            "/cargo/registry/src",
        ));
        flags.push(remap(
            &home.join("git").join("checkouts"),
            "/cargo/git/checkouts",
        ));
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        flags.join(&OsString::from("\x1f")),
    );
    cmd
}

fn remap(from: &Path, to: &str) -> OsString {
    let mut flag = OsString::from("--remap-path-prefix=");
    flag.push(from);
    flag.push("=");
    flag.push(to);
    flag
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
}

/// Installs the wasm target with rustup if the toolchain lacks it, once; panics with the fix
/// if that is impossible.
fn ensure_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let installed = || {
        Command::new(&rustc)
            .args(["--print", "target-libdir", "--target", TARGET])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .is_some_and(|dir| Path::new(&dir).is_dir())
    };
    if installed() {
        return;
    }
    println!("cargo:warning=the {TARGET} target is missing; running `rustup target add {TARGET}`");
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .is_ok_and(|status| status.success());
    if !(added && installed()) {
        panic!(
            "the Rust target {TARGET} is not installed and `rustup target add {TARGET}` failed; \
             run `rustup target add {TARGET}` (it builds the accrete guest experiments) and retry"
        );
    }
}
