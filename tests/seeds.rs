//! `--seeds`: one run per seed in its own folder, and the report over seeds: aggregates equal to what
//! the seeds' CSVs say, a paired interval computed as documented, and resumption between seeds.

mod common;

use common::{csp_tch, csp_tch_ok, read_json, s, Running};
use csp_tch::report::seeds::{t_975, PairedDifference, Spread};
use serde_json::Value;
use std::path::Path;

#[test]
fn the_interval_is_students_t_on_the_paired_differences() {
    // Worked by hand: differences 1, 2, 3 points; mean 2, sample sd 1, t(0.975, 2) = 4.302653, so the
    // half-width is 4.302653 / sqrt(3) = 2.48414 and the interval -0.484 to 4.484, which holds 0.
    let spread = Spread::of(&[1.0, 2.0, 3.0]).unwrap();
    assert_eq!((spread.n, spread.mean, spread.std, spread.min, spread.max), (3, 2.0, 1.0, 1.0, 3.0));
    assert_eq!(t_975(2), 4.302653);
    let even = PairedDifference::of("csp", &[(0, 0.51, 0.50), (1, 0.52, 0.50), (2, 0.53, 0.50)]);
    let [lo, hi] = even.interval.unwrap();
    assert!((lo + 0.484138).abs() < 1e-5 && (hi - 4.484138).abs() < 1e-5, "{lo} {hi}");
    assert_eq!(even.verdict, "no difference the runs can show (csp +2.0 points on average, interval -0.5 to 4.5)");
    // 10, 11, 12 points: 11 +- 2.484, all above 0.
    let ahead = PairedDifference::of("csp", &[(0, 0.60, 0.50), (1, 0.61, 0.50), (2, 0.62, 0.50)]);
    assert_eq!(ahead.verdict, "csp ahead by 11.0 points, interval 8.5 to 13.5");
    let behind = PairedDifference::of("csp", &[(0, 0.40, 0.50), (1, 0.41, 0.50), (2, 0.42, 0.50)]);
    assert_eq!(behind.verdict, "csp behind by 9.0 points, interval -11.5 to -6.5");
    let one = PairedDifference::of("csp", &[(4, 0.55, 0.50)]);
    assert!(one.interval.is_none() && one.verdict.contains("one run cannot tell"), "{}", one.verdict);
    // One sided t quantiles beyond the table stay close to the normal's.
    assert!((t_975(100) - 1.984).abs() < 0.001, "{}", t_975(100));
}

fn multi_seed<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = common::small_run(&["run-all"], common::synth(), out, ["2", "128", "64"]);
    args.extend(["--models", "darknet53,cspdarknet53-pad0", "--seeds", "0,1", "--normalize", "unit"]);
    args.extend_from_slice(extra);
    args
}

/// Column `name` of a metrics CSV, one value per epoch.
fn column(csv: &Path, name: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(csv).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap();
    text.lines().skip(1).map(|l| l.split(',').nth(i).unwrap().parse().unwrap()).collect()
}

