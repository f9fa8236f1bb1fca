//! `--cuda-graphs` without a GPU: the graph shim is compiled wherever libtorch has CUDA (build.rs
//! finds CUDA headers of libtorch's CUDA version, which scripts/setup.sh installs), its errors come
//! back as messages, a capture needs a CUDA device, and the fallback rules hold, shown with the
//! test-only stand-in `CSP_TCH_SIMULATE_CUDA_GRAPHS` (a "recording" that keeps the index buffer and
//! "replays" that run the step on it, failing where told). The in-process replayer rules, which
//! change process-wide state, are in graph_fallback.rs.

mod common;

use common::read_json;
use csp_tch::config::CudaGraphs;
use csp_tch::config::Precision;
use csp_tch::train::cuda_graph::GraphPlan;
use csp_tch::train::cuda_graph::{self, built_with_cuda_graphs, MemoryPool};
use std::path::Path;
use tch::Device;

const SIMULATE: &str = "CSP_TCH_SIMULATE_CUDA_GRAPHS";

#[test]
fn the_graph_shim_is_built_wherever_libtorch_has_cuda() {
    let libtorch = std::env::var("LIBTORCH").expect("LIBTORCH: scripts/setup.sh writes it into .cargo/config.toml");
    let has_cuda = Path::new(&libtorch).join("lib/libtorch_cuda.so").exists();
    assert_eq!(built_with_cuda_graphs(), has_cuda, "libtorch at {libtorch}, with CUDA: {has_cuda}");
    assert_eq!(cuda_graph::MISSING_REASON.is_empty(), has_cuda, "{}", cuda_graph::MISSING_REASON);
}

#[test]
fn a_capture_needs_a_cuda_device() {
    let err = MemoryPool::new(Device::Cpu).err().unwrap();
    assert!(err.to_string().contains("CUDA graphs need a CUDA device"), "{err}");
}

#[test]
fn the_shim_reports_libtorch_errors_as_messages() {
    // With a CUDA libtorch and no GPU, every graph call fails inside libtorch: the error must come
    // back through the shim's error channel with libtorch's own words, not as a panic or a bare -1.
    if tch::Cuda::is_available() {
        assert!(cuda_graph::synchronize(Device::Cuda(0)).is_ok());
        return;
    }
    for (what, err) in [
        ("synchronize", cuda_graph::synchronize(Device::Cuda(0)).err().unwrap()),
        ("pool", MemoryPool::new(Device::Cuda(0)).err().unwrap()),
    ] {
        let message = format!("{err:#}");
        let (_, from_libtorch) = message.split_once(": ").unwrap();
        assert!(from_libtorch.len() > 10, "{what}: {message}");
        assert!(!from_libtorch.contains("unknown C++ exception"), "{what}: {message}");
    }
}

#[test]
fn on_the_cpu_every_setting_runs_eagerly_and_says_why() {
    for setting in [CudaGraphs::Auto, CudaGraphs::On, CudaGraphs::Off] {
        for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
            let plan = cuda_graph::plan(setting, Device::Cpu, precision, None).unwrap();
            let GraphPlan::Eager(why) = plan else { panic!("{setting:?} {precision:?}: {plan:?}") };
            let expected = if setting == CudaGraphs::Off { "--cuda-graphs off" } else { "not a CUDA device" };
            assert_eq!(why, expected);
        }
    }
}

/// A two-epoch run of cspdarknet53-pad0 and cspresnet50 on 80 / 40 images in batches of 16, with
/// `env` set and `flags` added: every train epoch records and replays, the second eval replays too.
fn run_all(out: &Path, simulate: Option<&str>, flags: &[&str]) -> std::process::Output {
    let mut args = common::small_run(&["run-all"], common::synth(), out, ["2", "80", "40"]);
    args.extend(["--models", "cspdarknet53-pad0,cspresnet50", "--batch-size", "16"]);
    args.extend(flags);
    let mut command = common::command(&args);
    if let Some(fault) = simulate {
        command.env(SIMULATE, fault);
    }
    command.output().unwrap()
}

fn csvs(out: &Path) -> Vec<Vec<Vec<String>>> {
    ["cspdarknet53-pad0", "cspresnet50"]
        .iter()
        .map(|m| common::without_timings(&std::fs::read_to_string(out.join(format!("{m}.csv"))).unwrap()))
        .collect()
}

