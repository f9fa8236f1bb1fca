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
//! is kept apart, in [`crate::fastpath`].

pub mod timm;
pub mod tutorial;

use anyhow::{bail, Result};
use serde::Serialize;
use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::fastpath::{self, FoldSlot, FoldedBatchNorm};
pub use crate::geometry::{Act, ConvSpec};

/// BatchNorm's epsilon (PaddleClas, PyTorch and timm).
pub const BN_EPS: f64 = 1e-5;

/// One entry of the model registry.
pub struct ModelInfo {
    pub name: &'static str,
    pub about: &'static str,
    /// For a CSP model, the plain network it is compared with.
    pub base: Option<&'static str>,
    /// Whether `run-all` trains it when `--models` is not given (the tutorial's three).
    pub default: bool,
    architecture: fn(&'static ModelInfo, i64) -> Architecture,
}

impl std::fmt::Debug for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every backbone csp-tch knows. Adding one is one entry here.
pub const MODELS: [ModelInfo; 8] = [
    ModelInfo {
        name: "darknet53",
        about: "DarkNet53 as in PaddleClas (the tutorial's baseline)",
        base: None,
        default: true,
        architecture: tutorial::darknet53,
    },
    ModelInfo {
        name: "cspdarknet53",
        about: "CSPDarkNet53 as the tutorial wrote it (1x1 convolutions padded by 1)",
        base: Some("darknet53"),
        default: true,
        architecture: tutorial::cspdarknet53,
    },
    ModelInfo {
        name: "cspdarknet53-pad0",
        about: "CSPDarkNet53 with unpadded 1x1 convolutions (what the CSP split itself saves)",
        base: Some("darknet53"),
        default: true,
        architecture: tutorial::cspdarknet53_pad0,
    },
    ModelInfo {
        name: "cspdarknet53-paper",
        about: "CSPDarkNet53 of the CSPNet paper, as timm defines it (LeakyReLU, cross stages)",
        base: Some("darknet53"),
        default: false,
        architecture: timm::cspdarknet53,
    },
    ModelInfo {
        name: "resnet50",
        about: "ResNet-50 as timm defines it",
        base: None,
        default: false,
        architecture: timm::resnet50,
    },
    ModelInfo {
        name: "cspresnet50",
        about: "CSPResNet-50 of the CSPNet paper, as timm defines it",
        base: Some("resnet50"),
        default: false,
        architecture: timm::cspresnet50,
    },
    ModelInfo {
        name: "resnext50",
        about: "ResNeXt-50 32x4d as timm defines it",
        base: None,
        default: false,
        architecture: timm::resnext50,
    },
    ModelInfo {
        name: "cspresnext50",
        about: "CSPResNeXt-50 of the CSPNet paper, as timm defines it",
        base: Some("resnext50"),
        default: false,
        architecture: timm::cspresnext50,
    },
];

impl ModelInfo {
    /// Smallest square input on which every strided layer still sees real pixels, i.e. a 1x1
    /// final map: the product of the strides (32 for every model here).
    pub fn min_image_size(&'static self) -> i64 {
        self.architecture(1).total_stride()
    }

    /// An error naming `--image-size` when the input is too small for this model.
    pub fn check_image_size(&'static self, image_size: i64) -> Result<()> {
        let min = self.min_image_size();
        if image_size < min {
            bail!(
                "--image-size {image_size} is too small for {}: its strided layers need at least {min} px \
                 (a 1x1 final feature map)",
                self.name
            );
        }
        Ok(())
    }

    /// Its architecture with a `classes`-way head.
    pub fn architecture(&'static self, classes: i64) -> Architecture {
        (self.architecture)(self, classes)
    }
}

/// Names of all registered models, in registry order.
pub fn model_names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// The models `run-all` trains by default: the tutorial's three.
pub fn default_models() -> Vec<&'static str> {
    MODELS.iter().filter(|m| m.default).map(|m| m.name).collect()
}

/// Looks a model up by name; an unknown name is an error listing the valid ones.
pub fn model_info(name: &str) -> Result<&'static ModelInfo> {
    match MODELS.iter().find(|m| m.name == name) {
        Some(info) => Ok(info),
        None => bail!("unknown model '{name}'; valid models: {}", model_names().join(", ")),
    }
}

