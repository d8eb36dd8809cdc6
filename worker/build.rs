//! Links the worker against the libtorch that `tch` was built with and makes
//! it runnable without `LD_LIBRARY_PATH`: an rpath to torch's `lib` folder,
//! and `libtorch_cuda` kept linked (the default `--as-needed` drops it, and
//! CUDA then silently reports unavailable). Only the worker gets these flags:
//! the engine binary `alignflow` must not link libtorch at all.
//!
//! Also compiles `csrc/` against torch's headers (oneDNN linear layers with
//! pre-packed weights for decoding, see `model::onednn`; activation
//! checkpointing, see `model::recompute`; c10d collectives for data-parallel
//! training, see `dist`) and sets `cfg(alignflow_onednn)` and
//! `cfg(alignflow_c10d)` when it did.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(alignflow_onednn)");
    println!("cargo::rustc-check-cfg=cfg(alignflow_c10d)");
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
    compile_shim(&root);
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

/// The C++ shim, against the headers of the libtorch tch links (the new C++
/// ABI, as torch's own wheels since 2.7).
fn compile_shim(root: &Path) {
    let sources = [
        "csrc/onednn_linear.cpp",
        "csrc/checkpoint.cpp",
        "csrc/collectives.cpp",
    ];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-changed=csrc/third_party/gloo");
    let include = root.join("include");
    if !include.join("ATen/core/dispatch/Dispatcher.h").exists() {
        println!(
            "cargo:warning=no torch headers under {}: decoding uses libtorch's plain linear",
            include.display()
        );
        return;
    }
    cc::Build::new()
        .cpp(true)
        .files(sources)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The gloo headers torch's ProcessGroupGloo.hpp includes (the wheel
        // lacks them; see csrc/collectives.cpp), and the define torch's own
        // build sets for that header to declare anything.
        .include("csrc/third_party/gloo")
        .define("USE_C10D_GLOO", None)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("alignflow_csrc");
    println!("cargo:rustc-cfg=alignflow_onednn");
    println!("cargo:rustc-cfg=alignflow_c10d");
}