#[test]
fn a_failed_warm_up_or_capture_falls_back_once_and_later_models_do_not_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let eager = tmp.path().join("eager");
    let out = run_all(&eager, None, &["--cuda-graphs", "off"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for fault in ["warmup", "capture"] {
        let dir = tmp.path().join(fault);
        let out = run_all(&dir, Some(fault), &[]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{fault}: {log}");
        assert!(log.contains("CUDA graphs: on (--cuda-graphs auto)"), "the decision in one line:\n{log}");
        assert_eq!(log.matches("warning: CUDA graphs off").count(), 1, "{fault}: one warning:\n{log}");
        // Each step ran exactly once: the same numbers as an eager run.
        assert_eq!(csvs(&dir), csvs(&eager), "{fault}");
        let report = read_json(&dir.join("comparison.json"));
        let first = &report["models"]["cspdarknet53-pad0"];
        assert_eq!(first["cuda_graphs"], false, "{fault}");
        let reason = first["cuda_graphs_off"].as_str().unwrap();
        assert!(
            reason.contains(&format!("simulated {}", if fault == "warmup" { "warm-up" } else { fault })),
            "{reason}"
        );
        let later = report["models"]["cspresnet50"]["cuda_graphs_off"].as_str().unwrap();
        assert!(later.starts_with("an earlier failure in this process"), "{later}");
    }
}

#[test]
fn a_failed_first_replay_falls_back_the_same_way_and_replays_that_work_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let eager = tmp.path().join("eager");
    assert!(run_all(&eager, None, &["--cuda-graphs", "off"]).status.success());
    let replay = tmp.path().join("replay");
    let out = run_all(&replay, Some("replay"), &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(log.matches("warning: CUDA graphs off").count(), 1, "{log}");
    assert!(log.contains("first replay: simulated replay failure"), "{log}");
    assert_eq!(csvs(&replay), csvs(&eager));
    // A stand-in whose replays work replays every full batch, with the same results.
    let ok = tmp.path().join("ok");
    let out = run_all(&ok, Some("ok"), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Training to the bit; evaluation to rounding, as graphs keep BatchNorm unfolded where eager
    // evaluation folds it.
    for (replayed, eager) in csvs(&ok).iter().zip(&csvs(&eager)) {
        for (r, e) in replayed.iter().zip(eager).skip(1) {
            for (column, (a, b)) in r.iter().zip(e).enumerate() {
                let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
                let same = if [3, 4, 6].contains(&column) { (a - b).abs() <= 1e-5 * b.abs().max(1.0) } else { a == b };
                assert!(same, "column {column}: {a} against {b}");
            }
        }
    }
    let report = read_json(&ok.join("comparison.json"));
    assert_eq!(report["models"]["cspresnet50"]["cuda_graphs"], true);
    assert!(report["models"]["cspresnet50"].get("cuda_graphs_off").is_none());
}

#[test]
fn under_on_a_failed_capture_is_an_error_that_names_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run_all(&tmp.path().join("on"), Some("capture"), &["--cuda-graphs", "on"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("--cuda-graphs on") && log.contains("simulated capture failure"), "{log}");
    assert!(!log.contains("warning: CUDA graphs off"), "no fallback under on:\n{log}");
}

fn check_graphs(simulate: Option<&str>) -> (bool, serde_json::Value) {
    let args = ["check-graphs", "--model", "cspdarknet53-pad0", "--device", "cpu", "--batch-size", "8", "--json"];
    let mut command = common::command(&args);
    if let Some(fault) = simulate {
        command.env(SIMULATE, fault);
    }
    let out = command.output().unwrap();
    let check = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.success(), check)
}

#[test]
fn check_graphs_runs_its_whole_schedule_and_fails_only_when_replays_are_wrong() {
    let schedule = csp_tch::graph_check::schedule();
    let trains = schedule.iter().filter(|op| matches!(op, csp_tch::graph_check::Op::Train(_))).count();
    // Every train step's loss (partial batches too), each of the 2 epochs' means, 3 evaluations.
    let partials = schedule.iter().filter(|&&op| op == csp_tch::graph_check::Op::TrainPartial).count();
    let values = trains + partials + 2 + 3;
    for (simulate, replayed) in [(None, false), (Some("ok"), true)] {
        let (success, check) = check_graphs(simulate);
        assert!(success, "{simulate:?}: {check}");
        assert_eq!(check["replayed"], replayed, "{simulate:?}");
        assert_eq!(check["schedule"].as_array().unwrap().len(), schedule.len());
        assert_eq!(check["eager_losses"].as_array().unwrap().len(), values);
        assert_eq!(check["graph_losses"], check["eager_losses"], "{simulate:?}: eager steps, the same to the bit");
        let compared = check["compared"].as_array().unwrap();
        assert_eq!(compared.len(), 6);
        assert!(compared.iter().all(|c| c["ok"] == true && c["floor"] == 0.0), "{check}");
    }
    // Replays that run on the batch they were recorded on, not the one copied in: caught.
    let (success, check) = check_graphs(Some("stale-index"));
    assert!(!success);
    assert_eq!(check["ok"], false);
    let wrong: Vec<&str> = check["compared"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["quantity"].as_str().unwrap())
        .collect();
    assert!(wrong.contains(&"weights") && wrong.contains(&"losses"), "{wrong:?}");
}
