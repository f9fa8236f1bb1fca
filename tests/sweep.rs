//! What a fault sweep found, as a hostile new user would find it: bad settings, signals, damaged
//! files and odd paths must never cost a user results, panic, or name the wrong cause.

mod common;

use common::{csp_tch, csp_tch_ok, read_json, s, Running};
use std::path::{Path, PathBuf};

/// `run-all` of one epoch of cspdarknet53-pad0 on 64 / 32 images in batches of 16 (fast), with some
/// settings replaced (`(flag, value)` pairs) and `extra` flags after them.
fn tiny(out: &Path, replaced: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let mut settings: Vec<(&str, String)> = vec![
        ("--data-dir", s(common::synth()).to_string()),
        ("--out", s(out).to_string()),
        ("--device", "cpu".into()),
        ("--image-size", "32".into()),
        ("--epochs", "1".into()),
        ("--train-limit", "64".into()),
        ("--test-limit", "32".into()),
        ("--models", "cspdarknet53-pad0".into()),
        ("--batch-size", "16".into()),
    ];
    for (flag, value) in replaced {
        match settings.iter_mut().find(|(f, _)| f == flag) {
            Some(setting) => setting.1 = value.to_string(),
            None => settings.push((flag, value.to_string())),
        }
    }
    let mut args = vec!["run-all".to_string()];
    args.extend(settings.into_iter().flat_map(|(f, v)| [f.to_string(), v]));
    args.extend(extra.iter().map(|e| e.to_string()));
    args
}

/// `args` as the common helpers take them.
fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Plants an earlier multi-seed run's files (contents beside the point) and returns them.
fn plant_previous_results(out: &Path) -> Vec<PathBuf> {
    let files = [
        "darknet53.csv",
        "comparison.json",
        "seeds.csv",
        "seed-0/darknet53.csv",
        "seed-0/checkpoints/darknet53.safetensors",
    ];
    files
        .iter()
        .map(|f| {
            let path = out.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "earlier results").unwrap();
            path
        })
        .collect()
}

fn assert_kept(files: &[PathBuf], context: &str) {
    for f in files {
        assert_eq!(
            std::fs::read_to_string(f).ok().as_deref(),
            Some("earlier results"),
            "{context}: {} lost",
            f.display()
        );
    }
}

#[test]
fn a_run_that_cannot_start_keeps_the_previous_results_and_names_the_real_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let planted = plant_previous_results(&out);
    let missing = tmp.path().join("no-such-data");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("--device", "cuda")], "CUDA"),
        (&[("--image-size", "8")], "--image-size 8 is too small"),
        (&[("--train-limit", "60000")], "--train-limit 60000 is out of range"),
        (&[("--data-dir", s(&missing)), ("--data-url", "file:///no/such/archive.tar.gz")], "archive.tar.gz"),
    ];
    for (flags, reason) in cases {
        let run = csp_tch(&refs(&tiny(&out, flags, &["--seeds", "0,1"])));
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{flags:?}");
        assert!(err.contains(reason), "{flags:?}: the real reason:\n{err}");
        assert!(!err.contains("has results yet"), "{flags:?}:\n{err}");
        assert_kept(&planted, &format!("{flags:?}"));
    }
}

#[test]
fn a_new_run_does_not_touch_a_seed_folder_another_run_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let planted = plant_previous_results(&out);
    // Another run writing into seed-0 holds its lock (here this test process does).
    let _held = csp_tch::files::OutDir::new(out.join("seed-0")).lock().unwrap();
    let run = csp_tch(&refs(&tiny(&out, &[], &["--seeds", "0,1"])));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(err.contains("is in use by another csp-tch run"), "{err}");
    assert_kept(&planted, "a held seed folder");
}

#[test]
fn ctrl_c_while_the_data_loads_changes_nothing_and_promises_no_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let planted = plant_previous_results(&out);
    // Without limits, loading all 60,000 images takes a second or more: time enough to land in it.
    let args =
        common::small_run(&["run-all", "--models", "cspdarknet53-pad0"], common::synth(), &out, ["1", "all", "all"]);
    let run = Running::spawn(&args);
    let lock = out.join(".csp-tch.lock");
    while !lock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    run.signal(libc::SIGINT);
    let (status, log) = run.finish();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("stopped before any training: nothing in"), "{log}");
    assert!(!log.contains("resume with"), "nothing to resume:\n{log}");
    assert_kept(&planted, "Ctrl-C while loading");
}