/// The model a CSP model is compared with, or `None` for a plain one.
pub fn base_of(name: &str) -> Option<&'static str> {
    model_info(name).ok().and_then(|m| m.base)
}

/// A feature map's shape, per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub c: i64,
    pub h: i64,
    pub w: i64,
}

/// How a layer's variables start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ConvInit {
    /// Normal(0, sqrt(2 / fan_in)) (PaddleClas, the tutorial's models).
    KaimingFanIn,
    /// Normal(0, sqrt(2 / fan_out)), fan_out = cout k k (timm's models).
    KaimingFanOut,
}

/// One ConvBNLayer of an architecture: its name, its variables' paths, geometry, activation and start.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub name: String,
    /// Variable paths of the convolution and the BatchNorm (`<name>.conv`, `<name>.bn` in the
    /// tutorial's and CSPNet's naming; ResNet's names them apart, `conv1` and `bn1`).
    pub conv_var: String,
    pub bn_var: String,
    pub conv: ConvSpec,
    pub act: Act,
    pub init: ConvInit,
    /// A BatchNorm that starts at zero (timm's `zero_init_last`: the last layer of a residual
    /// branch, so that each block starts as the identity).
    pub zero_bn: bool,
}

/// A residual block.
#[derive(Clone, Debug)]
pub enum Block<L> {
    /// `x + conv2(conv1(x))`: the tutorial's BasicBlock, timm's DarkBlock.
    Dark { conv1: L, conv2: L },
    /// `act(conv3(conv2(conv1(x))) + shortcut(x))`: ResNet's and CSPNet's bottleneck; `shortcut`
    /// is a 1x1 projection where the block changes the shape, the identity otherwise.
    Bottleneck { conv1: L, conv2: L, conv3: L, shortcut: Option<L>, act: Act },
}

/// One stage of a network.
// A handful of stages per model: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Stage<L> {
    /// Residual blocks after an optional stride-2 entry convolution (DarkNet, ResNet).
    Plain { entry: Option<L>, blocks: Vec<Block<L>> },
    /// The tutorial's CSP stage: the entry's output goes through `part -> blocks -> transition` and
    /// `shortcut`, concatenated and fused.
    TutorialCsp { entry: L, part: L, blocks: Vec<Block<L>>, transition: L, shortcut: L, fusion: L },
    /// CSPNet's cross stage (timm's `CrossStage`): an optional stride-2 convolution, a 1x1 expansion
    /// split in two halves by channel; the second goes through the blocks and `transition_b`, is
    /// concatenated after the first, and `transition` fuses them.
    Cross { down: Option<L>, expand: L, blocks: Vec<Block<L>>, transition_b: L, transition: L },
}

impl<L> Block<L> {
    pub fn layers(&self) -> Vec<&L> {
        match self {
            Block::Dark { conv1, conv2 } => vec![conv1, conv2],
            Block::Bottleneck { conv1, conv2, conv3, shortcut, .. } => {
                [conv1, conv2, conv3].into_iter().chain(shortcut.as_ref()).collect()
            }
        }
    }

    fn map<M>(&self, f: &mut dyn FnMut(&L) -> M) -> Block<M> {
        match self {
            Block::Dark { conv1, conv2 } => Block::Dark { conv1: f(conv1), conv2: f(conv2) },
            Block::Bottleneck { conv1, conv2, conv3, shortcut, act } => Block::Bottleneck {
                conv1: f(conv1),
                conv2: f(conv2),
                conv3: f(conv3),
                shortcut: shortcut.as_ref().map(&mut *f),
                act: *act,
            },
        }
    }
}

impl<L> Stage<L> {
    /// Every ConvBNLayer of the stage, in forward order.
    pub fn layers(&self) -> Vec<&L> {
        fn blocks<L>(blocks: &[Block<L>]) -> Vec<&L> {
            blocks.iter().flat_map(Block::layers).collect()
        }
        match self {
            Stage::Plain { entry, blocks: bs } => entry.iter().chain(blocks(bs)).collect(),
            Stage::TutorialCsp { entry, part, blocks: bs, transition, shortcut, fusion } => {
                [entry, part].into_iter().chain(blocks(bs)).chain([transition, shortcut, fusion]).collect()
            }
            Stage::Cross { down, expand, blocks: bs, transition_b, transition } => {
                down.iter().chain([expand]).chain(blocks(bs)).chain([transition_b, transition]).collect()
            }
        }
    }

