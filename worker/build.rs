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
//! `cfg(alignflow_c10d)` when it did; and, where the CUDA and NCCL headers
//! are, the NCCL group (`cfg(alignflow_nccl)`) and the CUDA allocator's peak
//! (`cfg(alignflow_cuda_memory)`, see `cuda_memory`).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(alignflow_onednn)");
    println!("cargo::rustc-check-cfg=cfg(alignflow_c10d)");
    println!("cargo::rustc-check-cfg=cfg(alignflow_nccl)");
    println!("cargo::rustc-check-cfg=cfg(alignflow_cuda_memory)");
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
    println!("cargo:rerun-if-changed=csrc/collectives.h");
    let sources = [
        "csrc/onednn_linear.cpp",
        "csrc/checkpoint.cpp",
        "csrc/collectives.cpp",
        "csrc/widened_linear.cpp",
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
    torch_cpp(&include)
        .files(sources)
        // The gloo headers torch's ProcessGroupGloo.hpp includes (the wheel
        // lacks them; see csrc/collectives.cpp), and the define torch's own
        // build sets for that header to declare anything.
        .include("csrc/third_party/gloo")
        .define("USE_C10D_GLOO", None)
        .compile("alignflow_csrc");
    println!("cargo:rustc-cfg=alignflow_onednn");
    println!("cargo:rustc-cfg=alignflow_c10d");
    compile_nccl(root, &include);
}

/// The NCCL group (`csrc/nccl.cpp`) and the CUDA allocator's peak
/// (`csrc/cuda_memory.cpp`), against the CUDA and NCCL headers of the
/// wheels next to torch (`nvidia/cu13`, `nvidia/nccl`): skipped, with a
/// warning, where they are missing (GPU data parallelism then says so, and
/// GPU peaks are not reported).
fn compile_nccl(root: &Path, include: &Path) {
    println!("cargo:rerun-if-changed=csrc/nccl.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    // `root` is site-packages/torch: the nvidia wheels are beside it.
    let Some(site) = root.parent() else { return };
    let cuda = site.join("nvidia/cu13/include");
    let nccl = site.join("nvidia/nccl/include");
    let needed = [
        cuda.join("cuda_runtime_api.h"),
        cuda.join("crt/host_config.h"),
        cuda.join("cccl/nv/target"),
        nccl.join("nccl.h"),
    ];
    // Cargo reruns this script when a listed file appears (`make setup`
    // installing the headers after a first build).
    for path in &needed {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if let Some(missing) = needed.iter().find(|p| !p.exists()) {
        println!(
            "cargo:warning=no {}: the worker is built without NCCL (`make setup` installs the CUDA headers)",
            missing.display()
        );
        return;
    }
    torch_cpp(include)
        .files(["csrc/nccl.cpp", "csrc/cuda_memory.cpp"])
        .include(&cuda)
        .include(cuda.join("cccl"))
        .include(&nccl)
        .define("USE_C10D_NCCL", None)
        .compile("alignflow_nccl");
    // The allocator's statistics live in libc10_cuda, which libtorch_cuda
    // loads but the linker does not pass on.
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=alignflow_nccl");
    println!("cargo:rustc-cfg=alignflow_cuda_memory");
}

/// A C++ build against torch's headers under `include`, with the settings
/// every shim source needs (C++17, the new C++ ABI torch's wheels use).
fn torch_cpp(include: &Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false);
    build
}
