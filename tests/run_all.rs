//! `csp-tch run-all` and `train` end to end on a small synthetic set (CPU, 32 px).

mod common;

use common::{csp_tch, csp_tch_ok, read_json, s};

const CSV_HEADER: &str = "epoch,train_loss,train_acc,eval_loss,eval_acc,train_ms_per_step,eval_ms_per_step,\
epoch_seconds,train_images_per_s,last_train_loss,last_eval_loss,warmup_seconds";

/// A two-epoch run of `command` on 640 / 200 images.
fn small_run<'a>(command: &[&'a str], data: &'a std::path::Path, out: &'a std::path::Path) -> Vec<&'a str> {
    let mut args = common::small_run(command, data, out, ["2", "640", "200"]);
    args.extend(["--normalize", "unit", "--seed", "3"]);
    args
}

#[test]
fn run_all_writes_every_csv_column_and_json_key_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let out = tmp.path().join("out");
    let run = csp_tch_ok(&small_run(&["run-all"], data, &out));
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(log.contains("darknet53 epoch 2/2: train loss"), "one plain line per epoch when piped:\n{log}");
    let summary = String::from_utf8_lossy(&run.stdout);
    assert!(
        summary.contains("| cspdarknet53-pad0 | ok | 18,061,546 |")
            && summary.contains("## Against the plain networks")
            && summary.contains("| cspdarknet53 | darknet53 |"),
        "{summary}"
    );

    let names = ["darknet53", "cspdarknet53", "cspdarknet53-pad0"];
    for name in names {
        let csv = std::fs::read_to_string(out.join(format!("{name}.csv"))).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), 3, "{name}: one row per epoch");
        for (i, line) in lines[1..].iter().enumerate() {
            let cells: Vec<f64> = line.split(',').map(|c| c.parse().unwrap()).collect();
            assert_eq!(cells.len(), 12);
            assert_eq!(cells[0], (i + 1) as f64);
            assert!(cells.iter().all(|c| c.is_finite() && *c >= 0.0), "{name}: {line}");
            assert!(cells[2] <= 1.0 && cells[4] <= 1.0, "accuracies are fractions");
        }
    }

    let report = read_json(&out.join("comparison.json"));
    for key in ["config", "environment", "models", "comparison", "tutorial"] {
        assert!(report.get(key).is_some(), "missing {key}");
    }
    let config = &report["config"];
    for key in [
        "preset",
        "models",
        "epochs",
        "batch_size",
        "adam",
        "image_size",
        "normalize",
        "seed",
        "classes",
        "data_dir",
        "train_limit",
        "test_limit",
        "device",
        "out",
        "amp",
        "memory_format",
        "cuda_graphs",
    ] {
        assert!(config.get(key).is_some(), "config.{key}");
    }
    assert_eq!(config["cuda_graphs"], "auto");
    assert_eq!(config["train_limit"], 640);
    assert_eq!(config["adam"]["lr"], 0.001);
    for key in ["csp_tch", "tch", "libtorch", "device", "device_name", "cpu_threads"] {
        assert!(report["environment"].get(key).is_some(), "environment.{key}");
    }
    let peak = report["environment"]["peak_resident_mb"].as_f64().unwrap();
    assert!(peak > 100.0 && peak < 24_000.0, "peak resident memory {peak} MB");
    let mut best = 0.0f64;
    for name in names {
        let m = &report["models"][name];
        for key in [
            "trainable_params",
            "paddle_style_params",
            "macs",
            "epochs",
            "final_eval_acc",
            "best_eval_acc",
            "total_train_seconds",
            "mean_train_ms_per_step",
            "mean_eval_ms_per_step",
            "warmup_seconds",
            "cuda_graphs",
            "status",
        ] {
            assert!(m.get(key).is_some(), "models.{name}.{key}");
        }
        assert_eq!(m["status"], "ok");
        assert_eq!(m["cuda_graphs"], false, "{name}: no CUDA graphs on the CPU");
        let warmups: f64 = m["epochs"].as_array().unwrap().iter().map(|e| e["warmup_seconds"].as_f64().unwrap()).sum();
        assert_eq!(m["warmup_seconds"].as_f64().unwrap(), warmups, "{name}: the epochs' warm-up, summed");
        assert_eq!(m["epochs"].as_array().unwrap().len(), 2);
        // Training on the learnable set clearly beats chance (0.1) for every model.
        let train_acc = m["epochs"][1]["train_acc"].as_f64().unwrap();
        assert!(train_acc > 0.5, "{name}: train acc {train_acc}");
        best = best.max(m["best_eval_acc"].as_f64().unwrap());
    }
    assert!(best > 0.5, "best eval accuracy {best}");
    assert_eq!(report["models"]["darknet53"]["trainable_params"], 40_595_178);
    assert_eq!(report["models"]["cspdarknet53"]["macs"], 902_490_112);

    let c = &report["comparison"]["cspdarknet53-pad0"];
    assert_eq!(c["baseline"], "darknet53");
    let ratio = c["param_ratio"].as_f64().unwrap();
    assert!((ratio - 18_061_546.0 / 40_595_178.0).abs() < 1e-12);
    for key in ["mac_ratio", "eval_acc_difference", "train_step_time_ratio"] {
        assert!(c[key].is_number(), "comparison.{key}");
    }
    let tutorial = &report["tutorial"];
    assert_eq!(tutorial["comparable"], false);
    let dark = &tutorial["models"]["darknet53"];
    assert_eq!(dark["paddle_style_params_1000_classes"]["difference"], 0);
    assert_eq!(dark["epochs"][4]["tutorial"]["eval_acc"], 0.8045);
    assert!(dark["epochs"][0]["ours"]["eval_acc"].is_number());
    assert!(dark["epochs"][4]["ours"].is_null(), "we ran 2 epochs");
    assert_eq!(
        tutorial["models"]["cspdarknet53"]["paddle_style_params_1000_classes"]["difference"],
        19_106_376 - 19_047_240
    );

    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(md.contains("| cspdarknet53-pad0 | ok | 18,061,546 |"), "{md}");
    assert!(md.contains("## Beside the tutorial"));

    // A second run into the same folder replaces the first's files instead of mixing with them.
    csp_tch_ok(&small_run(&["train", "--model", "cspdarknet53-pad0"], data, &out));
    assert!(!out.join("darknet53.csv").exists() && out.join("cspdarknet53-pad0.csv").exists());
    let report = read_json(&out.join("comparison.json"));
    assert_eq!(report["models"].as_object().unwrap().len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn same_seed_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let mut csvs = Vec::new();
    // Run b also asks for CUDA graphs, which change nothing on the CPU.
    for (run, seed, graphs) in [("a", "3", "off"), ("b", "3", "on"), ("c", "4", "off")] {
        let out = tmp.path().join(run);
        let mut args = small_run(&["train", "--model", "cspdarknet53-pad0"], data, &out);
        *args.last_mut().unwrap() = seed;
        args.extend(["--cuda-graphs", graphs]);
        csp_tch_ok(&args);
        csvs.push(common::without_timings(&std::fs::read_to_string(out.join("cspdarknet53-pad0.csv")).unwrap()));
        let report = read_json(&out.join("comparison.json"));
        assert_eq!(report["config"]["cuda_graphs"], graphs);
        assert_eq!(report["models"]["cspdarknet53-pad0"]["cuda_graphs"], false);
    }
    assert_eq!(csvs[0], csvs[1], "same seed, same losses and accuracies, with or without --cuda-graphs");
    assert_ne!(csvs[0], csvs[2], "another seed, another run");
}

