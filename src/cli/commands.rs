//! The bodies of the commands that are not runs (`run-all`, `train` and `report` are [`crate::run`]'s):
//! summary, env, data check, eval, bench, check-graphs, and how each prints.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use tch::Device;

use super::{BenchArgs, CheckGraphsArgs, EvalArgs, Role, SummaryArgs};
use crate::bench::Mode;
use crate::config::{CudaGraphs, DataOn, DatasetSpec};
use crate::data::{self, Access};
use crate::environment::{device_label, device_name, parse_device, Environment};
use crate::models;
use crate::report::{si, thousands};
use crate::train::checkpoint::Weights;
use crate::train::distributed;
use crate::train::ClassAccuracy;

pub(super) fn summary(args: SummaryArgs) -> Result<()> {
    let info = models::model_info(&args.model)?;
    info.check_image_size(args.image_size)?;
    let summary = models::summary(info, args.classes, args.image_size);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{} ({}), input 3x{}x{}, {} classes",
        summary.model, info.about, args.image_size, args.image_size, args.classes
    );
    println!("{:<28} {:>18} {:>12} {:>14}", "layer", "output shape", "params", "MACs");
    for row in &summary.layers {
        let shape = format!("{:?}", row.output_shape);
        println!("{:<28} {:>18} {:>12} {:>14}", row.name, shape, thousands(row.params), si(row.macs as f64));
    }
    println!("trainable params:     {:>14}", thousands(summary.trainable_params));
    println!(
        "paddle-style params:  {:>14}  (trainable + BatchNorm running mean and variance)",
        thousands(summary.paddle_style_params)
    );
    println!("MACs per image:       {:>14}  (convolutions + linear head)", format!("{}MAC", si(summary.macs as f64)));
    Ok(())
}

pub(super) fn env() -> Result<()> {
    let e = Environment::detect();
    println!("csp-tch   {}", e.csp_tch);
    println!("tch       {}", e.tch);
    println!("libtorch  {}", e.libtorch);
    println!(
        "CUDA      {} ({} device(s))",
        if e.cuda_available { "available" } else { "not available" },
        e.cuda_devices
    );
    for i in 0..e.cuda_devices.max(0) as usize {
        println!("  {}  {}", device_label(Device::Cuda(i)), device_name(Device::Cuda(i)));
    }
    match e.cudnn_version {
        Some(v) => println!("cuDNN     {v}"),
        None => println!("cuDNN     not available"),
    }
    println!("CPU       {} ({} threads)", e.cpu, e.cpu_threads);
    let device = parse_device("auto")?;
    println!("default device: {}", device_label(device));
    let amp = match crate::config::Precision::for_run(true, device) {
        crate::config::Precision::Bf16 => "bf16 autocast",
        crate::config::Precision::Fp16 => "fp16 autocast with loss scaling (no native bf16 on this GPU)",
        crate::config::Precision::Fp32 => "no effect (fp32 on the CPU)",
    };
    println!("--amp there: {amp}");
    match crate::train::cuda_graph::built_with_cuda_graphs() {
        true => println!("CUDA graphs: available in this build"),
        false => println!("CUDA graphs: not in this build ({})", crate::train::cuda_graph::MISSING_REASON),
    }
    println!(
        "{}",
        crate::train::cuda_graph::decision_line(CudaGraphs::Auto, device, crate::config::Precision::Fp32, None)?
    );
    let nccl = if distributed::nccl_built() { "NCCL (CUDA) and Gloo (CPU)" } else { "Gloo only (built without NCCL)" };
    println!("data-parallel: c10d process groups, {nccl}; under torchrun or --nproc-per-node");
    match data::decode::jpeg_simd() {
        true => println!("JPEG decoder: libjpeg-turbo with its SIMD kernels"),
        false => println!("JPEG decoder: libjpeg-turbo's plain C (built without nasm, or no SIMD on this CPU; the same pixels, slower)"),
    }
    Ok(())
}

