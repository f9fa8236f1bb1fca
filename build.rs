//! Link-time wiring that torch-sys leaves to the final binary:
//! - an rpath to libtorch's lib/ folder, so `csp-tch` runs without LD_LIBRARY_PATH;
//! - `libtorch_cuda` kept as a NEEDED entry with `--no-as-needed`: nothing references its symbols
//!   directly (CUDA kernels register themselves when the library loads), so the default `--as-needed`
//!   would drop it and CUDA would be silently invisible on a GPU box;
//! - `src/*.cpp`, the few libtorch calls tch does not bind (autocast switches, oneDNN's inner product,
//!   fused Adam, CUDA graphs), compiled against the same libtorch's headers with torch-sys' flags; CUDA
//!   graphs only where libtorch has CUDA and the CUDA runtime's headers are at hand (PyPI's wheels
//!   ship them beside torch, under `nvidia/*/include`).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=Cargo.lock");
    // Set by torch-sys (links = "tch") for its direct dependents: the folder it linked against.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from).unwrap_or_else(|_| {
        panic!("torch-sys did not report its libtorch folder; run scripts/setup.sh and build again")
    });
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let cuda = lib.join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let cuda_headers = if cuda { cuda_runtime_headers(&lib) } else { None };
    if cuda && cuda_headers.is_none() {
        println!(
            "cargo:warning=libtorch has CUDA but the CUDA runtime headers (cuda_runtime_api.h, crt/) are \
             missing: csp-tch is built without CUDA graphs; run scripts/setup.sh or set CUDA_HOME"
        );
    }
    compile_shims(&lib, cuda_headers.as_deref());
    if cuda_headers.is_some() {
        // CUDA streams and guards used by src/cuda_graph.cpp.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-env=CSP_TCH_LIBTORCH_VERSION={}", libtorch_version(&lib));
    println!("cargo:rustc-env=CSP_TCH_TCH_VERSION={}", locked_version("tch"));
}

/// Include folders for the CUDA runtime's headers, for a libtorch with CUDA: `cuda_runtime_api.h`
/// and the `crt/` headers it includes. A CUDA toolkit has both under `$CUDA_HOME/include`; PyPI's
/// torch wheels bring the first under `site-packages/nvidia/<cuda>/include` and the second comes from
/// `nvidia-cuda-crt`, which scripts/setup.sh installs into its venv (also looked for there, so that a
/// build against another torch, as for the GPU machine, finds it). `None` when either is missing.
fn cuda_runtime_headers(lib: &Path) -> Option<Vec<PathBuf>> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CSP_TCH_TORCH_HOME");
    let wheel_includes = |site_packages: &Path| -> Vec<PathBuf> {
        let entries = std::fs::read_dir(site_packages.join("nvidia")).into_iter().flatten().flatten();
        entries.map(|entry| entry.path().join("include")).collect()
    };
    let mut folders: Vec<PathBuf> =
        std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")).into_iter().collect();
    if let Some(site_packages) = lib.parent().and_then(Path::parent) {
        folders.extend(wheel_includes(site_packages));
    }
    let setup_home = std::env::var_os("CSP_TCH_TORCH_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/csp-tch")));
    let setup_lib = setup_home.map(|home| home.join("venv/lib")).and_then(|lib| std::fs::read_dir(lib).ok());
    for python in setup_lib.into_iter().flatten().flatten() {
        folders.extend(wheel_includes(&python.path().join("site-packages")));
    }
    let runtime = folders.iter().find(|dir| dir.join("cuda_runtime_api.h").exists())?;
    let crt = folders.iter().find(|dir| dir.join("crt/host_config.h").exists())?;
    Some(if runtime == crt { vec![runtime.clone()] } else { vec![runtime.clone(), crt.clone()] })
}

/// Builds the shims into a static library linked into csp-tch.
fn compile_shims(lib: &Path, cuda_headers: Option<&[PathBuf]>) {
    let sources = ["src/amp.cpp", "src/onednn.cpp", "src/fused_adam.cpp", "src/cuda_graph.cpp"];
    for source in sources.iter().chain(&["src/shim.h"]) {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = lib.parent().unwrap_or(lib);
    // torch-sys' default when LIBTORCH is set; the pip wheels of torch 2.x use the new ABI.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .files(sources);
    if let Some(headers) = cuda_headers {
        build.includes(headers).define("CSP_TCH_CUDA", None);
    }
    build.compile("csp_tch_shims");
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
