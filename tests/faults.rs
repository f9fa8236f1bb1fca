//! What a user can do to a run: interrupt it twice, start a second run into the same folder, point
//! --out somewhere unusable, stop the first epoch, leave a killed writer's files behind, name a
//! model twice. Each must end clearly, without a crash or a wrong promise.

mod common;

use common::{csp_tch, csp_tch_ok, s, Running};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

/// A run of darknet53 long enough to be interrupted (3 epochs of 640 images at 32 px).
fn long_run<'a>(data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    let mut args = common::small_run(&["train", "--model", "darknet53"], data, out, ["3", "640", "200"]);
    args.extend(["--normalize", "unit"]);
    args
}

#[test]
fn a_second_ctrl_c_quits_at_once_without_crashing() {
    let tmp = tempfile::tempdir().unwrap();
    // The second SIGINT lands while a convolution runs; exiting through `exit` tore libtorch down
    // under it (a segfault in most tries). Several delays, each must end with status 130.
    for (i, delay_ms) in [20u64, 60, 150, 300].into_iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        let mut run = Running::spawn(&long_run(common::synth(), &out));
        run.wait_for_line("data: ");
        std::thread::sleep(Duration::from_millis(200));
        run.signal(libc::SIGINT);
        std::thread::sleep(Duration::from_millis(delay_ms));
        run.signal(libc::SIGINT);
        let (status, log) = run.finish();
        assert_eq!(status.signal(), None, "killed by signal {:?} ({delay_ms} ms between):\n{log}", status.signal());
        assert_eq!(status.code(), Some(130), "{log}");
    }
}

#[test]
fn ctrl_c_in_the_first_epoch_promises_what_is_really_there() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut run = Running::spawn(&long_run(common::synth(), &out));
    run.wait_for_line("CUDA graphs:");
    std::thread::sleep(Duration::from_millis(300));
    run.signal(libc::SIGINT);
    let (status, log) = run.finish();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(!log.contains("keeps its checkpoint after epoch"), "no epoch was finished:\n{log}");
    assert!(log.contains("resume with:") && log.contains("--resume"), "{log}");
    let checkpoint = out.join("checkpoints/darknet53.safetensors");
    // Either it stopped after some steps and saved its place, or before the first and saved nothing.
    if log.contains("darknet53 saved its place in epoch 1 (after step") {
        let meta = csp_tch::train::checkpoint::read_meta(&checkpoint).unwrap();
        let place = meta.epoch_progress.expect("the place is in the checkpoint");
        assert!(place.epoch == 1 && place.steps > 0 && meta.epochs_done == 0, "{place:?}");
    } else {
        assert!(log.contains("darknet53 had not taken a step, so nothing of it was saved"), "{log}");
        assert!(!checkpoint.exists());
    }
}

#[test]
fn a_second_run_into_the_same_folder_is_refused_while_the_first_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut first = Running::spawn(&long_run(common::synth(), &out));
    first.wait_for_line("data: ");
    let second = csp_tch(&long_run(common::synth(), &out));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(err.contains("is in use by another csp-tch run") && err.contains(&format!("pid {}", first.pid())), "{err}");
    assert!(err.contains("train --model darknet53"), "names the holder's command: {err}");
    assert!(!err.contains("data: "), "refused before loading data: {err}");

    // A killed holder leaves its lock file, but not its lock.
    first.signal(libc::SIGKILL);
    first.finish();
    assert!(out.join(".csp-tch.lock").exists());
    csp_tch_ok(&common::small_run(
        &["train", "--model", "cspdarknet53-pad0"],
        common::synth(),
        &out,
        ["1", "64", "64"],
    ));
    assert!(!out.join(".csp-tch.lock").exists(), "removed by the run that held it");
}

#[test]
fn an_unusable_out_is_refused_before_any_data_is_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let proc_dir = Path::new("/proc/csp-tch-cannot-be-here");
    for (out, needle) in [(file.as_path(), "is not a folder"), (proc_dir, "cannot create it")] {
        let run = csp_tch(&long_run(common::synth(), out));
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{}", out.display());
        assert!(err.contains(&format!("--out {}", out.display())) && err.contains(needle), "{err}");
        assert!(!err.contains("data: ") && !err.contains("panicked"), "{err}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder", "left as it was");
}

/// A process id that no process has now.
fn dead_pid() -> u32 {
    (400_000..).find(|pid| !Path::new(&format!("/proc/{pid}")).exists()).unwrap()
}

#[test]
fn leftovers_of_a_killed_writer_are_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (dead, alive) = (dead_pid(), std::process::id());
    let checkpoints = out.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let stale = [
        checkpoints.join(format!(".darknet53.safetensors.tmp-{dead}")),
        out.join(format!(".comparison.json.tmp-{dead}")),
    ];
    let live = checkpoints.join(format!(".darknet53.safetensors.tmp-{alive}"));
    for file in stale.iter().chain([&live]) {
        std::fs::write(file, b"half a file").unwrap();
    }
    csp_tch_ok(&common::small_run(
        &["train", "--model", "cspdarknet53-pad0"],
        common::synth(),
        &out,
        ["1", "64", "64"],
    ));
    for file in &stale {
        assert!(!file.exists(), "{} left behind", file.display());
    }
    assert!(live.exists(), "a live process's file is not touched");

    // A download's staging folder left by a killed process goes when the next one stages there.
    let parent = tmp.path().join("data");
    let partial = parent.join(format!(".cifar.partial-{dead}"));
    std::fs::create_dir_all(partial.join("extracted")).unwrap();
    let synth = parent.join("small");
    csp_tch_ok(&["data", "synth", "--out", s(&synth), "--train", "10", "--test", "10"]);
    assert!(!partial.exists(), "stale staging folder left behind");
}

#[test]
fn a_model_named_twice_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut args = common::small_run(&["run-all"], common::synth(), &out, ["1", "64", "64"]);
    args.extend(["--models", "darknet53,cspdarknet53-pad0,darknet53"]);
    let run = csp_tch(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("--models lists darknet53 twice"), "{err}");
    assert!(!out.exists(), "nothing written");
}