#[test]
fn sigterm_saves_the_place_in_the_epoch_and_resume_ends_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, stopped) = (tmp.path().join("whole"), tmp.path().join("stopped"));
    let args = |out| {
        let mut args =
            common::small_run(&["train", "--model", "cspdarknet53-pad0"], common::synth(), out, ["3", "1280", "64"]);
        args.extend(["--batch-size", "16", "--normalize", "unit"]);
        args
    };
    csp_tch_ok(&args(&whole));
    let mut run = Running::spawn(&args(&stopped));
    run.wait_for_line("CUDA graphs:");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    run.signal(libc::SIGTERM);
    let (status, log) = run.finish();
    assert_eq!(status.code(), Some(130), "stopped as Ctrl-C stops:\n{log}");
    assert!(log.contains("resume with:"), "{log}");
    assert!(log.contains("saved its place in epoch") || log.contains("keeps its checkpoint after epoch"), "{log}");
    assert!(!out_has_temporaries(&stopped.join("checkpoints")), "no temporary checkpoint left");
    let mut resumed = args(&stopped);
    resumed.push("--resume");
    let out = csp_tch_ok(&resumed);
    let resumed_log = String::from_utf8_lossy(&out.stderr);
    assert!(resumed_log.contains("resuming"), "{resumed_log}");
    let csv =
        |dir: &Path| common::without_timings(&std::fs::read_to_string(dir.join("cspdarknet53-pad0.csv")).unwrap());
    assert_eq!(csv(&stopped), csv(&whole), "a stopped and resumed run ends exactly as an uninterrupted one");
}

fn out_has_temporaries(dir: &Path) -> bool {
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
}

#[test]
fn report_rebuilds_an_interrupted_multi_seed_run_even_without_its_top_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    csp_tch_ok(&refs(&tiny(&out, &[], &["--seeds", "0,1"])));
    // Seed 1 stopped before it wrote anything, and the top report is gone.
    std::fs::remove_dir_all(out.join("seed-1")).unwrap();
    std::fs::create_dir(out.join("seed-1")).unwrap();
    std::fs::remove_file(out.join("comparison.json")).unwrap();
    // A killed writer's temporary file at the top.
    std::fs::write(out.join(".seeds.csv.tmp-999999999"), "half").unwrap();
    csp_tch_ok(&["report", "--out", s(&out)]);
    let report = read_json(&out.join("comparison.json"));
    assert_eq!(report["config"]["seeds"], serde_json::json!([0]), "the seeds with results");
    assert!(report["seeds"]["models"]["cspdarknet53-pad0"].is_object(), "{report}");
    assert!(!out.join(".seeds.csv.tmp-999999999").exists(), "leftovers at the top are cleaned");
    // A folder another run holds is not rewritten.
    let _held = csp_tch::files::OutDir::new(&out).lock().unwrap();
    let refused = csp_tch(&["report", "--out", s(&out)]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is in use by another csp-tch run"));
}

#[test]
fn resume_refuses_another_data_folder_and_fewer_epochs_than_done() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut two =
        common::small_run(&["train", "--model", "cspdarknet53-pad0"], common::synth(), &out, ["2", "64", "32"]);
    two.extend(["--batch-size", "16"]);
    csp_tch_ok(&two);
    let copy = common::synth_copy(tmp.path());
    let mut other_data = common::small_run(&["train", "--model", "cspdarknet53-pad0"], &copy, &out, ["2", "64", "32"]);
    other_data.extend(["--batch-size", "16", "--resume"]);
    let err = String::from_utf8_lossy(&csp_tch(&other_data).stderr).into_owned();
    assert!(err.contains("data_dir"), "{err}");
    let mut fewer =
        common::small_run(&["train", "--model", "cspdarknet53-pad0"], common::synth(), &out, ["1", "64", "32"]);
    fewer.extend(["--batch-size", "16", "--resume"]);
    let run = csp_tch(&fewer);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("2 epochs done, more than --epochs 1"), "{err}");
}

