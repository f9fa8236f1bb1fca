//! The `csp-tch` command line: argument parsing and one function per subcommand.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use tch::{nn, Device};

use crate::environment::{device_label, device_name, parse_device, Environment};
use crate::models::{self, Backbone};
use crate::report::{si, thousands};

#[derive(Parser, Debug)]
#[command(name = "csp-tch", version, about = "DarkNet53 versus CSPDarkNet53 on CIFAR-10, on libtorch")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Layer table and totals (params, MACs) of one backbone.
    Summary(SummaryArgs),
    /// csp-tch, tch and libtorch versions; CUDA, cuDNN and CPU threads.
    Env,
}

#[derive(Args, Debug)]
struct SummaryArgs {
    /// Backbone name.
    #[arg(long, value_parser = model_name_parser())]
    model: String,
    /// Square input size in pixels.
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(i64).range(1..=4096))]
    image_size: i64,
    /// Classes in the linear head.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..))]
    classes: i64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Accepts registered model names; clap's error lists the valid ones.
fn model_name_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(models::model_names())
}

/// Parses the arguments, runs the command, prints any error without a backtrace; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Summary(args) => summary(args),
        Command::Env => env(),
    }
}

/// Builds a registered backbone on `device`, checking that `image_size` suits it.
pub fn build_model(
    vs: &nn::VarStore,
    name: &str,
    classes: i64,
    image_size: i64,
) -> Result<Backbone> {
    let info = models::model_info(name)?;
    let model = models::build(&vs.root(), info, classes);
    let min = model.min_image_size();
    if image_size < min {
        bail!(
            "--image-size {image_size} is too small for {name}: its stride-2 convolutions need at \
             least {min} px (a 1x1 final feature map)"
        );
    }
    Ok(model)
}

fn summary(args: SummaryArgs) -> Result<()> {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build_model(&vs, &args.model, args.classes, args.image_size)?;
    let summary = model.describe(args.image_size);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{} ({}), input 3x{}x{}, {} classes",
        summary.model, model.info.about, args.image_size, args.image_size, args.classes
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

fn env() -> Result<()> {
    let e = Environment::detect();
    println!("csp-tch   {}", e.csp_tch);
    println!("tch       {}", e.tch);
    println!("libtorch  {}", e.libtorch);
    println!("CUDA      {} ({} device(s))", if e.cuda_available { "available" } else { "not available" }, e.cuda_devices);
    for i in 0..e.cuda_devices.max(0) as usize {
        println!("  {}  {}", device_label(Device::Cuda(i)), device_name(Device::Cuda(i)));
    }
    match e.cudnn_version {
        Some(v) => println!("cuDNN     {v}"),
        None => println!("cuDNN     not available"),
    }
    println!("CPU       {} ({} threads)", e.cpu, e.cpu_threads);
    println!("default device: {}", device_label(parse_device("auto")?));
    Ok(())
}
