//! `eval` on a checkpoint, `report` from CSVs, and curves.svg.

mod common;

use common::{csp_tch, csp_tch_ok, read_json, s};
use serde_json::Value;

#[test]
fn eval_report_and_curves_agree_with_the_training_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let out = tmp.path().join("out");
    let mut args =
        common::small_run(&["run-all", "--models", "darknet53,cspdarknet53-pad0"], data, &out, ["2", "640", "200"]);
    args.extend(["--normalize", "unit"]);
    csp_tch_ok(&args);
    let original = read_json(&out.join("comparison.json"));

    // eval reproduces the run's final eval accuracy and loss on the same test subset.
    let ckpt = out.join("checkpoints/cspdarknet53-pad0.safetensors");
    let eval: Value =
        serde_json::from_slice(&csp_tch_ok(&["eval", "--checkpoint", s(&ckpt), "--json"]).stdout).unwrap();
    let trained = &original["models"]["cspdarknet53-pad0"];
    assert_eq!(eval["test_images"], 200);
    assert_eq!(eval["accuracy"], trained["final_eval_acc"]);
    let loss_gap = eval["loss"].as_f64().unwrap() - trained["epochs"][1]["eval_loss"].as_f64().unwrap();
    assert!(loss_gap.abs() < 1e-9, "{loss_gap}");
    let confusion: Vec<Vec<i64>> = serde_json::from_value(eval["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<i64>(), 200);
    let per_class = eval["per_class"].as_array().unwrap();
    assert_eq!(per_class.len(), 10);
    assert_eq!(per_class[4]["name"], "pattern4");
    assert_eq!(per_class[4]["images"], 20);
    let table = String::from_utf8_lossy(&csp_tch_ok(&["eval", "--checkpoint", s(&ckpt), "--test-limit", "100"]).stdout)
        .into_owned();
    assert!(
        table.contains("on 100 test images") && table.contains("confusion matrix") && table.contains("9 pattern9"),
        "{table}"
    );

    // report rebuilds the same report from the CSVs and the comparison.json there, peak memory included.
    csp_tch_ok(&["report", "--out", s(&out)]);
    let rebuilt = read_json(&out.join("comparison.json"));
    assert_eq!(rebuilt, original);
    assert!(rebuilt["environment"]["peak_resident_mb"].as_f64().unwrap() > 100.0);

    // ... and the same models section from the CSVs and checkpoint metadata alone.
    for file in ["comparison.json", "comparison.md", "curves.svg"] {
        std::fs::remove_file(out.join(file)).unwrap();
    }
    csp_tch_ok(&["report", "--out", s(&out)]);
    let rebuilt = read_json(&out.join("comparison.json"));
    assert_eq!(rebuilt["models"], original["models"]);
    assert_eq!(rebuilt["config"], original["config"]);
    assert!(out.join("comparison.md").exists());

    // Without checkpoints, the configuration comes from the comparison.json already there.
    std::fs::remove_dir_all(out.join("checkpoints")).unwrap();
    csp_tch_ok(&["report", "--out", s(&out)]);
    assert_eq!(read_json(&out.join("comparison.json"))["models"], original["models"]);

    // curves.svg is SVG with one series per model in each panel.
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("curves.svg parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    for (model, stroke) in [("darknet53", "#1F77B4"), ("cspdarknet53-pad0", "#D62728")] {
        let legends =
            doc.descendants().filter(|n| n.has_tag_name("text") && n.text().map(str::trim) == Some(model)).count();
        assert_eq!(legends, 1, "{model}: one legend entry");
        let lines = doc
            .descendants()
            .filter(|n| {
                n.has_tag_name("polyline") && n.attribute("stroke").is_some_and(|c| c.eq_ignore_ascii_case(stroke))
            })
            .count();
        assert!(lines >= 2, "{model}: eval curves in the accuracy and loss panels");
    }

    // An emptied CSV or a non-finite metric in one is a failed model, not an "ok" one.
    let csv = out.join("cspdarknet53-pad0.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut rows: Vec<String> = text.lines().map(String::from).collect();
    rows[2] = rows[2].replacen(&rows[2].split(',').nth(3).unwrap().to_string(), "NaN", 1);
    std::fs::write(&csv, rows.join("\n") + "\n").unwrap();
    csp_tch_ok(&["report", "--out", s(&out)]);
    let m = &read_json(&out.join("comparison.json"))["models"]["cspdarknet53-pad0"];
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error"].as_str().unwrap().contains("epoch 2 has a non-finite metric"), "{m}");
    std::fs::write(&csv, "").unwrap();
    csp_tch_ok(&["report", "--out", s(&out)]);
    let report = read_json(&out.join("comparison.json"));
    let m = &report["models"]["cspdarknet53-pad0"];
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error"].as_str().unwrap().contains("holds no epoch"), "{m}");
    assert_eq!(report["models"]["darknet53"]["status"], "ok");

    // A folder without CSVs is a clear error.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let failed = csp_tch(&["report", "--out", s(&empty)]);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("holds no model CSV"));
}

#[test]
fn each_csp_model_is_compared_with_its_own_plain_network() {
    use csp_tch::config::{Preset, Recipe, RunConfig};
    use csp_tch::environment::RunEnvironment;
    use csp_tch::report::{Comparison, ModelReport};
    use csp_tch::train::metrics::EpochMetrics;
    let names = ["darknet53", "cspdarknet53", "resnet50", "cspresnet50", "cspresnext50"];
    let config = RunConfig {
        preset: Preset::Quick,
        models: names.iter().map(|n| n.to_string()).collect(),
        recipe: Recipe { epochs: 1, image_size: 32, ..Recipe::tutorial() },
        execution: Default::default(),
        classes: 10,
        dataset: Default::default(),
        data_dir: "data".into(),
        train_limit: None,
        test_limit: None,
        device: "cpu".into(),
        out: "out".into(),
        seeds: Vec::new(),
        world_size: 1,
        sync_bn: false,
    };
    let epoch = |eval_acc: f64, train_ms_per_step: f64| EpochMetrics {
        epoch: 1,
        train_loss: 2.0,
        train_acc: 0.2,
        eval_loss: 2.0,
        eval_acc,
        train_ms_per_step,
        eval_ms_per_step: 10.0,
        epoch_seconds: 1.0,
        train_images_per_s: 64.0,
        last_train_loss: 2.0,
        last_eval_loss: 2.0,
        warmup_seconds: 0.0,
        ..Default::default()
    };
    let accuracy = [0.30, 0.35, 0.40, 0.43, 0.50];
    let models = names
        .iter()
        .zip(accuracy)
        .map(|(name, acc)| {
            (
                name.to_string(),
                ModelReport::new(name, &config, vec![epoch(acc, 100.0 * acc)], Default::default(), None).unwrap(),
            )
        })
        .collect();
    let environment = RunEnvironment::detect(tch::Device::Cpu, csp_tch::config::Precision::Fp32);
    let report = Comparison::new(&config, &environment, None, models);
    let csp_resnet = &report.comparison["cspresnet50"];
    assert_eq!(csp_resnet.baseline, "resnet50");
    assert_eq!(csp_resnet.param_ratio, 20_601_418.0 / 23_528_522.0);
    assert!((csp_resnet.eval_acc_difference.unwrap() - 0.03).abs() < 1e-12);
    assert!((csp_resnet.train_step_time_ratio.unwrap() - 43.0 / 40.0).abs() < 1e-12);
    assert_eq!(report.comparison["cspdarknet53"].baseline, "darknet53");
    assert!(!report.comparison.contains_key("resnet50"), "a plain network has nothing to be compared with");
    assert!(!report.comparison.contains_key("cspresnext50"), "resnext50 did not run");
    let md = report.markdown();
    assert!(md.contains("| cspresnet50 | resnet50 | 0.876 |"), "{md}");
}
