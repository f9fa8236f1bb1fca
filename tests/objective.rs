//! `--label-smoothing` and `--clip-grad` against PyTorch's own (`CrossEntropyLoss(label_smoothing=E)`,
//! `clip_grad_norm_`) in the project's venv, on the same numbers; and in a run: recorded in the
//! report, refused when out of range, resumed exactly, and a run without them unchanged.

mod common;

use common::peer::{assert_close, read_f32, run_python, write_f32};
use common::{csp_tch, csp_tch_ok, read_json};
use csp_tch::train::objective::{clip_grad_norm, train_loss};
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[test]
fn label_smoothing_gives_pytorchs_loss_and_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let (logits, labels) = {
        let _rng = common::rng_turn();
        tch::manual_seed(11);
        (
            Tensor::randn([16, 10], (Kind::Float, Device::Cpu)) * 3.0,
            Tensor::randint(10, [16], (Kind::Int64, Device::Cpu)),
        )
    };
    write_f32(&tmp.path().join("logits"), &logits);
    std::fs::write(
        tmp.path().join("labels"),
        Vec::<i64>::try_from(&labels).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    run_python(
        r#"
import sys, numpy as np, torch
d = sys.argv[1]
logits = torch.from_numpy(np.fromfile(d + "/logits", np.float32).reshape(16, 10)).requires_grad_()
labels = torch.from_numpy(np.fromfile(d + "/labels", np.int64))
for k, e in enumerate((0.0, 0.1, 0.35)):
    logits.grad = None
    loss = torch.nn.CrossEntropyLoss(label_smoothing=e)(logits, labels)
    loss.backward()
    np.array([loss.item()], np.float32).tofile(f"{d}/loss-{k}")
    logits.grad.numpy().astype(np.float32).tofile(f"{d}/grad-{k}")
"#,
        tmp.path(),
    );
    for (k, e) in [0.0, 0.1, 0.35].into_iter().enumerate() {
        let x = logits.detach().set_requires_grad(true);
        let loss = train_loss(&x, &labels, e);
        loss.backward();
        assert_close(
            &[loss.double_value(&[]) as f32],
            &read_f32(&tmp.path().join(format!("loss-{k}"))),
            &format!("loss, E = {e}"),
        );
        let grad = Vec::<f32>::try_from(x.grad().flatten(0, -1)).unwrap();
        assert_close(&grad, &read_f32(&tmp.path().join(format!("grad-{k}"))), &format!("gradient, E = {e}"));
    }
    // Smoothing changes the loss: the test above would pass for a loss that ignored E otherwise.
    assert!((train_loss(&logits, &labels, 0.1) - train_loss(&logits, &labels, 0.0)).abs().double_value(&[]) > 1e-3);
}

#[test]
fn clipping_gives_pytorchs_clip_grad_norm() {
    let tmp = tempfile::tempdir().unwrap();
    let grads = {
        let _rng = common::rng_turn();
        tch::manual_seed(12);
        [Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu)), Tensor::randn([7], (Kind::Float, Device::Cpu)) * 5.0]
    };
    for (i, g) in grads.iter().enumerate() {
        write_f32(&tmp.path().join(format!("g{i}")), g);
    }
    run_python(
        r#"
import sys, numpy as np, torch
d = sys.argv[1]
shapes = [(4, 3, 3, 3), (7,)]
for k, max_norm in enumerate((0.5, 1e6)):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = torch.from_numpy(np.fromfile(f"{d}/g{i}", np.float32).reshape(shapes[i])).clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    np.array([total.item()], np.float32).tofile(f"{d}/total-{k}")
    for i, p in enumerate(params):
        p.grad.numpy().tofile(f"{d}/clipped{i}-{k}")
"#,
        tmp.path(),
    );
    for (k, max_norm) in [0.5, 1e6].into_iter().enumerate() {
        let ours: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect();
        let total = clip_grad_norm(&ours, max_norm);
        assert_close(
            &[total.double_value(&[]) as f32],
            &read_f32(&tmp.path().join(format!("total-{k}"))),
            "total norm",
        );
        for (i, g) in ours.iter().enumerate() {
            let theirs = read_f32(&tmp.path().join(format!("clipped{i}-{k}")));
            assert_close(
                &Vec::<f32>::try_from(g.flatten(0, -1)).unwrap(),
                &theirs,
                &format!("gradient {i}, max norm {max_norm}"),
            );
        }
    }
    let clipped: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect();
    let _ = clip_grad_norm(&clipped, 0.5);
    assert!(!clipped[1].allclose(&grads[1], 1e-5, 1e-5, false), "a norm above the bound is scaled down");
}

#[test]
fn a_run_records_both_resumes_exactly_and_refuses_bad_values() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["--label-smoothing", "0.1", "--clip-grad", "0.5"];
    let run = |out: &Path, epochs: &'static str, more: &[&'static str]| {
        let mut args =
            common::small_run(&["train", "--model", "cspdarknet53-pad0"], common::synth(), out, [epochs, "128", "64"]);
        args.extend(extra);
        args.extend(more);
        csp_tch_ok(&args);
    };
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));
    run(&straight, "2", &[]);
    run(&resumed, "1", &[]);
    run(&resumed, "2", &["--resume"]);
    let csv = |o: &Path| common::without_timings(&std::fs::read_to_string(o.join("cspdarknet53-pad0.csv")).unwrap());
    assert_eq!(csv(&straight), csv(&resumed), "resumed with smoothing and clipping on, the same epochs");
    let config = read_json(&straight.join("comparison.json"))["config"].clone();
    assert_eq!((config["label_smoothing"].as_f64(), config["clip_grad"].as_f64()), (Some(0.1), Some(0.5)), "{config}");
    // Another smoothing is another recipe: --resume refuses it.
    let mut other =
        common::small_run(&["train", "--model", "cspdarknet53-pad0"], common::synth(), &resumed, ["2", "128", "64"]);
    other.extend(["--label-smoothing", "0.2", "--clip-grad", "0.5", "--resume"]);
    let refused = csp_tch(&other);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("label_smoothing"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    for (arg, says) in
        [("--label-smoothing=1", "below 1"), ("--label-smoothing=-0.1", "at least 0"), ("--clip-grad=0", "positive")]
    {
        let out = csp_tch(&["train", "--model", "cspdarknet53-pad0", arg]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{arg}: {err}");
    }
    // Without them the recipe is the tutorial's and comparison.json does not mention them.
    let plain = tmp.path().join("plain");
    csp_tch_ok(&common::small_run(
        &["train", "--model", "cspdarknet53-pad0"],
        common::synth(),
        &plain,
        ["1", "128", "64"],
    ));
    let config = read_json(&plain.join("comparison.json"))["config"].clone();
    assert!(config.get("label_smoothing").is_none() && config.get("clip_grad").is_none(), "{config}");
}
