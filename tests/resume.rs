//! Checkpoints and exact resumption: SIGKILL mid-epoch, Ctrl-C, mismatched and corrupt checkpoints.

mod common;

use common::{csp_tch, csp_tch_ok};
use csp_tch::train::checkpoint::{self, EpochProgress};
use csp_tch::train::metrics::EpochMetrics;
use csp_tch::train::Trainer;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn args<'a>(data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a =
        common::small_run(&["run-all", "--models", "cspdarknet53-pad0,darknet53"], data, out, ["2", "640", "200"]);
    a.extend(["--seed", "5"]);
    a.extend_from_slice(extra);
    a
}

fn spawn(args: &[&str]) -> Child {
    common::command(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

fn wait_for(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(300), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CSV rows without the timing columns.
fn metrics(out: &Path, model: &str) -> Vec<Vec<String>> {
    common::without_timings(&std::fs::read_to_string(out.join(format!("{model}.csv"))).unwrap())
}

/// Every tensor of a checkpoint (weights, BN statistics, optimizer state) by name.
fn tensors(file: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn checkpoint(out: &Path, model: &str) -> PathBuf {
    out.join("checkpoints").join(format!("{model}.safetensors"))
}

#[test]
fn sigkill_mid_epoch_then_resume_ends_exactly_where_an_uninterrupted_run_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    csp_tch_ok(&args(data, &straight, &[]));

    let mut child = spawn(&args(data, &killed, &[]));
    // The CSV is written after the checkpoint: once it is there, epoch 1 is saved and epoch 2 has
    // begun, and a kill at once lands long before epoch 2 can end.
    wait_for(&killed.join("cspdarknet53-pad0.csv"));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(metrics(&killed, "cspdarknet53-pad0").len(), 2, "killed after one epoch (header + 1 row)");
    assert!(!killed.join("darknet53.csv").exists());

    let resumed = csp_tch_ok(&args(data, &killed, &["--resume"]));
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("cspdarknet53-pad0: resuming after epoch 1"));
    for model in ["cspdarknet53-pad0", "darknet53"] {
        assert_eq!(metrics(&killed, model), metrics(&straight, model), "{model}: per-epoch metrics");
        assert!(tensors(&checkpoint(&killed, model)) == tensors(&checkpoint(&straight, model)), "{model}: final state");
    }

    // Resuming a finished run trains nothing and keeps the results.
    let again = csp_tch_ok(&args(data, &killed, &["--resume"]));
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(log.contains("resuming after epoch 2") && !log.contains("epoch 2/2:"), "{log}");
    assert_eq!(metrics(&killed, "darknet53"), metrics(&straight, "darknet53"));
}

#[test]
fn ctrl_c_keeps_the_checkpoint_and_prints_the_resume_command() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let out = tmp.path().join("out");
    let child = spawn(&args(data, &out, &[]));
    wait_for(&out.join("cspdarknet53-pad0.csv"));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("resume with:") && stderr.contains("--resume"), "{stderr}");
    assert!(checkpoint(&out, "cspdarknet53-pad0").exists());
    let resumed = csp_tch_ok(&args(data, &out, &["--resume"]));
    // After the finished epoch, or inside the next one where the stop saved its place.
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(log.contains("resuming after epoch") || log.contains("resuming in epoch"), "{log}");
    assert_eq!(metrics(&out, "darknet53").len(), 3);
}

#[test]
fn mismatched_and_corrupt_checkpoints_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::synth();
    let out = tmp.path().join("out");
    let one = |extra: &[&str]| {
        let mut a = common::small_run(&["train", "--model", "cspdarknet53-pad0"], data, &out, ["1", "200", "100"]);
        a.extend_from_slice(extra);
        csp_tch(&a)
    };
    assert!(one(&[]).status.success());

    let out_err = one(&["--resume", "--seed", "9", "--batch-size", "32"]);
    let err = String::from_utf8_lossy(&out_err.stderr);
    assert!(!out_err.status.success());
    assert!(err.contains("another configuration") && err.contains("seed: checkpoint 0, this run 9"), "{err}");
    assert!(err.contains("batch_size: checkpoint 64, this run 32"), "{err}");

    // Another model's checkpoint under this model's name.
    let file = checkpoint(&out, "cspdarknet53-pad0");
    let mut a = common::small_run(&["train", "--model", "darknet53"], data, &out, ["1", "200", "100"]);
    a.push("--resume");
    std::fs::copy(&file, checkpoint(&out, "darknet53")).unwrap();
    let wrong = csp_tch(&a);
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && err.contains("model: checkpoint \"cspdarknet53-pad0\", this run \"darknet53\""),
        "{err}"
    );

    // Truncated, then garbage.
    let bytes = std::fs::read(&file).unwrap();
    for broken in [bytes[..bytes.len() / 2].to_vec(), b"definitely not safetensors".to_vec()] {
        std::fs::write(&file, &broken).unwrap();
        let out_err = one(&["--resume"]);
        let err = String::from_utf8_lossy(&out_err.stderr);
        assert!(!out_err.status.success());
        assert!(
            err.contains("not a readable csp-tch checkpoint") && err.contains("cspdarknet53-pad0.safetensors"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    a.pop();
    assert!(csp_tch(&a).status.success(), "without --resume a fresh run replaces the broken files");
}

#[test]
fn a_checkpoint_holds_the_trainer_s_own_progress_whatever_metadata_it_is_given() {
    // A stop inside the first epoch after a resume saves metadata made afresh for this process:
    // the history and the place must come from the trainer, or the next resume starts over.
    let _rng = common::rng_turn();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cspdarknet53-pad0.safetensors");
    let (recipe, execution) = (common::tiny_recipe(4), common::execution(false, csp_tch::config::MemoryFormat::Auto));
    let mut trainer = Trainer::new("cspdarknet53-pad0", 10, &recipe, &execution, tch::Device::Cpu).unwrap();
    common::train_on_one_batch(&mut trainer, &recipe, 2, 3);
    let done = metrics_row(1);
    trainer.history = vec![done.clone(), metrics_row(2)];
    let place = EpochProgress { epoch: 3, steps: 4, images: 32, loss_sum: 70.5, correct: 9.0, last_loss: 2.25 };
    trainer.epoch_progress = Some(place.clone());
    trainer
        .save_checkpoint(&file, &common::run_meta("cspdarknet53-pad0", tmp.path(), recipe.clone(), execution))
        .unwrap();
    let meta = checkpoint::read_meta(&file).unwrap();
    assert_eq!((meta.epochs_done, meta.history.len(), meta.optimizer_steps), (2, 2, 2));
    assert_eq!(meta.epoch_progress.as_ref(), Some(&place));
    let mut resumed = Trainer::new("cspdarknet53-pad0", 10, &recipe, &execution, tch::Device::Cpu).unwrap();
    resumed.restore_checkpoint(&file).unwrap();
    assert_eq!(resumed.history[0].train_loss, done.train_loss);
    assert_eq!(resumed.epoch_progress, Some(place), "the next resume goes on inside epoch 3");
}

fn metrics_row(epoch: usize) -> EpochMetrics {
    EpochMetrics {
        epoch,
        train_loss: 2.0 / epoch as f64,
        train_acc: 0.5,
        eval_loss: 2.0,
        eval_acc: 0.4,
        train_ms_per_step: 1.0,
        eval_ms_per_step: 1.0,
        epoch_seconds: 1.0,
        train_images_per_s: 1.0,
        last_train_loss: 2.0,
        last_eval_loss: 2.0,
        warmup_seconds: 0.0,
        ..Default::default()
    }
}