#[test]
fn a_multi_seed_run_writes_every_seed_and_aggregates_what_their_csvs_say() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = csp_tch_ok(&multi_seed(&out, &[]));
    for seed in ["seed-0", "seed-1"] {
        for file in ["darknet53.csv", "cspdarknet53-pad0.csv", "comparison.json", "comparison.md", "curves.svg"] {
            assert!(out.join(seed).join(file).exists(), "{seed}/{file}");
        }
        assert_eq!(
            read_json(&out.join(seed).join("comparison.json"))["config"]["seed"],
            seed[5..].parse::<u64>().unwrap()
        );
    }
    for file in ["comparison.json", "comparison.md", "seeds.csv", "curves.svg"] {
        assert!(out.join(file).exists(), "{file}");
    }
    assert!(!out.join("darknet53.csv").exists(), "a multi-seed run keeps per-seed files in the seed folders");
    let report = read_json(&out.join("comparison.json"));
    assert_eq!(report["config"]["seeds"], serde_json::json!([0, 1]));
    let seeds = &report["seeds"];

    // Every aggregate is what the two seeds' CSVs give.
    for model in ["darknet53", "cspdarknet53-pad0"] {
        let per_seed: Vec<Vec<f64>> = ["seed-0", "seed-1"]
            .iter()
            .map(|s| column(&out.join(s).join(format!("{model}.csv")), "eval_acc"))
            .collect();
        for (e, epoch) in seeds["models"][model]["epochs"].as_array().unwrap().iter().enumerate() {
            let (a, b) = (per_seed[0][e], per_seed[1][e]);
            let spread = &epoch["eval_acc"];
            assert_eq!(spread["n"], 2);
            assert!((spread["mean"].as_f64().unwrap() - (a + b) / 2.0).abs() < 1e-12, "{model} epoch {e}");
            assert_eq!(spread["min"].as_f64().unwrap(), a.min(b));
            assert_eq!(spread["max"].as_f64().unwrap(), a.max(b));
            let sd = (a - b).abs() / 2f64.sqrt();
            assert!((spread["std"].as_f64().unwrap() - sd).abs() < 1e-12, "{model} epoch {e}");
        }
    }
    // The paired difference: final accuracies of each seed, in points.
    let finals = |model: &str| -> Vec<f64> {
        ["seed-0", "seed-1"]
            .iter()
            .map(|s| *column(&out.join(s).join(format!("{model}.csv")), "eval_acc").last().unwrap())
            .collect()
    };
    let (csp, dark) = (finals("cspdarknet53-pad0"), finals("darknet53"));
    let against = &seeds["against_baseline"]["cspdarknet53-pad0"]["final_eval_acc"];
    let differences: Vec<f64> =
        against["differences"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap()).collect();
    for (i, d) in differences.iter().enumerate() {
        assert!((d - (csp[i] - dark[i]) * 100.0).abs() < 1e-9, "{differences:?}");
    }
    assert!(against["interval"].is_array() && against["verdict"].is_string());

    // seeds.csv holds the same aggregates.
    let csv = std::fs::read_to_string(out.join("seeds.csv")).unwrap();
    assert!(csv.starts_with("model,epoch,metric,n,mean,std,min,max\n"), "{csv}");
    let row = csv.lines().find(|l| l.starts_with("darknet53,2,eval_acc,")).unwrap();
    let mean: f64 = row.split(',').nth(4).unwrap().parse().unwrap();
    assert_eq!(mean, seeds["models"]["darknet53"]["epochs"][1]["eval_acc"]["mean"].as_f64().unwrap());

    // The Markdown and the printed summary say it in words; the plot has a band per model.
    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(md.contains("over 2 seeds (0, 1)") && md.contains("paired by seed"), "{md}");
    assert!(String::from_utf8_lossy(&run.stdout).contains("## Against the plain networks, paired by seed"));
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.contains("band: min to max"), "the legend explains the bands");

    // `report` rebuilds the same report over seeds.
    std::fs::remove_file(out.join("seeds.csv")).unwrap();
    csp_tch_ok(&["report", "--out", s(&out)]);
    assert_eq!(read_json(&out.join("comparison.json"))["seeds"], *seeds);
    assert_eq!(std::fs::read_to_string(out.join("seeds.csv")).unwrap(), csv);

    let twice = csp_tch(&multi_seed(&out, &["--seeds", "3,3"]));
    assert!(!twice.status.success());
}

/// The `seeds` section without what timing decides.
fn without_timings(mut seeds: Value) -> Value {
    for (_, model) in seeds["models"].as_object_mut().unwrap() {
        model.as_object_mut().unwrap().remove("mean_train_ms_per_step");
    }
    for (_, against) in seeds["against_baseline"].as_object_mut().unwrap() {
        against.as_object_mut().unwrap().remove("train_step_time_ratio");
    }
    seeds
}

#[test]
fn resume_after_a_kill_between_seeds_gives_the_same_aggregates() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    csp_tch_ok(&multi_seed(&straight, &[]));

    let mut run = Running::spawn(&multi_seed(&killed, &[]));
    run.wait_for_line("seed 1 (2 of 2)");
    run.signal(libc::SIGKILL);
    run.finish();
    assert!(killed.join("seed-0/comparison.json").exists() && !killed.join("seed-1/comparison.json").exists());

    let resumed = csp_tch_ok(&multi_seed(&killed, &["--resume"]));
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(log.contains("darknet53: resuming after epoch 2"), "seed 0 is not trained again: {log}");
    let (a, b) = (read_json(&straight.join("comparison.json")), read_json(&killed.join("comparison.json")));
    assert_eq!(without_timings(a["seeds"].clone()), without_timings(b["seeds"].clone()));
}
