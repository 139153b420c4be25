//! The `signal-search` guest: JSON [`signal_search::Input`] on stdin, metrics on stdout.

fn main() {
    accrete_guest::run(signal_search::run)
}