#[test]
fn a_diverging_model_is_marked_failed_and_the_next_still_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let out = tmp.path().join("out");
    let run = csp_tch(&small_run(&["run-all", "--models", "cspdarknet53-pad0,darknet53", "--lr", "1e30"], data, &out));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("2 of 2 models failed"), "{stderr}");
    let report = read_json(&out.join("comparison.json"));
    for name in ["cspdarknet53-pad0", "darknet53"] {
        let m = &report["models"][name];
        assert_eq!(m["status"], "failed", "{name}");
        let error = m["error"].as_str().unwrap();
        assert!(error.contains("loss became NaN") || error.contains("loss became inf"), "{error}");
    }
    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(md.contains("**darknet53 failed:**"), "{md}");
    assert!(!md.contains("-0.0"), "no epoch is 0.0 seconds, not -0.0: {md}");

    // Rebuilt, with no CSV and no checkpoint (both failed in their first epoch), they stay failed.
    assert!(!out.join("darknet53.csv").exists());
    std::fs::remove_file(out.join("comparison.md")).unwrap();
    csp_tch_ok(&["report", "--out", s(&out)]);
    let rebuilt = read_json(&out.join("comparison.json"));
    assert_eq!(rebuilt["models"], report["models"]);
    assert_eq!(rebuilt["environment"], report["environment"]);
}

#[test]
fn bad_run_arguments_fail_clearly_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("none");
    let cases: [(&[&str], &str); 5] = [
        (&["run-all", "--lr=-1"], "--lr -1 must be a positive number"),
        (&["run-all", "--models", "vgg"], "possible values"),
        (&["run-all", "--image-size", "16"], "--image-size 16 is too small"),
        (&["run-all", "--train-limit", "0"], "--train-limit"),
        (&["train", "--model", "darknet53", "--device", "tpu"], "--device 'tpu'"),
    ];
    for (args, needle) in cases {
        let mut args = args.to_vec();
        args.extend(["--data-dir", s(&missing), "--data-url", "file:///nonexistent.tar.gz"]);
        let out = csp_tch(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // No data and no network: where to put the files.
    let out = csp_tch(&["run-all", "--data-dir", s(&missing), "--data-url", "file:///nonexistent.tar.gz"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("without network"), "{stderr}");
    assert!(!missing.exists());
}