/// Rewrites the csp-tch metadata of the checkpoint `file` with `edit` (as a user editing it would).
fn edit_checkpoint(file: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(header["__metadata__"]["csp_tch"].as_str().unwrap()).unwrap();
    edit(&mut meta);
    header["__metadata__"]["csp_tch"] = serde_json::Value::String(meta.to_string());
    let mut text = header.to_string().into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

#[test]
fn eval_refuses_an_edited_checkpoint_instead_of_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    csp_tch_ok(&refs(&tiny(&out, &[], &[])));
    let file = out.join("checkpoints/cspdarknet53-pad0.safetensors");
    let edits: [(&str, serde_json::Value); 3] =
        [("image_size", 8.into()), ("batch_size", 0.into()), ("image_size", 100_000.into())];
    for (key, value) in edits {
        let edited = tmp.path().join(format!("{key}-{value}.safetensors"));
        std::fs::copy(&file, &edited).unwrap();
        edit_checkpoint(&edited, |meta| meta["config"][key] = value.clone());
        let run = csp_tch(&["eval", "--checkpoint", s(&edited), "--device", "cpu"]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{key}={value}: {err}");
        assert!(!err.contains("panicked"), "{key}={value}: {err}");
        assert!(err.contains(s(&edited)) && err.contains("edited or damaged"), "{key}={value}: {err}");
    }
}

#[test]
fn impossible_sizes_are_refused_at_the_command_line() {
    let huge = csp_tch(&["summary", "--model", "darknet53", "--classes", "9223372036854775807"]);
    assert_eq!(huge.status.code(), Some(2), "{}", String::from_utf8_lossy(&huge.stderr));
    let ok = csp_tch_ok(&["summary", "--model", "darknet53", "--classes", "1000000", "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(summary["trainable_params"].as_i64().unwrap() > 1_000_000_000, "no overflow at the largest head");
    let tmp = tempfile::tempdir().unwrap();
    let one = csp_tch(&refs(&tiny(&tmp.path().join("b1"), &[("--batch-size", "1")], &[])));
    let err = String::from_utf8_lossy(&one.stderr);
    assert_eq!(one.status.code(), Some(2), "{err}");
    assert!(err.contains("--batch-size"), "{err}");
    let single = csp_tch(&refs(&tiny(&tmp.path().join("l1"), &[("--train-limit", "1")], &[])));
    assert!(
        String::from_utf8_lossy(&single.stderr).contains("BatchNorm"),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
}

#[test]
fn a_lock_file_that_is_a_symbolic_link_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let target = tmp.path().join("precious.txt");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, out.join(".csp-tch.lock")).unwrap();
    let run = csp_tch(&refs(&tiny(&out, &[], &[])));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
}

#[test]
fn the_printed_resume_command_gives_back_the_same_arguments() {
    for arg in ["plain", "it's here", "a b", "", "x'\"$HOME`", "--out=/tmp/o'k"] {
        let quoted = csp_tch::run::shell_quote(arg);
        let echoed = std::process::Command::new("sh").args(["-c", &format!("printf %s {quoted}")]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&echoed.stdout), arg, "{quoted}");
    }
}

#[test]
fn data_folder_problems_name_their_real_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let looped = tmp.path().join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    for (dir, cause) in [(&file, "is a file, not a folder"), (&looped, "cannot reach the folder")] {
        let run = csp_tch(&["data", "check", "--data-dir", s(dir)]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success());
        assert!(err.contains(cause), "{}: {err}", dir.display());
        assert!(!err.contains("remove"), "good data is never to be deleted: {err}");
        let run = csp_tch(&refs(&tiny(&tmp.path().join("out"), &[("--data-dir", s(dir))], &[])));
        assert!(String::from_utf8_lossy(&run.stderr).contains(cause), "run-all too");
    }
}

/// csp-tch run by a user whom permissions bind: as root, the same binary with the two capabilities
/// that let root read any file taken away (setpriv is util-linux's; its absence fails the test).
fn without_read_override(args: &[&str]) -> std::process::Output {
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap();
    let mut command = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--bounding-set=-dac_override,-dac_read_search", env!("CARGO_BIN_EXE_csp-tch")]);
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_csp-tch"))
    };
    command.args(args).env("OMP_NUM_THREADS", "1").output().expect("run csp-tch (as root: through setpriv)")
}

