//! Recipes past the tutorial's in a run (`--opt`, `--sched`, `--ema` with `--label-smoothing` and
//! `--clip-grad`): recorded in comparison.json, the learning rate and the EMA evaluation in the CSV,
//! a run killed or stopped and resumed ending exactly where an uninterrupted one does, bad values
//! refused. Each piece's numbers against PyTorch's are in tests/optim.rs and tests/schedule.rs.

mod common;

use common::{csp_tch, csp_tch_ok, read_json, Running};
use std::path::Path;

const MODEL: &str = "cspdarknet53-pad0";

fn args<'a>(out: &'a Path, recipe: &[&'a str]) -> Vec<&'a str> {
    let mut a = common::small_run(&["train", "--model", MODEL], common::synth(), out, ["3", "256", "64"]);
    a.extend(["--batch-size", "16", "--seed", "3"]);
    a.extend_from_slice(recipe);
    a
}

fn csv(out: &Path) -> String {
    std::fs::read_to_string(out.join(format!("{MODEL}.csv"))).unwrap()
}

/// Every tensor of the checkpoint (weights, statistics, optimizer state, EMA) by name.
fn tensors(out: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(out.join("checkpoints").join(format!("{MODEL}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn wait_for(path: &Path) {
    let started = std::time::Instant::now();
    while !path.exists() {
        assert!(started.elapsed().as_secs() < 300, "{} never appeared", path.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs `recipe` straight, and again stopped by `signal` once epoch 1 is saved, then resumed; the
/// two must agree on every metric and every tensor. Returns the straight run's folder's CSV.
fn stopped_and_resumed_equals_straight(tmp: &Path, recipe: &[&str], signal: i32) -> String {
    let (straight, stopped) = (tmp.join("straight"), tmp.join("stopped"));
    csp_tch_ok(&args(&straight, recipe));
    let run = Running::spawn(&args(&stopped, recipe));
    wait_for(&stopped.join(format!("{MODEL}.csv")));
    run.signal(signal);
    let (status, log) = run.finish();
    assert!(!status.success(), "stopped: {log}");
    let resumed = csp_tch_ok(&[args(&stopped, recipe), vec!["--resume"]].concat());
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(log.contains("resuming"), "{log}");
    assert_eq!(common::without_timings(&csv(&stopped)), common::without_timings(&csv(&straight)), "metrics");
    assert!(tensors(&stopped) == tensors(&straight), "the final weights, optimizer state and EMA");
    csv(&straight)
}

/// The column `name` of a metrics CSV, as numbers.
fn column(csv: &str, name: &str) -> Vec<f64> {
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name}: {header:?}"));
    csv.lines().skip(1).map(|l| l.split(',').nth(i).unwrap().parse().unwrap()).collect()
}

#[test]
fn adamw_cosine_per_step_with_ema_killed_and_resumed_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe: Vec<&str> = "--opt adamw --weight-decay 0.05 --sched cosine --sched-on step --warmup-epochs 1 \
                             --warmup-lr 1e-4 --min-lr 1e-5 --ema 0.9 --label-smoothing 0.1 --clip-grad 2 \
                             --aug crop-flip"
        .split_whitespace()
        .collect();
    let csv = stopped_and_resumed_equals_straight(tmp.path(), &recipe, libc::SIGKILL);
    // The warm-up's first step, then the top of the cosine, then on its way down.
    let lr = column(&csv, "lr");
    assert_eq!(lr[0], 1e-4, "{lr:?}");
    assert!((lr[1] - 1e-3).abs() < 1e-15 && lr[2] < lr[1], "{lr:?}");
    let (raw, ema) = (column(&csv, "eval_acc"), column(&csv, "eval_acc_ema"));
    assert_eq!(ema.len(), 3);
    assert!(
        column(&csv, "eval_loss_ema") != column(&csv, "eval_loss"),
        "the average is another model: {raw:?} {ema:?}"
    );
    let report = read_json(&tmp.path().join("straight").join("comparison.json"));
    let config = &report["config"];
    assert_eq!(config["adamw"]["weight_decay"], 0.05, "{config}");
    assert_eq!(config["adamw"]["no_decay_bn_bias"], true, "AdamW exempts BN and biases by default");
    assert!(config.get("adam").is_none(), "{config}");
    assert_eq!(config["schedule"]["sched"], "cosine");
    assert_eq!(config["ema"], 0.9);
    assert_eq!(config["augment"], "crop-flip", "{config}");
    let model = &report["models"][MODEL];
    assert_eq!(model["final_eval_acc_ema"].as_f64(), ema.last().copied(), "{model}");
    let markdown = std::fs::read_to_string(tmp.path().join("straight").join("comparison.md")).unwrap();
    let row = format!("| {MODEL} | {:.4} | {:.4} |", raw.last().unwrap(), ema.last().unwrap());
    assert!(markdown.contains("(`--ema 0.9`)") && markdown.contains(&row), "{markdown}");
    assert!(markdown.contains("past the tutorial's recipe: adamw `{"), "{markdown}");
    // `eval --ema` evaluates the averaged weights the checkpoint holds: the CSV's last EMA numbers.
    let checkpoint = tmp.path().join("straight").join("checkpoints").join(format!("{MODEL}.safetensors"));
    let eval = |extra: &[&str]| {
        let out = csp_tch_ok(
            &[&["eval", "--checkpoint", common::s(&checkpoint), "--device", "cpu", "--json"][..], extra].concat(),
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (averaged, trained) = (eval(&["--ema"]), eval(&[]));
    assert_eq!((averaged["weights"].as_str(), averaged["accuracy"].as_f64()), (Some("ema"), ema.last().copied()));
    assert_eq!(trained["accuracy"].as_f64(), raw.last().copied());
}

#[test]
fn sgd_nesterov_multistep_stopped_mid_epoch_and_resumed_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe: Vec<&str> = "--opt sgd --lr 0.05 --nesterov --weight-decay 5e-4 --sched multistep --decay-epochs 2 \
                             --decay-rate 0.2 --sched-on step --ema 0.5 --aug rrc-flip"
        .split_whitespace()
        .collect();
    let csv = stopped_and_resumed_equals_straight(tmp.path(), &recipe, libc::SIGINT);
    let lr = column(&csv, "lr");
    assert_eq!(lr, vec![0.05, 0.05, 0.05 * 0.2], "drops after epoch 2");
}

#[test]
fn the_cifar_long_preset_is_its_recipe_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut a = common::small_run(&["train", "--model", MODEL], common::synth(), &out, ["6", "64", "32"]);
        a.extend(["--preset", "cifar-long", "--batch-size", "32"]);
        a.extend_from_slice(extra);
        csp_tch_ok(&a);
        (read_json(&out.join("comparison.json"))["config"].clone(), csv(&out))
    };
    let (config, metrics) = run("preset", &[]);
    assert_eq!(config["adamw"]["weight_decay"], 0.05, "{config}");
    assert_eq!(config["adamw"]["lr"], 1e-3);
    assert_eq!((config["augment"].as_str(), config["normalize"].as_str()), (Some("crop-flip"), Some("unit")));
    assert_eq!(config["label_smoothing"], 0.1);
    let schedule = &config["schedule"];
    assert_eq!((schedule["sched"].as_str(), schedule["on"].as_str()), (Some("cosine"), Some("step")), "{schedule}");
    assert_eq!((schedule["warmup_epochs"].as_u64(), schedule["min_lr"].as_f64()), (Some(5), Some(1e-5)));
    assert_eq!(column(&metrics, "lr")[0], 1e-5, "the warm-up starts at 1e-5");
    // Another optimizer takes its own defaults, not AdamW's; the schedule stays the preset's.
    let (config, _) = run("sgd", &["--opt", "sgd", "--label-smoothing", "0"]);
    assert_eq!((config["sgd"]["lr"].as_f64(), config["sgd"]["momentum"].as_f64()), (Some(0.1), Some(0.9)), "{config}");
    assert!(config.get("adamw").is_none() && config.get("label_smoothing").is_none(), "{config}");
    assert_eq!(config["schedule"]["warmup_epochs"], 5);
    // The preset's own optimizer with its exemption turned off: every parameter decays.
    let (config, _) = run("decay-all", &["--no-decay-bn-bias", "false"]);
    assert_eq!(config["adamw"]["weight_decay"], 0.05, "{config}");
    assert!(config["adamw"].get("no_decay_bn_bias").is_none(), "{config}");
}

#[test]
fn the_tutorial_recipe_writes_what_it_always_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plain");
    csp_tch_ok(&common::small_run(&["train", "--model", MODEL], common::synth(), &out, ["1", "128", "64"]));
    let checkpoint = out.join("checkpoints").join(format!("{MODEL}.safetensors"));
    let refused = csp_tch(&["eval", "--checkpoint", common::s(&checkpoint), "--ema"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("trained without --ema"), "{err}");
    let header = csv(&out).lines().next().unwrap().to_string();
    assert_eq!(
        header,
        "epoch,train_loss,train_acc,eval_loss,eval_acc,train_ms_per_step,eval_ms_per_step,epoch_seconds,\
         train_images_per_s,last_train_loss,last_eval_loss,warmup_seconds"
    );
    let config = read_json(&out.join("comparison.json"))["config"].clone();
    assert_eq!(
        config["adam"],
        serde_json::json!({"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
        "Adam's settings, nothing else"
    );
    for absent in ["schedule", "ema", "adamw", "sgd", "augment"] {
        assert!(config.get(absent).is_none(), "{absent}: {config}");
    }
}

#[test]
fn settings_that_do_not_apply_or_are_out_of_range_are_refused() {
    for (flags, says) in [
        (&["--momentum", "0.9"][..], "--momentum does not apply to --opt adam"),
        (&["--opt", "sgd", "--betas", "0.9,0.99"], "--betas does not apply to --opt sgd"),
        (&["--opt", "sgd", "--momentum", "0", "--nesterov"], "--nesterov needs a momentum"),
        (&["--betas", "0.9"], "--betas takes two numbers"),
        (&["--opt", "adamw", "--weight-decay=-1"], "--weight-decay -1"),
        (&["--min-lr", "1e-5"], "--min-lr applies only to --sched cosine"),
        (&["--sched", "cosine", "--decay-rate", "0.5"], "--decay-rate applies only to --sched step or multistep"),
        (&["--sched", "step"], "--sched step needs one --decay-epochs"),
        (&["--sched", "multistep", "--decay-epochs", "3,2"], "list increasing epochs"),
        (&["--sched", "cosine", "--warmup-epochs", "5", "--epochs", "5"], "leaves no epoch after the warm-up"),
        (&["--warmup-epochs", "1", "--warmup-lr", "0.01"], "at most --lr 0.001"),
        (&["--sched-on", "step"], "--sched-on applies only with --sched or --warmup-epochs"),
        (&["--ema", "1"], "--ema 1 must be above 0 and below 1"),
    ] {
        let out = csp_tch(&[&["train", "--model", MODEL][..], flags].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
