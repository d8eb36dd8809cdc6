//! Links the worker against the libtorch that `tch` was built with and makes
//! it runnable without `LD_LIBRARY_PATH`: an rpath to torch's `lib` folder,
//! and `libtorch_cuda` kept linked (the default `--as-needed` drops it, and
//! CUDA then silently reports unavailable). Only the worker gets these flags:
//! the engine binary `alignflow` must not link libtorch at all.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(root) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("cargo:warning=LIBTORCH is not set; run `make build` to set up .venv");
        return;
    };
    let root = root.canonicalize().unwrap_or(root);
    // Recorded for `alignflow doctor`: the version of the libtorch linked.
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix("__version__ = ")) {
            println!(
                "cargo:rustc-env=ALIGNFLOW_LIBTORCH_VERSION={}",
                v.trim_matches(|c| c == '\'' || c == '"')
            );
        }
    }
    let lib = root.join("lib");
    println!("cargo:rerun-if-changed={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:rustc-link-arg-bin=alignflow-worker=-Wl,--no-as-needed,-ltorch_cuda,--as-needed"
        );
        println!("cargo:rustc-link-arg-tests=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:rustc-link-arg-benches=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
