//! Helpers shared by the integration tests: run the binary, make small synthetic data.
#![allow(dead_code)]

pub mod peer;

use csp_tch::config::Normalize;
use csp_tch::config::{Execution, MemoryFormat, Preset, Recipe, RunConfig};
use csp_tch::environment::RunEnvironment;
use csp_tch::train::checkpoint::{self, Meta};
use csp_tch::train::Trainer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use tch::{Device, Kind, Tensor};

/// The csp-tch binary with `args`, on one CPU thread: the harness runs tests two or more at a time,
/// and libtorch's OpenMP threads of parallel runs, each sized to every core, spin against each other
/// (the suite took three times the CPU time).
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_csp-tch"));
    command.args(args).env("OMP_NUM_THREADS", "1");
    command
}

pub fn csp_tch(args: &[&str]) -> Output {
    command(args).output().expect("run csp-tch")
}

/// Runs csp-tch and panics with its stderr unless it succeeds.
pub fn csp_tch_ok(args: &[&str]) -> Output {
    let out = csp_tch(args);
    assert!(out.status.success(), "csp-tch {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The synthetic CIFAR-10 layout (2,000 / 500 distinct images, seed 7) the tests share, read-only:
/// written once into cargo's temporary folder for tests, under a name that changes with the
/// generator's source, and reused by every test and test binary after that.
pub fn synth() -> &'static Path {
    static SHARED: OnceLock<PathBuf> = OnceLock::new();
    SHARED.get_or_init(|| {
        let generator = [include_str!("../../src/data/synth.rs"), include_str!("../../src/data/generator.rs")].concat();
        let version =
            generator.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("synth-2000-500-7-{version:016x}"));
        if !dir.exists() {
            // Written to a staging folder and renamed: another test binary may race us to it.
            if let Err(err) = csp_tch::data::write_synthetic(&dir, 2000, 500, 7) {
                assert!(dir.exists(), "synthetic data: {err:#}");
            }
        }
        dir
    })
}

