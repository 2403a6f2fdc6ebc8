//! The agent under test: exactly the `ferry` binary's entry point, built as
//! part of this package so integration tests get it from cargo directly.

fn main() -> std::process::ExitCode {
    ferry::cli::main()
}
