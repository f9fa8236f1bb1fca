//! csp-tch: DarkNet53 versus CSPDarkNet53 on CIFAR-10, on libtorch through tch.
//!
//! - [`models`]: the backbones, their registry and their layer-by-layer summary;
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
//! - [`report`]: metric CSVs, comparison.json / comparison.md, number formatting;
//! - [`plot`]: the curves.svg figure;
//! - [`environment`]: device choice, version facts, the allocator setting;
//! - [`cli`]: the command line.

pub mod amp;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod cuda_graph;
pub mod data;
pub mod environment;
pub mod models;
pub mod onednn;
pub mod optim;
pub mod plot;
pub mod report;
pub mod run;
mod shim;
pub mod train;
pub mod transform;
