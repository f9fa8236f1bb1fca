//! Link-time wiring that torch-sys leaves to the final binary:
//! - an rpath to libtorch's lib/ folder, so `csp-tch` runs without LD_LIBRARY_PATH;
//! - `libtorch_cuda` kept as a NEEDED entry with `--no-as-needed`: nothing references its symbols
//!   directly (CUDA kernels register themselves when the library loads), so the default `--as-needed`
//!   would drop it and CUDA would be silently invisible on a GPU box;
//! - `src/native/*.cpp`, the few libtorch calls tch does not bind (autocast switches, oneDNN's inner product,
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
    let graphs = if cuda { cuda_graph_headers(&lib) } else { Err("libtorch has no CUDA".to_string()) };
    if let (true, Err(why)) = (cuda, &graphs) {
        println!("cargo:warning=csp-tch is built without CUDA graphs: {why}");
    }
    // What `csp-tch env` says, and the error of `--cuda-graphs on`, when graphs are missing.
    println!("cargo:rustc-env=CSP_TCH_NO_GRAPHS_REASON={}", graphs.as_ref().err().map_or("", String::as_str));
    compile_shims(&lib, &graphs);
    if graphs.is_ok() {
        // CUDA streams and guards used by src/native/cuda_graph.cpp.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-env=CSP_TCH_LIBTORCH_VERSION={}", libtorch_version(&lib));
    println!("cargo:rustc-env=CSP_TCH_TCH_VERSION={}", locked_version("tch"));
}

/// The CUDA graph shim's headers and libtorch's CUDA version, or why they are not to be had.
struct GraphHeaders {
    folders: Vec<PathBuf>,
    /// `CUDA_VERSION` of libtorch's CUDA (13000 for 13.0).
    torch_cuda_version: u32,
    /// The folder of `nccl.h` (the `nvidia-nccl` wheel torch depends on), for c10d's NCCL process group.
    nccl: Option<PathBuf>,
}

/// The headers for libtorch `lib`'s CUDA graphs: CUDA runtime headers of libtorch's own CUDA major
/// version, at least its minor one (`at::cuda::CUDAGraph`'s fields depend on `CUDA_VERSION`, so other
/// headers would give csp-tch another layout of the object than libtorch's code writes into).
fn cuda_graph_headers(lib: &Path) -> Result<GraphHeaders, String> {
    let torch_cuda_version = torch_cuda_version(lib).ok_or_else(|| {
        format!("cannot tell libtorch's CUDA version (version.py or build-version in {})", lib.display())
    })?;
    let folders = cuda_runtime_headers(lib, torch_cuda_version).ok_or_else(|| {
        format!(
            "no CUDA {}.{} runtime headers (cuda.h, cuda_runtime_api.h, crt/) beside libtorch, in its venv or \
             $CUDA_HOME; run scripts/setup.sh",
            torch_cuda_version / 1000,
            torch_cuda_version % 1000 / 10
        )
    })?;
    // c10d's NCCL header includes cuda_fp16.h, which wants CCCL's <nv/target> (nvidia-cuda-cccl).
    let cccl = folders.iter().any(|dir| dir.join("nv/target").exists());
    Ok(GraphHeaders { nccl: nccl_headers(lib).filter(|_| cccl), folders, torch_cuda_version })
}

/// The folder of `nccl.h` for libtorch `lib`: the `nvidia-nccl` wheel beside it (the NCCL it links;
/// `ncclConfig_t`, which c10d's options embed, must have its layout), else `$CUDA_HOME/include`.
fn nccl_headers(lib: &Path) -> Option<PathBuf> {
    let wheel = lib.parent().and_then(Path::parent).map(|site_packages| site_packages.join("nvidia/nccl/include"));
    let toolkit = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    wheel.into_iter().chain(toolkit).find(|dir| dir.join("nccl.h").exists())
}

