//! Where csp-tch runs: device choice and the facts a result needs to be read honestly.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Cuda, Device};

/// Parses `--device`: `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let device = match spec {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => bail!("--device '{spec}' is not one of auto, cpu, cuda, cuda:N"),
        },
    };
    if let Device::Cuda(index) = device {
        let count = Cuda::device_count();
        if index as i64 >= count {
            bail!(
                "--device {spec}: this machine has {count} CUDA device(s) visible to libtorch; \
                 use --device cpu or auto"
            );
        }
    }
    Ok(device)
}

/// Keeps freed tensor memory in the process. glibc hands blocks above an adaptive threshold back to
/// the system when they are freed and trims the top of the heap, so the next batch's tensors of the
/// same sizes come back page fault by page fault: a third of a CPU evaluation of
/// cspdarknet53-pad0 at 32 px went to that. Blocks up to 32 MB (the largest threshold glibc takes)
/// now stay in the heap, and the heap is not trimmed; memory use stays at its peak instead.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        let kept = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1;
        KEEPS_FREED_MEMORY.store(kept, Ordering::Relaxed);
    }
}

static KEEPS_FREED_MEMORY: AtomicBool = AtomicBool::new(false);

/// Whether [`keep_freed_memory`] took effect in this process (`bench --json` reports it).
pub fn keeps_freed_memory() -> bool {
    KEEPS_FREED_MEMORY.load(Ordering::Relaxed)
}

/// Waits until `device` has finished its queued work (a no-op on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
}

/// This process's peak resident memory so far in MB (Linux's VmHWM), when the system tells it.
pub fn peak_resident_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// `cpu` or `cuda:N`.
pub fn device_label(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A human name for the device: the CPU model, or the GPU's name where nvidia-smi tells it.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader", "-i", &i.to_string()])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| format!("CUDA device {i}")),
        _ => std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "CPU".into()),
    }
}

/// Versions and hardware, as `csp-tch env` prints them and comparison.json records them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Environment {
    pub csp_tch: String,
    pub tch: String,
    pub libtorch: String,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_available: bool,
    pub cudnn_version: Option<i64>,
    pub cpu_threads: i32,
    pub cpu: String,
}

impl Environment {
    pub fn detect() -> Self {
        let cudnn = Cuda::cudnn_is_available();
        Environment {
            csp_tch: env!("CARGO_PKG_VERSION").into(),
            tch: env!("CSP_TCH_TCH_VERSION").into(),
            libtorch: env!("CSP_TCH_LIBTORCH_VERSION").into(),
            cuda_available: Cuda::is_available(),
            cuda_devices: Cuda::device_count(),
            cudnn_available: cudnn,
            cudnn_version: cudnn.then(tch::utils::version_cudnn),
            cpu_threads: tch::get_num_threads(),
            cpu: device_name(Device::Cpu),
        }
    }
}

/// Where a run ran (comparison.json's `environment`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunEnvironment {
    pub device: String,
    pub device_name: String,
    /// What forward passes ran in (`--amp`).
    pub precision: crate::config::Precision,
    #[serde(flatten)]
    pub versions: Environment,
    /// The run's peak resident memory so far, in MB (host memory only: libtorch's CUDA allocator is
    /// not visible through tch).
    #[serde(default)]
    pub peak_resident_mb: Option<f64>,
    /// A data-parallel run's backend, world size and each rank's device; absent for one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<ParallelEnvironment>,
}

/// How a data-parallel run ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParallelEnvironment {
    /// `gloo` or `nccl`.
    pub backend: String,
    pub world_size: usize,
    /// Each rank's device (`cuda:0 (NVIDIA H200)`, `cpu`), by rank.
    pub devices: Vec<String>,
    /// `--dist-overlap`: whether the gradient allreduce ran during the backward pass (absent: after it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allreduce_overlapped: bool,
}

impl RunEnvironment {
    pub fn detect(device: Device, precision: crate::config::Precision) -> RunEnvironment {
        RunEnvironment {
            device: device_label(device),
            device_name: device_name(device),
            precision,
            versions: Environment::detect(),
            peak_resident_mb: peak_resident_mb(),
            data_parallel: None,
        }
    }
}