    /// The same stage with every layer replaced by `f` of it.
    pub fn map<M>(&self, mut f: impl FnMut(&L) -> M) -> Stage<M> {
        let f = &mut f as &mut dyn FnMut(&L) -> M;
        let blocks = |bs: &[Block<L>], f: &mut dyn FnMut(&L) -> M| bs.iter().map(|b| b.map(f)).collect();
        match self {
            Stage::Plain { entry, blocks: bs } => {
                Stage::Plain { entry: entry.as_ref().map(&mut *f), blocks: blocks(bs, f) }
            }
            Stage::TutorialCsp { entry, part, blocks: bs, transition, shortcut, fusion } => Stage::TutorialCsp {
                entry: f(entry),
                part: f(part),
                blocks: blocks(bs, f),
                transition: f(transition),
                shortcut: f(shortcut),
                fusion: f(fusion),
            },
            Stage::Cross { down, expand, blocks: bs, transition_b, transition } => Stage::Cross {
                down: down.as_ref().map(&mut *f),
                expand: f(expand),
                blocks: blocks(bs, f),
                transition_b: f(transition_b),
                transition: f(transition),
            },
        }
    }
}

/// How the linear head's variables start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HeadInit {
    /// Weight Uniform(-1/sqrt(F), 1/sqrt(F)), bias 0 (PaddleClas).
    UniformZeroBias,
    /// Weight Normal(0, 0.01), bias 0 (timm's CSPNet).
    NormalZeroBias,
    /// PyTorch's `nn.Linear`: weight and bias Uniform(-1/sqrt(F), 1/sqrt(F)) (timm's ResNet).
    Uniform,
}

/// A whole network as names and geometry: stem, stages, pool, linear head.
#[derive(Clone, Debug)]
pub struct Architecture {
    pub info: &'static ModelInfo,
    pub classes: i64,
    pub stem: Vec<LayerSpec>,
    /// A 3x3 stride-2 max-pool after the stem (ResNet's).
    pub stem_pool: bool,
    pub stages: Vec<Stage<LayerSpec>>,
    /// Variable path of the head (`fc`, or timm CSPNet's `head.fc`).
    pub head_var: String,
    pub head_init: HeadInit,
}

/// One row of a model summary.
#[derive(Clone, Debug, Serialize)]
pub struct LayerRow {
    pub name: String,
    /// `[C, H, W]` per image (`[features]` for the head).
    pub output_shape: Vec<i64>,
    /// Trainable parameters of this layer alone.
    pub params: i64,
    /// Multiply-accumulates per image.
    pub macs: i64,
}

/// A model's totals and layer table at one input size.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub model: &'static str,
    pub image_size: i64,
    pub classes: i64,
    pub trainable_params: i64,
    pub paddle_style_params: i64,
    pub macs: i64,
    #[serde(skip)]
    pub stage_outputs: Vec<Shape>,
    /// Side of the smallest feature map any convolution writes (e.g. 1 for DarkNet53 at 32 px).
    #[serde(skip)]
    pub smallest_map: i64,
    pub layers: Vec<LayerRow>,
}

/// The 3x3, stride-2, padding-1 max-pool after ResNet's stem.
fn pooled(size: i64) -> i64 {
    (size + 2 - 3).div_euclid(2) + 1
}

impl LayerSpec {
    /// Appends this ConvBNLayer's row (convolution weights plus BatchNorm's scale and shift) for
    /// `input`; returns its output shape.
    fn describe(&self, input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
        let s = self.conv;
        assert_eq!(input.c, s.cin, "{}: channel mismatch", self.name);
        let out = Shape { c: s.cout, h: s.out_size(input.h), w: s.out_size(input.w) };
        rows.push(LayerRow {
            name: self.name.clone(),
            output_shape: vec![out.c, out.h, out.w],
            params: s.weights() + 2 * s.cout,
            macs: s.weights() * out.h * out.w,
        });
        out
    }
}

