//! The PyTorch peer (scripts/bench_pytorch.py) builds the same networks: a csp-tch checkpoint loaded
//! there gives the same logits (eval mode, fp32, max abs difference under 1e-4, or 1e-4 of the largest
//! logit when that exceeds 1), both from csp-tch's plain forward pass and as its evaluation computes
//! them (BatchNorm folded, the smallest maps as dense matrices). csp-tch computes some layers as
//! smaller, equal operations, so the two agree to fp32 rounding rather than to the bit. Runs with the
//! Python that scripts/setup.sh installed (CSP_TCH_PYTHON), and fails without it.

mod common;

use common::{csp_tch_ok, s};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn python_with_torch() -> Option<String> {
    let python = std::env::var("CSP_TCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python).args(["-c", "import torch"]).output().map(|o| o.status.success()).unwrap_or(false);
    ok.then_some(python)
}

#[test]
fn a_checkpoint_gives_the_same_logits_in_pytorch() {
    // scripts/setup.sh installs torch into the Python it records: without it this test fails, never skips.
    let python = python_with_torch().expect("no Python with torch: run scripts/setup.sh, which installs it");
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let out = tmp.path().join("out");
    // One short epoch, so that the BatchNorm statistics are no longer their initial values.
    csp_tch_ok(&common::small_run(&["run-all"], data, &out, ["1", "128", "100"]));
    for model in csp_tch::models::model_names() {
        let ckpt = out.join(format!("checkpoints/{model}.safetensors"));
        let (_meta, _vs, net) = csp_tch::checkpoint::load_model(&ckpt, Device::Cpu).unwrap();
        let _rng = common::rng_turn();
        tch::manual_seed(1);
        let input = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0;
        let plain = tch::no_grad(|| tch::nn::ModuleT::forward_t(&net, &input, false));
        // And as evaluation computes them: BatchNorm folded, the smallest maps as dense matrices.
        let folded = {
            let _folded = net.fold_batch_norm();
            tch::no_grad(|| tch::nn::ModuleT::forward_t(&net, &input, false))
        };
        for (path, logits) in [("plain", &plain), ("folded", &folded)] {
            let io = tmp.path().join(format!("{model}-{path}-io.safetensors"));
            Tensor::write_safetensors(&[("input", &input), ("logits", logits)], &io).unwrap();
            let run = Command::new(&python)
                .args(["scripts/bench_pytorch.py", "equiv", "--checkpoint", s(&ckpt), "--io", s(&io)])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&run.stdout);
            let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
                .unwrap_or_else(|_| panic!("{model}: {stdout}\n{}", String::from_utf8_lossy(&run.stderr)));
            let diff = result["max_abs_diff"].as_f64().unwrap();
            let scale = logits.abs().max().double_value(&[]);
            eprintln!("{model}, {path}: max |logits(csp-tch) - logits(PyTorch)| = {diff:.2e}, max |logits| {scale:.1}");
            let bound = 1e-4 * scale.max(1.0);
            assert!(run.status.success() && result["ok"] == true && diff < bound, "{model}, {path}: {result}");
        }
        assert!(plain.abs().max().double_value(&[]) > 1e-3, "{model}: trivial logits");
    }
}
