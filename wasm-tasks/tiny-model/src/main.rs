//! The `tiny-model` guest: JSON [`tiny_model::Input`] on stdin, metrics on stdout.

fn main() {
    accrete_guest::run(tiny_model::run)
}