impl Block<LayerSpec> {
    fn describe(&self, input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
        let out = match self {
            Block::Dark { conv1, conv2 } => conv2.describe(conv1.describe(input, rows), rows),
            Block::Bottleneck { conv1, conv2, conv3, shortcut, .. } => {
                let out = conv3.describe(conv2.describe(conv1.describe(input, rows), rows), rows);
                let skip = shortcut.as_ref().map_or(input, |s| s.describe(input, rows));
                assert_eq!(skip, out, "residual of mismatched shapes");
                out
            }
        };
        if let Block::Dark { .. } = self {
            assert_eq!(input, out, "residual of mismatched shapes");
        }
        out
    }
}

fn describe_blocks(blocks: &[Block<LayerSpec>], input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
    blocks.iter().fold(input, |x, b| b.describe(x, rows))
}

impl Stage<LayerSpec> {
    fn describe(&self, input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
        match self {
            Stage::Plain { entry, blocks } => {
                let x = entry.as_ref().map_or(input, |e| e.describe(input, rows));
                describe_blocks(blocks, x, rows)
            }
            Stage::TutorialCsp { entry, part, blocks, transition, shortcut, fusion } => {
                let x = entry.describe(input, rows);
                let p = transition.describe(describe_blocks(blocks, part.describe(x, rows), rows), rows);
                let s = shortcut.describe(x, rows);
                assert_eq!((p.h, p.w), (s.h, s.w), "concat of mismatched maps");
                fusion.describe(Shape { c: p.c + s.c, ..p }, rows)
            }
            Stage::Cross { down, expand, blocks, transition_b, transition } => {
                let x = down.as_ref().map_or(input, |d| d.describe(input, rows));
                let x = expand.describe(x, rows);
                let half = Shape { c: x.c / 2, ..x };
                let b = transition_b.describe(describe_blocks(blocks, half, rows), rows);
                transition.describe(Shape { c: half.c + b.c, ..b }, rows)
            }
        }
    }
}

impl Architecture {
    /// Output shape, parameters and MACs of every layer for a square `image_size` input.
    pub fn describe(&self, image_size: i64) -> Summary {
        let mut rows = Vec::new();
        let input = Shape { c: 3, h: image_size, w: image_size };
        let mut x = self.stem.iter().fold(input, |x, l| l.describe(x, &mut rows));
        if self.stem_pool {
            x = Shape { h: pooled(x.h), w: pooled(x.w), ..x };
            rows.push(LayerRow { name: "stem pool".into(), output_shape: vec![x.c, x.h, x.w], params: 0, macs: 0 });
        }
        let mut stage_outputs = Vec::new();
        for stage in &self.stages {
            x = stage.describe(x, &mut rows);
            stage_outputs.push(x);
        }
        let conv_rows: Vec<&LayerRow> = rows.iter().filter(|r| r.params > 0).collect();
        let smallest_map = conv_rows.iter().flat_map(|r| [r.output_shape[1], r.output_shape[2]]).min().unwrap_or(0);
        rows.push(LayerRow { name: "pool".into(), output_shape: vec![x.c, 1, 1], params: 0, macs: 0 });
        rows.push(LayerRow {
            name: self.head_var.clone(),
            output_shape: vec![self.classes],
            params: x.c * self.classes + self.classes,
            macs: x.c * self.classes,
        });
        let bn_channels: i64 = self.layers().iter().map(|l| l.conv.cout).sum();
        let trainable_params = rows.iter().map(|r| r.params).sum::<i64>();
        Summary {
            model: self.info.name,
            image_size,
            classes: self.classes,
            trainable_params,
            // Paddle's summary also counts each BatchNorm's running mean and variance.
            paddle_style_params: trainable_params + 2 * bn_channels,
            macs: rows.iter().map(|r| r.macs).sum(),
            stage_outputs,
            smallest_map,
            layers: rows,
        }
    }

    /// Every ConvBNLayer in forward order.
    pub fn layers(&self) -> Vec<&LayerSpec> {
        self.stem.iter().chain(self.stages.iter().flat_map(|s| s.layers())).collect()
    }

