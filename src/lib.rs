//! csp-tch: DarkNet53 versus CSPDarkNet53 on CIFAR-10, on libtorch through tch.
//!
//! The layers, each a folder, with dependencies pointing down only (`cli` at the top):
//! - [`cli`]: the command line: arguments checked into typed settings, one function per command;
//! - [`run`]: `run-all` and `train`, from settings to the files of a run folder; `report`'s rebuild;
//! - [`bench`], [`graph_check`]: timing of train and eval steps; `check-graphs`;
//! - [`train`]: one model's steps, epochs and evaluation, with its optimizers, schedules, EMA,
//!   mixed precision, CUDA graphs, data placement, checkpoints and per-epoch metrics;
//! - [`models`]: the backbones as architectures and modules, their registry and layer-by-layer
//!   summary, and how their layers compute with less work;
//! - [`data`]: the datasets (CIFAR-10 and CIFAR-100 binary layouts, Flowers-102, image folders):
//!   check, download, decode once into a cache, subsets, synthetic sets, and the per-batch transform
//!   and augmentation;
//! - [`report`]: the metric CSVs, comparison.json / .md, the report over seeds, curves.svg, the
//!   tutorial's figures;
//! - [`native`]: the C++ shim for what tch does not bind (every `extern "C"` declaration);
//! - beside them: [`config`] (the configuration types), [`environment`] (device, versions, memory),
//!   [`files`] (atomic writes, staging folders, the output-folder lock).

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod environment;
pub mod files;
pub mod graph_check;
pub mod models;
mod native;
pub mod report;
pub mod run;
pub mod train;