/// A private copy of [`synth`] under `root`, for a test that damages it.
pub fn synth_copy(root: &Path) -> PathBuf {
    let dir = root.join("synth");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(synth()).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

/// `COMMAND... --data-dir DATA --out OUT --device cpu --image-size 32 --epochs E --train-limit N
/// --test-limit M`, from `[E, N, M]`: a small CPU run; callers add any other flag.
pub fn small_run<'a>(
    command: &[&'a str],
    data: &'a Path,
    out: &'a Path,
    [epochs, train, test]: [&'a str; 3],
) -> Vec<&'a str> {
    let mut args = command.to_vec();
    args.extend([
        "--data-dir",
        s(data),
        "--out",
        s(out),
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--epochs",
        epochs,
        "--train-limit",
        train,
        "--test-limit",
        test,
    ]);
    args
}

/// timm 1.0.31's trainable parameters (`sum(p.numel() for p in m.parameters())`) at 1000 and 10
/// classes, by csp-tch's model name; darknet53 is the tutorial's, which timm's `darknet53` equals.
pub const TIMM_PARAMS: [(&str, i64, i64); 6] = [
    ("resnet50", 25_557_032, 23_528_522),
    ("resnext50", 25_028_904, 23_000_394),
    ("cspresnet50", 21_616_168, 20_601_418),
    ("cspresnext50", 20_569_896, 18_541_386),
    ("cspdarknet53-paper", 27_642_184, 26_627_434),
    ("darknet53", 41_609_928, 40_595_178),
];

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A metrics CSV's rows (header included) without the columns that hold timings, which differ from
/// run to run.
pub fn without_timings(csv: &str) -> Vec<Vec<String>> {
    const TIMINGS: [&str; 5] =
        ["train_ms_per_step", "eval_ms_per_step", "epoch_seconds", "train_images_per_s", "warmup_seconds"];
    let header: Vec<&str> = csv.lines().next().unwrap_or("").split(',').collect();
    assert!(TIMINGS.iter().all(|t| header.contains(t)), "not a metrics CSV header: {header:?}");
    csv.lines()
        .map(|l| l.split(',').zip(&header).filter(|(_, h)| !TIMINGS.contains(h)).map(|(c, _)| c.to_string()).collect())
        .collect()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// libtorch's random generator is global: the tests of one binary that seed it take turns.
static RNG: Mutex<()> = Mutex::new(());

/// This test's turn with the generator (a test that panicked holding it does not block the rest).
pub fn rng_turn() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// One small CPU batch's recipe: batch 8 at 32 px, inputs in [-1, 1].
pub fn tiny_recipe(seed: u64) -> Recipe {
    Recipe { epochs: 1, batch_size: 8, image_size: 32, normalize: Normalize::Unit, seed, ..Recipe::tutorial() }
}

/// `--amp` and `--memory-format` as given, CUDA graphs as by default.
pub fn execution(amp: bool, memory_format: MemoryFormat) -> Execution {
    Execution { amp, memory_format, ..Execution::default() }
}

/// A checkpoint's metadata for a CPU run of `model` under `recipe` and `execution` in `dir`, before
/// any progress (what a trainer's `save_checkpoint` fills in).
pub fn run_meta(model: &str, dir: &Path, recipe: Recipe, execution: Execution) -> Meta {
    let config = RunConfig {
        preset: Preset::Quick,
        models: vec![model.into()],
        recipe,
        execution,
        classes: 10,
        dataset: Default::default(),
        data_dir: dir.to_path_buf(),
        train_limit: None,
        test_limit: None,
        device: "cpu".into(),
        out: dir.to_path_buf(),
        seeds: Vec::new(),
        world_size: 1,
        sync_bn: false,
    };
    Meta {
        format: checkpoint::FORMAT,
        model: model.into(),
        config,
        train_size: 8,
        test_size: 8,
        data: None,
        epochs_done: 0,
        optimizer_steps: 0,
        loss_scaler: None,
        history: Vec::new(),
        environment: RunEnvironment::detect(Device::Cpu, execution.precision(Device::Cpu)),
        cuda_graphs: None,
        cuda_graphs_off: None,
        epoch_progress: None,
    }
}

/// The losses of `steps` train steps of `trainer` on one batch of 8 random images, drawn after
/// seeding the generator with `data_seed` (hold [`rng_turn`]).
pub fn train_on_one_batch(trainer: &mut Trainer, recipe: &Recipe, steps: usize, data_seed: i64) -> Vec<f64> {
    tch::manual_seed(data_seed);
    let images = Tensor::randint(256, [8, 3, 32, 32], (Kind::Uint8, Device::Cpu));
    let labels = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
    let index = Tensor::arange(8, (Kind::Int64, Device::Cpu));
    (0..steps).map(|_| trainer.train_step(&images, &labels, &index, recipe, None).0.double_value(&[])).collect()
}

/// A csp-tch process running in the background, its stderr collected line by line.
pub struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: String,
}

impl Running {
    pub fn spawn(args: &[&str]) -> Running {
        Running::spawn_with(args, std::iter::empty::<(&str, String)>())
    }

    /// [`Running::spawn`] with these environment variables set.
    pub fn spawn_with<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
        args: &[&str],
        envs: impl IntoIterator<Item = (K, V)>,
    ) -> Running {
        Running::start(command(args).envs(envs))
    }

    /// Another program (torchrun) with `args`, on one CPU thread like csp-tch.
    pub fn spawn_program(program: &Path, args: &[&str]) -> Running {
        Running::start(Command::new(program).args(args).env("OMP_NUM_THREADS", "1"))
    }

    fn start(command: &mut Command) -> Running {
        use std::io::BufRead;
        let mut child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run csp-tch");
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || stderr.lines().map_while(Result::ok).try_for_each(|l| send.send(l)));
        Running { child, lines, log: String::new() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line of stderr contains `needle` (panics after five minutes or at the end of the output).
    pub fn wait_for_line(&mut self, needle: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no line with {needle:?} ({e}):\n{}", self.log));
            self.log += &line;
            self.log.push('\n');
            if line.contains(needle) {
                return;
            }
        }
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to end: its exit status and all of its stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        self.log.extend(self.lines.iter().map(|l| l + "\n"));
        (status, self.log)
    }
}
