//! The `accrete-worker` command line under another name, so integration tests can run it as a process.

fn main() -> anyhow::Result<()> {
    accrete_worker::cli::main()
}
