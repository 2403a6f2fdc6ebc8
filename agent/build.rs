//! Records the target triple the agent is built for, so `ferry plugin
//! precompile` defaults to it and mismatch errors can name it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    println!("cargo:rustc-env=FERRY_BUILD_TARGET={target}");
}
