//! The backbones: the tutorial's DarkNet53 and CSPDarkNet53 ([`tutorial`]), and the CSPNet paper's
//! pairs as timm defines them, ResNet-50 / ResNeXt-50 and their CSP versions, and the paper's
//! CSPDarkNet53 ([`timm`]). In the style of tch's `vision/resnet.rs` and timm's `cspnet.py`.
//!
//! Every network is `stem -> stages -> global average pool -> linear head`, built from one
//! ConvBNLayer (convolution, BatchNorm, activation) and two residual blocks:
//! - [`Block::Dark`]: `x + conv2(conv1(x))` (the tutorial's BasicBlock, timm's DarkBlock);
//! - [`Block::Bottleneck`]: `act(conv3(conv2(conv1(x))) + shortcut(x))` (ResNet's, CSPNet's).
//!
//! A stage is one of three [`Stage`]s: plain residual blocks after an optional stride-2 convolution
//! (DarkNet, ResNet), the tutorial's CSP split, or CSPNet's cross stage.
//!
//! A model is first an [`Architecture`]: the layers' names and geometry alone, from which both the
//! modules ([`build`]) and the layer table ([`Architecture::describe`]: shapes, parameters, MACs) are
//! made, so `csp-tch summary` can never disagree with what is trained and describing a model
//! allocates nothing. Variable names are the reference's: the tutorial's (PaddleClas's) for its
//! models, timm's for the others, so a checkpoint loads into timm's model as it is. How layers
//! compute (kernel taps cut to the live ones, BatchNorm folded, dense matrices for the smallest maps)
//! is kept apart, in [`crate::models::fastpath`].

mod architecture;
pub mod fastpath;
pub mod geometry;
mod modules;
pub mod onednn;
mod registry;
pub mod sync_bn;
pub mod timm;
pub mod tutorial;

pub use architecture::*;
pub use geometry::{Act, ConvSpec};
pub use modules::{build, Backbone, ConvBnLayer};
pub use registry::*;