    /// The product of the strides from the input to the last map.
    fn total_stride(&self) -> i64 {
        let mut stride = if self.stem_pool { 2 } else { 1 };
        for stage in &self.stages {
            // The stride of a stage is its first layer's (entry, down, or the first block's conv2).
            let layers = stage.layers();
            stride *= layers.iter().map(|l| l.conv.stride).max().unwrap_or(1);
        }
        stride * self.stem.iter().map(|l| l.conv.stride).product::<i64>()
    }

    /// Channels into the head.
    pub fn head_features(&self) -> i64 {
        self.layers().last().map_or(0, |l| l.conv.cout)
    }
}

/// The layer table and totals of a registered model at `image_size` (computed from its
/// architecture; nothing is allocated).
pub fn summary(info: &'static ModelInfo, classes: i64, image_size: i64) -> Summary {
    info.architecture(classes).describe(image_size)
}

/// A ConvBNLayer's modules: convolution (no bias), BatchNorm, activation.
#[derive(Debug)]
pub struct ConvBnLayer {
    spec: ConvSpec,
    act: Act,
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    /// While a [`FoldedBatchNorm`] guard lives: the layer with its BatchNorm folded in.
    folded: FoldSlot,
}

/// The variable path of a dotted name under `root`.
fn path<'a>(root: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    name.split('.').fold(root.clone(), |p, part| p.sub(part))
}

fn conv_bn(root: &nn::Path, spec: &LayerSpec) -> ConvBnLayer {
    let s = spec.conv;
    let ws_init = match spec.init {
        ConvInit::KaimingFanIn => nn::init::DEFAULT_KAIMING_NORMAL,
        ConvInit::KaimingFanOut => nn::Init::Randn { mean: 0., stdev: (2.0 / (s.cout * s.k * s.k) as f64).sqrt() },
    };
    let conv_config = nn::ConvConfig {
        stride: s.stride,
        padding: s.pad,
        groups: s.groups,
        bias: false,
        ws_init,
        ..Default::default()
    };
    // eps 1e-5, momentum 0.1 in PyTorch's sense (Paddle's 0.9); weight 1 (or 0), bias 0.
    let bn_config = nn::BatchNormConfig {
        eps: BN_EPS,
        ws_init: nn::Init::Const(if spec.zero_bn { 0. } else { 1. }),
        bs_init: nn::Init::Const(0.),
        ..Default::default()
    };
    ConvBnLayer {
        spec: s,
        act: spec.act,
        conv: nn::conv2d(path(root, &spec.conv_var), s.cin, s.cout, s.k, conv_config),
        bn: nn::batch_norm2d(path(root, &spec.bn_var), s.cout, bn_config),
        folded: FoldSlot::default(),
    }
}

impl ModuleT for ConvBnLayer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if !train {
            if let Some(out) = self.folded.forward(self.spec, self.act, xs) {
                return out;
            }
        }
        self.act.apply(fastpath::conv(xs, &self.conv.ws, self.spec).apply_t(&self.bn, train))
    }
}

impl ConvBnLayer {
    pub fn spec(&self) -> ConvSpec {
        self.spec
    }
}

impl ModuleT for Block<ConvBnLayer> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Block::Dark { conv1, conv2 } => xs + xs.apply_t(conv1, train).apply_t(conv2, train),
            Block::Bottleneck { conv1, conv2, conv3, shortcut, act } => {
                let branch = xs.apply_t(conv1, train).apply_t(conv2, train).apply_t(conv3, train);
                let skip = shortcut.as_ref().map_or_else(|| xs.shallow_clone(), |s| xs.apply_t(s, train));
                act.apply(branch + skip)
            }
        }
    }
}

fn forward_blocks(blocks: &[Block<ConvBnLayer>], xs: Tensor, train: bool) -> Tensor {
    blocks.iter().fold(xs, |x, b| x.apply_t(b, train))
}

