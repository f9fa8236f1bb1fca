//! `--cuda-graphs` without a GPU: the graph shim is compiled wherever libtorch has CUDA (build.rs
//! finds the CUDA runtime headers that scripts/setup.sh installs), a capture needs a CUDA device, and
//! on the CPU every setting of the flag resolves to eager steps. (That a CPU run's results do not
//! change with it is in run_all.rs.)

mod common;

use csp_tch::amp::Precision;
use csp_tch::config::CudaGraphs;
use csp_tch::cuda_graph::{built_with_cuda_graphs, Graph};
use std::path::Path;
use tch::Device;

#[test]
fn the_graph_shim_is_built_wherever_libtorch_has_cuda() {
    let libtorch = std::env::var("LIBTORCH").expect("LIBTORCH: scripts/setup.sh writes it into .cargo/config.toml");
    let has_cuda = Path::new(&libtorch).join("lib/libtorch_cuda.so").exists();
    assert_eq!(built_with_cuda_graphs(), has_cuda, "libtorch at {libtorch}, with CUDA: {has_cuda}");
}

#[test]
fn a_capture_needs_a_cuda_device() {
    let err = Graph::capture(Device::Cpu, None, || panic!("nothing is recorded on the CPU")).err().unwrap();
    assert!(err.to_string().contains("CUDA graphs need a CUDA device"), "{err}");
}

#[test]
fn on_the_cpu_every_setting_runs_eagerly() {
    for setting in [CudaGraphs::Auto, CudaGraphs::On, CudaGraphs::Off] {
        for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
            assert!(!setting.resolve(Device::Cpu, precision).unwrap(), "{setting:?} {precision:?}");
        }
    }
}

#[test]
fn check_graphs_compares_two_runs_from_the_same_start() {
    let out =
        common::csp_tch(&["check-graphs", "--model", "cspdarknet53-pad0", "--device", "cpu", "--steps", "5", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // On the CPU both runs are eager: the same start and batches give the same numbers to the bit.
    assert_eq!(check["replayed"], false);
    let losses = check["eager_losses"].as_array().unwrap();
    assert_eq!(losses.len(), 5);
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    assert_eq!(check["graph_losses"], check["eager_losses"]);
    assert_eq!(check["max_state_difference"], 0.0);
    assert_eq!(check["ok"], true);
}