/// libtorch's CUDA version as `CUDA_VERSION` writes it: pip's `cuda = '13.0'` in torch/version.py,
/// or the `+cu130` of a libtorch zip's build-version.
fn torch_cuda_version(lib: &Path) -> Option<u32> {
    let root = lib.parent().unwrap_or(lib);
    let from_python = std::fs::read_to_string(root.join("version.py")).ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("cuda"))?;
        let value = line.split(['\'', '"']).nth(1)?;
        let (major, minor) = value.split_once('.')?;
        Some(major.parse::<u32>().ok()? * 1000 + minor.parse::<u32>().ok()? * 10)
    });
    let from_zip = || {
        let text = std::fs::read_to_string(root.join("build-version")).ok()?;
        let cu = text.trim().split("+cu").nth(1)?;
        let digits: u32 = cu.parse().ok()?; // 130 for 13.0, 124 for 12.4
        Some(digits / 10 * 1000 + digits % 10 * 10)
    };
    from_python.or_else(from_zip)
}

/// `CUDA_VERSION` as defined in `folder/cuda.h`.
fn header_cuda_version(folder: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(folder.join("cuda.h")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("#define CUDA_VERSION ")).and_then(|v| v.trim().parse().ok())
}

/// Include folders for the CUDA runtime's headers, for a libtorch with CUDA `version`: `cuda.h` and
/// `cuda_runtime_api.h` of that major version and at least that minor one, and the `crt/` headers
/// they include. PyPI's torch wheels bring the first two under `site-packages/nvidia/<cuda>/include`
/// and the third comes from `nvidia-cuda-crt`, which scripts/setup.sh installs into its venv (also
/// looked for there, so that a build against another torch, as for the GPU machine, finds it); a
/// CUDA toolkit has all under `$CUDA_HOME/include`, looked at last. `None` when any is missing.
fn cuda_runtime_headers(lib: &Path, version: u32) -> Option<Vec<PathBuf>> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CSP_TCH_TORCH_HOME");
    let wheel_includes = |site_packages: &Path| -> Vec<PathBuf> {
        let entries = std::fs::read_dir(site_packages.join("nvidia")).into_iter().flatten().flatten();
        entries.map(|entry| entry.path().join("include")).collect()
    };
    let mut folders: Vec<PathBuf> = Vec::new();
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
    folders.extend(std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")));
    let matches = |dir: &&PathBuf| {
        header_cuda_version(dir).is_some_and(|v| v / 1000 == version / 1000 && v >= version)
            && dir.join("cuda_runtime_api.h").exists()
    };
    let runtime = folders.iter().find(matches)?;
    let crt = folders.iter().find(|dir| dir.join("crt/host_config.h").exists())?;
    Some(if runtime == crt { vec![runtime.clone()] } else { vec![runtime.clone(), crt.clone()] })
}

/// Builds the shims into a static library linked into csp-tch.
fn compile_shims(lib: &Path, graphs: &Result<GraphHeaders, String>) {
    let sources = [
        "src/native/shim.cpp",
        "src/native/amp.cpp",
        "src/native/onednn.cpp",
        "src/native/fused_optim.cpp",
        "src/native/cuda_graph.cpp",
        "src/native/distributed.cpp",
    ];
    for source in sources.iter().chain(&["src/native/shim.h"]) {
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
        // The C++ frontend's headers, which c10d's include.
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        // c10d's Gloo process group, against the gloo headers vendored beside the shim.
        .include("src/native/third_party/gloo")
        .define("USE_C10D_GLOO", None)
        .files(sources);
    match graphs {
        Ok(headers) => {
            build
                .includes(&headers.folders)
                .define("CSP_TCH_CUDA", None)
                .define("CSP_TCH_TORCH_CUDA_VERSION", headers.torch_cuda_version.to_string().as_str());
            match &headers.nccl {
                Some(folder) => {
                    build.include(folder).define("USE_C10D_NCCL", None).define("CSP_TCH_NCCL", None);
                }
                None => println!(
                    "cargo:warning=csp-tch is built without NCCL (data-parallel runs use Gloo): no nccl.h beside \
                     libtorch, or no CCCL headers (nv/target) beside CUDA's; run scripts/setup.sh"
                ),
            }
        }
        Err(why) => {
            build.define("CSP_TCH_NO_GRAPHS_REASON", format!("{why:?}").as_str());
        }
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