#[test]
fn an_unreadable_data_folder_is_not_called_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let locked = tmp.path().join("cifar");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let run = without_read_override(&["data", "check", "--data-dir", s(&locked)]);
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("cannot read the folder") && err.contains("check its permissions"), "{err}");
    assert!(!err.contains("does not exist") && !err.contains("remove"), "good data is never to be deleted: {err}");
}

#[test]
fn compare_says_whether_a_rerun_reproduced_a_run_where_it_can() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    csp_tch_ok(&refs(&tiny(&a, &[], &[])));
    csp_tch_ok(&refs(&tiny(&b, &[], &[])));
    let same = csp_tch_ok(&["compare", s(&a), s(&b)]);
    let text = String::from_utf8_lossy(&same.stdout);
    assert!(text.contains("same environment") && text.contains("cspdarknet53-pad0 seed 0: identical"), "{text}");
    // One digit off in the same environment: not reproduced, and where.
    let csv = b.join("cspdarknet53-pad0.csv");
    let rows: Vec<String> = std::fs::read_to_string(&csv).unwrap().lines().map(String::from).collect();
    let mut cells: Vec<String> = rows[1].split(',').map(String::from).collect();
    cells[1] = format!("{}", cells[1].parse::<f64>().unwrap() + 1e-6);
    std::fs::write(&csv, format!("{}\n{}\n", rows[0], cells.join(","))).unwrap();
    let differs = csp_tch(&["compare", s(&a), s(&b)]);
    let text = String::from_utf8_lossy(&differs.stdout);
    assert_eq!(differs.status.code(), Some(1), "{text}");
    assert!(text.contains("differs from epoch 1 (train_loss"), "{text}");
    // Recorded on another CPU: rounding differs there, so that is what it says, and no failure.
    let json = b.join("comparison.json");
    let mut report = read_json(&json);
    report["environment"]["cpu"] = "another CPU".into();
    std::fs::write(&json, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    let elsewhere = csp_tch_ok(&["compare", s(&a), s(&b)]);
    assert!(String::from_utf8_lossy(&elsewhere.stdout).contains("different environments"));
    // Another recipe is not a rerun at all: said, with what differs, whatever the environment.
    let c = tmp.path().join("c");
    csp_tch_ok(&refs(&tiny(&c, &[], &["--label-smoothing", "0.1", "--opt", "sgd"])));
    let other = csp_tch(&["compare", s(&a), s(&c)]);
    let (text, err) = (String::from_utf8_lossy(&other.stdout), String::from_utf8_lossy(&other.stderr));
    assert_eq!(other.status.code(), Some(1), "{text}");
    assert!(text.contains("different recipes") && text.contains("label_smoothing: (none) against 0.1"), "{text}");
    assert!(text.contains("adam: {") && text.contains("sgd: (none) against {"), "{text}");
    assert!(err.contains("ran different recipes"), "{err}");
}

#[test]
fn an_archive_whose_entries_point_outside_it_is_refused_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("escaping.tar.gz");
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(&archive).unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    tar.append_link(&mut link, "cifar-10-batches-bin/up", "../../..").unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_size(4);
    file.set_mode(0o644);
    tar.append_data(&mut file, "cifar-10-batches-bin/up/escaped.txt", &b"pwnd"[..]).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    let md5 = format!("{:x}", md5::compute(std::fs::read(&archive).unwrap()));
    let url = format!("file://{}", archive.display());
    let data = tmp.path().join("data");
    let run = csp_tch(&["data", "download", "--data-dir", s(&data), "--data-url", &url, "--data-md5", &md5]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(err.contains("outside of destination path"), "tar's own reason: {err}");
    assert!(!err.contains(".partial-"), "names no deleted temporary folder: {err}");
    assert!(!data.exists() && !tmp.path().join("escaped.txt").exists());
}

#[test]
fn a_lock_that_cannot_be_written_is_not_left_behind_empty() {
    // A full disk, as a write limit of 8 bytes: writing the lock's pid and command fails (EFBIG, with
    // SIGXFSZ ignored as a full disk's ENOSPC would not signal).
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = tiny(&out, &[], &[]);
    let mut command = common::command(&refs(&args));
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 8, rlim_max: 8 };
            match libc::setrlimit(libc::RLIMIT_FSIZE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let run = command.output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write in it (is the disk full?)"), "{err}");
    assert!(!out.join(".csp-tch.lock").exists(), "no empty lock left");
}
