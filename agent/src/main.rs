//! The `ferry` binary. Everything, argument parsing included, lives in the
//! library (`ferry::cli::main`), so tests can build the same entry point.

fn main() -> std::process::ExitCode {
    ferry::cli::main()
}
