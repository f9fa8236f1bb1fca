//! csp-tch: DarkNet53 versus CSPDarkNet53 on CIFAR-10, on libtorch through tch.
//!
//! - [`models`]: the backbones, their registry and their layer-by-layer summary;
//! - [`environment`]: device choice and version facts;
//! - [`report`]: metric files, the comparison report, number formatting;
//! - [`cli`]: the command line.

pub mod cli;
pub mod environment;
pub mod models;
pub mod report;