impl ModuleT for Stage<ConvBnLayer> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Stage::Plain { entry, blocks } => {
                let x = entry.as_ref().map_or_else(|| xs.shallow_clone(), |e| xs.apply_t(e, train));
                forward_blocks(blocks, x, train)
            }
            Stage::TutorialCsp { entry, part, blocks, transition, shortcut, fusion } => {
                let x = xs.apply_t(entry, train);
                let part_out = forward_blocks(blocks, x.apply_t(part, train), train).apply_t(transition, train);
                let shortcut_out = x.apply_t(shortcut, train);
                Tensor::cat(&[part_out, shortcut_out], 1).apply_t(fusion, train)
            }
            Stage::Cross { down, expand, blocks, transition_b, transition } => {
                let x = down.as_ref().map_or_else(|| xs.shallow_clone(), |d| xs.apply_t(d, train));
                let x = x.apply_t(expand, train);
                let half = x.size()[1] / 2;
                let crossed = forward_blocks(blocks, x.narrow(1, half, half), train).apply_t(transition_b, train);
                Tensor::cat(&[x.narrow(1, 0, half), crossed], 1).apply_t(transition, train)
            }
        }
    }
}

/// A whole classification network's modules.
#[derive(Debug)]
pub struct Backbone {
    pub info: &'static ModelInfo,
    pub classes: i64,
    stem: Vec<ConvBnLayer>,
    stem_pool: bool,
    stages: Vec<Stage<ConvBnLayer>>,
    head: nn::Linear,
}

/// Builds a registered model under `root` with a `classes`-way head.
pub fn build(root: &nn::Path, info: &'static ModelInfo, classes: i64) -> Backbone {
    let arch = info.architecture(classes);
    let stem = arch.stem.iter().map(|l| conv_bn(root, l)).collect();
    let stages = arch.stages.iter().map(|s| s.map(|l| conv_bn(root, l))).collect();
    let features = arch.head_features();
    let bound = 1.0 / (features as f64).sqrt();
    let uniform = nn::Init::Uniform { lo: -bound, up: bound };
    let (ws_init, bs_init) = match arch.head_init {
        HeadInit::UniformZeroBias => (uniform, nn::Init::Const(0.)),
        HeadInit::NormalZeroBias => (nn::Init::Randn { mean: 0., stdev: 0.01 }, nn::Init::Const(0.)),
        HeadInit::Uniform => (uniform, uniform),
    };
    let head_config = nn::LinearConfig { ws_init, bs_init: Some(bs_init), bias: true };
    let head = nn::linear(path(root, &arch.head_var), features, classes, head_config);
    Backbone { info, classes, stem, stem_pool: arch.stem_pool, stages, head }
}

impl ModuleT for Backbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = self.stem.iter().fold(xs.shallow_clone(), |x, l| x.apply_t(l, train));
        if self.stem_pool {
            x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        let features = self.stages.iter().fold(x, |x, s| x.apply_t(s, train));
        features.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.head)
    }
}

impl Backbone {
    pub fn stages(&self) -> &[Stage<ConvBnLayer>] {
        &self.stages
    }

    pub fn stem(&self) -> &[ConvBnLayer] {
        &self.stem
    }

    /// Whether the weights are laid out channels-last (NHWC); inputs are then converted to match.
    pub fn is_channels_last(&self) -> bool {
        // The first stem convolution's weight is [C, 3, k, k]: its channel stride is 1 exactly when NHWC.
        self.stem[0].conv.ws.stride()[1] == 1
    }

    /// Every ConvBNLayer in forward order.
    pub fn layers(&self) -> Vec<&ConvBnLayer> {
        self.stem.iter().chain(self.stages.iter().flat_map(|s| s.layers())).collect()
    }

    /// Folds every BatchNorm into its convolution for inference until the guard is dropped (see
    /// [`crate::fastpath`]). Train-mode forwards are unaffected; the fold is a snapshot of the
    /// current weights and statistics: drop the guard before training again.
    pub fn fold_batch_norm(&self) -> FoldedBatchNorm<'_> {
        FoldedBatchNorm::new(self.layers().into_iter().map(|l| (&l.folded, &l.conv.ws, &l.bn)), BN_EPS)
    }

    /// Output shape, parameters and MACs of every layer for a square `image_size` input.
    pub fn describe(&self, image_size: i64) -> Summary {
        summary(self.info, self.classes, image_size)
    }
}
