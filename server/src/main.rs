//! `accrete-server`: the scheduler binary; everything is in `accrete_server::cli`.

fn main() -> anyhow::Result<()> {
    accrete_server::cli::main()
}
