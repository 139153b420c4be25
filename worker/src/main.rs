//! `accrete-worker`: the volunteer binary; everything is in `accrete_worker::cli`.

fn main() -> anyhow::Result<()> {
    accrete_worker::cli::main()
}