/// `data check`: the dataset read as a run at `image_size` px would read it (image files decoded
/// into the cache, so that such a run finds them there).
pub(super) fn data_check(spec: &DatasetSpec, dir: &Path, access: &Access, image_size: i64) -> Result<()> {
    let data = data::load(spec, dir, access, image_size)?;
    let counts = |labels: &tch::Tensor| {
        Vec::<i64>::try_from(labels.bincount::<tch::Tensor>(None, data.classes())).unwrap_or_default()
    };
    let (train, test) = (counts(&data.train_labels), counts(&data.test_labels));
    let info = &data.info;
    println!(
        "{}: {} train ({}) / {} test ({}) images, {} classes",
        dir.display(),
        data.train_len(),
        info.train_split,
        data.test_len(),
        info.test_split,
        data.classes()
    );
    println!("{:<16} {:>8} {:>8}", "class", "train", "test");
    for (c, name) in data.class_names.iter().enumerate() {
        println!("{name:<16} {:>8} {:>8}", train[c], test[c]);
    }
    Ok(())
}

/// What `csp-tch eval` reports (`--json` prints it as is).
#[derive(serde::Serialize)]
struct EvalReport {
    checkpoint: PathBuf,
    model: String,
    epochs_done: usize,
    data_dir: PathBuf,
    test_images: usize,
    device: String,
    /// `trained` or `ema` (`--ema`: the run's averaged weights).
    weights: &'static str,
    loss: f64,
    accuracy: f64,
    per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]` counts.
    confusion: Vec<Vec<i64>>,
}

pub(super) fn eval(args: EvalArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let weights = if args.ema { Weights::Ema } else { Weights::Trained };
    let (meta, _vs, model) = crate::train::checkpoint::load_model(&args.checkpoint, device, weights)?;
    let data_dir = args.data_dir.unwrap_or_else(|| meta.config.data_dir.clone());
    let test_limit = args.test_limit.map_or(meta.config.test_limit, |l| l.0);
    let (spec, recipe) = (&meta.config.dataset, &meta.config.recipe);
    let access = Access { cache_dir: super::default_cache_dir(&args.cache_dir), ..Access::default() };
    let full = data::load(spec, &data_dir, &access, recipe.image_size)?;
    if full.classes() != meta.config.classes {
        bail!(
            "{} was trained on {} classes; {} holds {} ({:?}): evaluate it on the data it was trained for",
            args.checkpoint.display(),
            meta.config.classes,
            data_dir.display(),
            full.classes(),
            spec.name
        );
    }
    let (cifar, placed) = crate::train::place(full.limit(None, test_limit, recipe.seed)?, device, DataOn::Auto);
    if let Some(line) = placed {
        eprintln!("{line}");
    }
    let precision = meta.config.execution.precision(device);
    let e = crate::train::evaluate(&model, &cifar, &meta.config.recipe, precision)?;
    let per_class = e.per_class(&cifar.class_names);
    let report = EvalReport {
        checkpoint: args.checkpoint,
        model: meta.model,
        epochs_done: meta.epochs_done,
        data_dir,
        test_images: cifar.test_len(),
        device: device_label(device),
        weights: if args.ema { "ema" } else { "trained" },
        loss: e.loss,
        accuracy: e.accuracy,
        per_class,
        confusion: e.confusion,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_eval(&report);
    }
    Ok(())
}

fn print_eval(r: &EvalReport) {
    println!(
        "{}{} after {} epoch(s), on {} test images from {} ({})",
        r.model,
        if r.weights == "ema" { " (its EMA weights)" } else { "" },
        r.epochs_done,
        r.test_images,
        r.data_dir.display(),
        r.device
    );
    println!("test loss {:.4}, top-1 accuracy {:.4}\n", r.loss, r.accuracy);
    println!("{:<14} {:>7} {:>9}", "class", "images", "accuracy");
    for c in &r.per_class {
        println!("{:<14} {:>7} {:>9.4}", format!("{} {}", c.class, c.name), c.images, c.accuracy);
    }
    println!("\nconfusion matrix (rows: true class, columns: predicted class)");
    print!("{:<14}", "");
    for c in 0..r.confusion.len() {
        print!(" {c:>6}");
    }
    println!();
    for (c, row) in r.confusion.iter().enumerate() {
        print!("{:<14}", format!("{c} {}", r.per_class[c].name));
        for count in row {
            print!(" {count:>6}");
        }
        println!();
    }
}

pub(super) fn bench(args: BenchArgs) -> Result<()> {
    let config = args.step.config(args.acceleration.execution(), args.steps, args.warmup, args.mode, args.breakdown)?;
    let place = match args.parallel.role(|| distributed::check_execution(&config.execution, false))? {
        Role::Launched => return Ok(()),
        Role::Worker(place) => place,
    };
    let (config, group) = match place {
        None => (config, None),
        Some(place) => {
            let spec = if config.device.is_cuda() { "cuda" } else { "cpu" };
            let (device, place) = distributed::rank_device(spec, &config.execution, place, false)?;
            let group = distributed::Group::join(&place, device)?;
            (crate::bench::BenchConfig { device, ..config }, Some(std::rc::Rc::new(group)))
        }
    };
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let result = crate::bench::run(&config, group)?;
    if rank != 0 {
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_bench(&result);
    }
    Ok(())
}

fn print_bench(r: &crate::bench::BenchResult) {
    println!(
        "{} {:?} {} px, batch {}, {} ({} threads): {:.1} ms/step, {:.1} images/s, {:.1} GFLOP/s (median of {} \
         steps after {} warm-up)",
        r.model,
        r.mode,
        r.image_size,
        r.batch_size,
        r.device,
        r.threads,
        r.ms_per_step,
        r.images_per_s,
        r.gflops,
        r.steps,
        r.warmup
    );
    if let Some(world) = r.world_size {
        let backend = r.backend.unwrap_or("?");
        let allreduce = match r.allreduce_ms_per_step {
            None => "the gradient allreduce inside the recorded steps".to_string(),
            Some(ms) => {
                let overlap = r.allreduce_overlap.map_or(String::from("after the backward pass"), |o| {
                    format!(
                        "overlapped: {:.0}% of {:.0} buckets launched during the backward pass",
                        100.0 * o.launched_during_backward,
                        o.buckets_per_step
                    )
                });
                format!("{ms:.1} ms/step waiting for the gradient allreduce (rank 0; {overlap})")
            }
        };
        println!("  data-parallel: {world} processes over {backend}, {allreduce}");
    }
    if let Some(p) = &r.phases_ms {
        let total = p.transform_ms + p.forward_ms + p.backward_ms + p.optimizer_ms;
        for (phase, ms) in [
            ("transform", p.transform_ms),
            ("forward", p.forward_ms),
            ("backward", p.backward_ms),
            ("optimizer", p.optimizer_ms),
        ] {
            println!("  {phase:<10} {ms:>9.1} ms  {:>5.1}%", 100.0 * ms / total);
        }
    }
}

pub(super) fn check_graphs(args: CheckGraphsArgs) -> Result<()> {
    let config = args.step.config(args.numerics.execution(), 0, 0, Mode::Train, false)?;
    let check = crate::graph_check::check_graphs(&config)?;
    if args.json {
        println!("{}", serde_json::to_string(&check)?);
    } else {
        println!(
            "{} on {} ({:?}), {} scheduled operations, {}:",
            check.model,
            check.device,
            check.precision,
            check.schedule.len(),
            if check.replayed { "eager twice against replayed" } else { "eager three times (no CUDA graphs here)" },
        );
        for c in &check.compared {
            println!(
                "  {:<22} graphs {:.2e}, floor {:.2e}, bound {:.2e} ({}): {}",
                c.quantity,
                c.graphs,
                c.floor,
                c.bound,
                c.measure,
                if c.ok { "ok" } else { "DIFFERENT" }
            );
        }
    }
    if !check.ok {
        let wrong: Vec<&str> = check.compared.iter().filter(|c| !c.ok).map(|c| c.quantity).collect();
        bail!("replayed steps differ from eager ones beyond the noise floor: {}", wrong.join(", "));
    }
    Ok(())
}

pub(super) fn compare(a: &std::path::Path, b: &std::path::Path, json: bool) -> Result<()> {
    let comparison = crate::report::compare::compare(&crate::files::OutDir::new(a), &crate::files::OutDir::new(b))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
    } else {
        print!("{}", comparison.text());
    }
    if !comparison.recipe_differences.is_empty() {
        bail!("{} and {} ran different recipes; neither reproduces the other", a.display(), b.display());
    }
    if !comparison.reproduced() {
        bail!("{} did not reproduce {} in the same environment", b.display(), a.display());
    }
    Ok(())
}
