//! csp-tch: DarkNet53 versus CSPDarkNet53 on CIFAR-10, on libtorch through tch.
//!
//! - [`models`]: the backbones as architectures and modules, their registry and layer-by-layer summary;
//! - [`fastpath`]: how their layers compute with less work (live taps, folded BatchNorm, dense matrices);
//! - [`data`]: CIFAR-10's binary layout: check, download, load, subsets, synthetic sets;
//! - [`transform`]: the per-batch resize and normalisation, on the training device;
//! - [`optim`]: Adam (libtorch's fused kernels) with checkpointable state;
//! - [`amp`]: `--amp`'s bf16 or fp16 autocast;
//! - [`onednn`]: oneDNN's inner product, for evaluation on the smallest maps;
//! - [`cuda_graph`]: `--cuda-graphs`, whole steps captured once and replayed;
//! - [`train`]: one model's epochs and evaluation;
//! - [`checkpoint`]: model and optimizer state after every epoch, for exact resumption;
//! - [`run`]: `run-all` and `train`, from configuration to output files;
//! - [`bench`]: timing of train and eval steps;
//! - [`graph_check`]: `check-graphs`, replayed steps against eager ones over a schedule;
//! - [`report`]: metric CSVs, comparison.json / comparison.md, number formatting;
//! - [`seeds`]: `--seeds`, what the spread over seeds says;
//! - [`plot`]: the curves.svg figure;
//! - [`environment`]: device choice, version facts, the allocator setting;
//! - [`cli`]: the command line.

pub mod amp;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cuda_graph;
pub mod data;
pub mod environment;
pub mod fastpath;
pub mod files;
pub mod geometry;
pub mod graph_check;
pub mod metrics;
pub mod models;
pub mod onednn;
pub mod optim;
pub mod plot;
pub mod report;
pub mod run;
pub mod seeds;
mod shim;
pub mod train;
pub mod transform;
pub mod tutorial;
