//! Link-time wiring that torch-sys leaves to the final binary:
//! - an rpath to libtorch's lib/ folder, so `csp-tch` runs without LD_LIBRARY_PATH;
//! - `libtorch_cuda` kept as a NEEDED entry with `--no-as-needed`: nothing references its symbols
//!   directly (CUDA kernels register themselves when the library loads), so the default `--as-needed`
//!   would drop it and CUDA would be silently invisible on a GPU box;
//! - `src/amp.cpp` and `src/onednn.cpp`, the few libtorch calls tch does not bind (autocast switches,
//!   oneDNN's inner product), compiled against the same libtorch's headers with torch-sys' flags.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=Cargo.lock");
    // Set by torch-sys (links = "tch") for its direct dependents: the folder it linked against.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from).unwrap_or_else(|_| {
        panic!("torch-sys did not report its libtorch folder; run scripts/setup.sh and build again")
    });
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    compile_shims(&lib);
    println!("cargo:rustc-env=CSP_TCH_LIBTORCH_VERSION={}", libtorch_version(&lib));
    println!("cargo:rustc-env=CSP_TCH_TCH_VERSION={}", locked_version("tch"));
}

/// Builds src/amp.cpp and src/onednn.cpp into a static library linked into csp-tch.
fn compile_shims(lib: &Path) {
    let sources = ["src/amp.cpp", "src/onednn.cpp"];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = lib.parent().unwrap_or(lib);
    // torch-sys' default when LIBTORCH is set; the pip wheels of torch 2.x use the new ABI.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .files(sources)
        .compile("csp_tch_shims");
}

/// The libtorch version: pip's torch/version.py, or build-version in a libtorch zip.
fn libtorch_version(lib: &Path) -> String {
    let root = lib.parent().unwrap_or(lib);
    let from_python = std::fs::read_to_string(root.join("version.py")).ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_string()))
    });
    from_python
        .or_else(|| std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// A dependency's version as Cargo.lock pins it.
fn locked_version(krate: &str) -> String {
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let header = format!("name = \"{krate}\"\nversion = \"");
    lock.find(&header)
        .and_then(|i| lock[i + header.len()..].split('"').next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}
