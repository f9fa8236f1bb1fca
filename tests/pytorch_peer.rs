//! csp-tch's networks are their references: a csp-tch checkpoint of every model, loaded into the PyTorch
//! peer (scripts/bench_pytorch.py), gives the same logits in eval mode (fp32, max abs difference under
//! 1e-4, or 1e-4 of the largest logit when that exceeds 1), both from csp-tch's plain forward pass and
//! as its evaluation computes them (BatchNorm folded, the smallest maps as dense matrices). The
//! tutorial's three are compared with the peer's own PyTorch networks; the CSPNet paper's models, and
//! darknet53 once more, with timm's own definitions (timm's `darknet53` with ReLU, the tutorial's
//! activation). csp-tch computes some layers as smaller, equal operations, so the two agree to fp32
//! rounding rather than to the bit. Runs with the Python that scripts/setup.sh installed
//! (CSP_TCH_PYTHON), and fails without it.

mod common;

use common::{csp_tch_ok, s};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn python_with_torch() -> Option<String> {
    let python = std::env::var("CSP_TCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok =
        Command::new(&python).args(["-c", "import torch, timm"]).output().map(|o| o.status.success()).unwrap_or(false);
    ok.then_some(python)
}

/// What each model's checkpoint is compared with.
fn references(model: &str) -> &'static [&'static str] {
    match model {
        "darknet53" => &["peer", "timm"],
        "cspdarknet53" | "cspdarknet53-pad0" => &["peer"],
        _ => &["timm"],
    }
}

#[test]
fn a_checkpoint_gives_the_same_logits_in_pytorch_and_in_timm() {
    // scripts/setup.sh installs torch and timm into the Python it records: without them this test
    // fails, never skips.
    let python = python_with_torch().expect("no Python with torch and timm: run scripts/setup.sh, which installs them");
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let out = tmp.path().join("out");
    // One short epoch of every model, so that the BatchNorm statistics are no longer their initial values.
    let mut args = common::small_run(&["run-all"], data, &out, ["1", "128", "100"]);
    args.extend(["--models", "all"]);
    csp_tch_ok(&args);
    for model in csp_tch::models::model_names() {
        let ckpt = out.join(format!("checkpoints/{model}.safetensors"));
        let (_meta, _vs, net) =
            csp_tch::train::checkpoint::load_model(&ckpt, Device::Cpu, csp_tch::train::checkpoint::Weights::Trained)
                .unwrap();
        let input = {
            let _rng = common::rng_turn();
            tch::manual_seed(1);
            Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0
        };
        let plain = tch::no_grad(|| tch::nn::ModuleT::forward_t(&net, &input, false));
        // And as evaluation computes them: BatchNorm folded, the smallest maps as dense matrices.
        let folded = {
            let _folded = net.fold_batch_norm();
            tch::no_grad(|| tch::nn::ModuleT::forward_t(&net, &input, false))
        };
        let cases = [("plain", &plain), ("folded", &folded)];
        let ios: Vec<_> = cases
            .iter()
            .map(|(path, logits)| {
                let io = tmp.path().join(format!("{model}-{path}-io.safetensors"));
                Tensor::write_safetensors(&[("input", &input), ("logits", *logits)], &io).unwrap();
                io
            })
            .collect();
        for against in references(model) {
            // One Python per checkpoint and reference: importing torch and timm is most of its time.
            let run = Command::new(&python)
                .args(["scripts/bench_pytorch.py", "equiv", "--checkpoint", s(&ckpt), "--against", against])
                .args(ios.iter().flat_map(|io| ["--io", s(io)]))
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&run.stdout);
            let results: Vec<serde_json::Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            assert_eq!(results.len(), cases.len(), "{model}: {stdout}\n{}", String::from_utf8_lossy(&run.stderr));
            for ((path, logits), result) in cases.iter().zip(&results) {
                let diff = result["max_abs_diff"].as_f64().unwrap();
                let scale = logits.abs().max().double_value(&[]);
                eprintln!(
                    "{model}, {path}, against {against}: max |logits(csp-tch) - logits(PyTorch)| = {diff:.2e}, \
                     max |logits| {scale:.1}"
                );
                let bound = 1e-4 * scale.max(1.0);
                assert_eq!(result["against"], *against, "{model}");
                assert!(result["ok"] == true && diff < bound, "{model}, {path}: {result}");
                // timm's heads start small (logits of 0.1): relative to the logits, too.
                assert!(diff <= 1e-5 * scale, "{model}, {path}: {diff:e} on logits up to {scale}");
            }
            assert!(run.status.success(), "{model}: {stdout}");
        }
        assert!(plain.abs().max().double_value(&[]) > 1e-3, "{model}: trivial logits");
    }
}
