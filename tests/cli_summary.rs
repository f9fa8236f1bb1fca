//! `csp-tch summary`, `env` and `bench` as a user runs them.

mod common;

use common::csp_tch;

#[test]
fn summary_json_has_the_documented_keys_and_totals() {
    let out = csp_tch(&["summary", "--model", "cspdarknet53", "--image-size", "224", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "cspdarknet53");
    assert_eq!(v["image_size"], 224);
    assert_eq!(v["classes"], 10);
    assert_eq!(v["trainable_params"], 18_061_546);
    // TUTORIAL.md: Paddle-style 19,106,376 at 1000 classes, whose head has 990 * 1025 more parameters.
    assert_eq!(v["paddle_style_params"], 19_106_376 - 990 * 1025);
    assert_eq!(format!("{:.3}", v["macs"].as_f64().unwrap() / 1e9), "6.113");
    let layers = v["layers"].as_array().unwrap();
    let last_stage = layers.iter().find(|l| l["name"] == "stage.4.downsample").unwrap();
    assert_eq!(last_stage["output_shape"], serde_json::json!([1024, 15, 15]));
    let total = |key: &str| layers.iter().map(|l| l[key].as_i64().unwrap()).sum::<i64>();
    assert_eq!(total("params"), 18_061_546);
    assert_eq!(total("macs"), v["macs"].as_i64().unwrap());
    assert_eq!(layers.last().unwrap()["name"], "fc");
}

#[test]
fn summary_json_gives_timms_counts_for_the_cspnet_papers_models() {
    for (model, at1000, at10) in common::TIMM_PARAMS {
        for (classes, expected) in [("1000", at1000), ("10", at10)] {
            let out = csp_tch(&["summary", "--model", model, "--classes", classes, "--json"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["trainable_params"], expected, "{model} at {classes} classes");
        }
    }
}

#[test]
fn summary_table_prints_totals() {
    let out = csp_tch(&["summary", "--model", "darknet53", "--image-size", "32"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stage.2.7.1"), "{text}");
    assert!(text.contains("40,595,178"), "{text}");
    assert!(text.contains("145.074 MMAC"), "{text}");
}

#[test]
fn bad_arguments_name_the_flag_and_fail() {
    let cases: [(&[&str], &str); 4] = [
        (&["summary", "--model", "resnet", "--image-size", "32"], "cspdarknet53-pad0"),
        (&["summary", "--model", "darknet53", "--image-size", "0"], "--image-size"),
        (&["summary", "--model", "darknet53", "--image-size", "31"], "--image-size 31 is too small"),
        (&["summary", "--model", "darknet53", "--classes", "0"], "--classes"),
    ];
    for (args, needle) in cases {
        let out = csp_tch(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn env_reports_versions_and_devices() {
    let out = csp_tch(&["env"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tch       0.26"), "{text}");
    assert!(text.contains("libtorch  2.13.0"), "{text}");
    assert!(text.contains("CUDA"), "{text}");
    // What --amp does where csp-tch would run by default.
    let amp = if tch::Cuda::is_available() { "--amp there: " } else { "--amp there: no effect (fp32 on the CPU)" };
    assert!(text.contains(amp), "{text}");
}

#[test]
fn bench_json_has_the_documented_keys_and_consistent_figures() {
    let args = ["bench", "--model", "cspdarknet53-pad0", "--mode", "eval", "--batch-size", "8", "--steps", "3"];
    let out = csp_tch(&[&args[..], &["--warmup", "1", "--device", "cpu", "--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["model"].as_str(), v["mode"].as_str(), v["device"].as_str()),
        (Some("cspdarknet53-pad0"), Some("eval"), Some("cpu"))
    );
    assert_eq!((v["image_size"].as_i64(), v["batch_size"].as_i64()), (Some(32), Some(8)));
    let steps: Vec<f64> = v["step_ms"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    assert_eq!(steps.len(), 3);
    let mut sorted = steps.clone();
    sorted.sort_by(f64::total_cmp);
    let ms = v["ms_per_step"].as_f64().unwrap();
    assert_eq!(ms, sorted[1], "the median of {steps:?}");
    assert!((v["images_per_s"].as_f64().unwrap() - 8.0 / ms * 1e3).abs() < 1e-6);
    // `summary`'s MACs at 32 px, 2 FLOPs each, one forward pass per eval step.
    let summary = csp_tch(&["summary", "--model", "cspdarknet53-pad0", "--image-size", "32", "--json"]);
    let macs = serde_json::from_slice::<serde_json::Value>(&summary.stdout).unwrap()["macs"].as_f64().unwrap();
    assert!((v["gflops"].as_f64().unwrap() - 2.0 * macs * 8.0 / ms / 1e6).abs() < 1e-6);
    // main() keeps freed memory in the heap, and says so.
    assert_eq!(v["keeps_freed_memory"], true);
}
