//! The backbones of TUTORIAL.md: DarkNet53 (PaddleClas) and CSPDarkNet53, built from one ConvBNLayer
//! and one BasicBlock, in the style of tch's `vision/resnet.rs`.
//!
//! Every network is `stem -> 5 stages -> global average pool -> linear head`. A stage opens with a
//! stride-2 ConvBNLayer (`entry`) and continues with a body:
//! - DarkNet53: `n` residual BasicBlocks on the full width;
//! - CSP: the entry's output is split into a part that goes through `csp1 -> blocks -> csp3` and a
//!   shortcut `csp2`; the two are concatenated and fused by a 1x1 ConvBNLayer.
//!
//! A model is first an [`Architecture`]: the layers' names and geometry alone, from which both the
//! modules ([`build`]) and the layer table ([`Architecture::describe`]: shapes, parameters, MACs) are
//! made, so `csp-tch summary` can never disagree with what is trained and describing a model
//! allocates nothing. Layer names mirror the tutorial's (and PaddleClas's), e.g. `stage.0.csp0`,
//! `stage.2.5.1`. How layers compute (kernel taps cut to the live ones, BatchNorm folded, dense
//! matrices for the smallest maps) is kept apart, in [`crate::fastpath`].

use anyhow::{bail, Result};
use serde::Serialize;
use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::fastpath::{self, FoldSlot, FoldedBatchNorm};
pub use crate::geometry::ConvSpec;

/// Width `C` and block count `n` of the five stages, shared by all backbones.
pub const STAGES: [(i64, usize); 5] = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)];
/// Channels out of the stem ConvBNLayer.
const STEM_CHANNELS: i64 = 32;
/// Channels into the linear head (the last stage's width).
pub const HEAD_FEATURES: i64 = STAGES[STAGES.len() - 1].0;
/// BatchNorm's epsilon (PaddleClas and PyTorch default).
pub const BN_EPS: f64 = 1e-5;

/// How a backbone's stages continue after their entry convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageKind {
    /// Residual blocks on the full stage width.
    DarkNet,
    /// Cross Stage Partial split; `pad_1x1` is the padding of the csp1, csp2 and fusion 1x1 convolutions
    /// (the tutorial's code pads them by 1).
    Csp { pad_1x1: i64 },
}

/// One entry of the model registry.
#[derive(Debug)]
pub struct ModelInfo {
    pub name: &'static str,
    pub about: &'static str,
    pub stages: StageKind,
}

/// Every backbone csp-tch knows. Adding one is one entry here.
pub const MODELS: [ModelInfo; 3] = [
    ModelInfo {
        name: "darknet53",
        about: "DarkNet53 as in PaddleClas (the tutorial's baseline)",
        stages: StageKind::DarkNet,
    },
    ModelInfo {
        name: "cspdarknet53",
        about: "CSPDarkNet53 as the tutorial wrote it (1x1 convolutions padded by 1)",
        stages: StageKind::Csp { pad_1x1: 1 },
    },
    ModelInfo {
        name: "cspdarknet53-pad0",
        about: "CSPDarkNet53 with unpadded 1x1 convolutions (what the CSP split itself saves)",
        stages: StageKind::Csp { pad_1x1: 0 },
    },
];

impl ModelInfo {
    /// Smallest square input on which every stride-2 convolution (one per stage) still sees real
    /// pixels, i.e. a 1x1 final map; below it the deep stages compute on padding alone.
    pub fn min_image_size(&self) -> i64 {
        1 << STAGES.len()
    }

    /// An error naming `--image-size` when the input is too small for this model.
    pub fn check_image_size(&self, image_size: i64) -> Result<()> {
        let min = self.min_image_size();
        if image_size < min {
            bail!(
                "--image-size {image_size} is too small for {}: its stride-2 convolutions need at \
                 least {min} px (a 1x1 final feature map)",
                self.name
            );
        }
        Ok(())
    }
}

/// Names of all registered models, in registry order.
pub fn model_names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// Looks a model up by name; an unknown name is an error listing the valid ones.
pub fn model_info(name: &str) -> Result<&'static ModelInfo> {
    match MODELS.iter().find(|m| m.name == name) {
        Some(info) => Ok(info),
        None => bail!("unknown model '{name}'; valid models: {}", model_names().join(", ")),
    }
}

/// A feature map's shape, per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub c: i64,
    pub h: i64,
    pub w: i64,
}

/// One ConvBNLayer of an architecture: its dotted path (the variables' prefix) and its convolution.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub name: String,
    pub conv: ConvSpec,
}

/// The tutorial's BasicBlock(cin, c): 1x1 ConvBNLayer to c, 3x3 ConvBNLayer to 2c, plus the input.
/// `L` is [`LayerSpec`] in an [`Architecture`], [`ConvBnLayer`] in a built [`Backbone`].
#[derive(Clone, Debug)]
pub struct Block<L> {
    pub conv1: L,
    pub conv2: L,
}

/// What follows a stage's stride-2 entry convolution.
// Five stages per model: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Body<L> {
    Residual(Vec<Block<L>>),
    Csp {
        /// csp1: the part that goes through the blocks.
        part: L,
        blocks: Vec<Block<L>>,
        /// csp3: transition after the blocks.
        transition: L,
        /// csp2: the part that skips the blocks.
        shortcut: L,
        /// "stage.k.downsample" in the text: 1x1 fusion of concat(csp3, csp2).
        fusion: L,
    },
}

/// One stage: stride-2 entry ConvBNLayer, then the body.
#[derive(Clone, Debug)]
pub struct Stage<L> {
    pub entry: L,
    pub body: Body<L>,
}

impl<L> Block<L> {
    fn map<M>(&self, f: &mut dyn FnMut(&L) -> M) -> Block<M> {
        Block { conv1: f(&self.conv1), conv2: f(&self.conv2) }
    }
}

impl<L> Stage<L> {
    /// Every ConvBNLayer of the stage, in forward order.
    pub fn layers(&self) -> Vec<&L> {
        let mut layers = vec![&self.entry];
        match &self.body {
            Body::Residual(blocks) => layers.extend(blocks.iter().flat_map(|b| [&b.conv1, &b.conv2])),
            Body::Csp { part, blocks, transition, shortcut, fusion } => {
                layers.push(part);
                layers.extend(blocks.iter().flat_map(|b| [&b.conv1, &b.conv2]));
                layers.extend([transition, shortcut, fusion]);
            }
        }
        layers
    }

    /// The same stage with every layer replaced by `f` of it.
    pub fn map<M>(&self, mut f: impl FnMut(&L) -> M) -> Stage<M> {
        let blocks = |blocks: &[Block<L>], f: &mut dyn FnMut(&L) -> M| blocks.iter().map(|b| b.map(f)).collect();
        let entry = f(&self.entry);
        let body = match &self.body {
            Body::Residual(bs) => Body::Residual(blocks(bs, &mut f)),
            Body::Csp { part, blocks: bs, transition, shortcut, fusion } => Body::Csp {
                part: f(part),
                blocks: blocks(bs, &mut f),
                transition: f(transition),
                shortcut: f(shortcut),
                fusion: f(fusion),
            },
        };
        Stage { entry, body }
    }
}

/// A whole network as names and geometry: stem, five stages, pool, linear head.
#[derive(Clone, Debug)]
pub struct Architecture {
    pub info: &'static ModelInfo,
    pub classes: i64,
    pub stem: LayerSpec,
    pub stages: Vec<Stage<LayerSpec>>,
}

fn layer(name: String, cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> LayerSpec {
    LayerSpec { name, conv: ConvSpec::new(cin, cout, k, stride, pad) }
}

/// `n` BasicBlocks on width `c`, named `<prefix>.0 .. <prefix>.{n-1}`.
fn blocks(prefix: &str, c: i64, n: usize) -> Vec<Block<LayerSpec>> {
    (0..n)
        .map(|i| Block {
            conv1: layer(format!("{prefix}.{i}.0"), c, c / 2, 1, 1, 0),
            conv2: layer(format!("{prefix}.{i}.1"), c / 2, c, 3, 1, 1),
        })
        .collect()
}

/// Stage `k` of width `c` with `n` blocks, fed `cin` channels.
fn stage(kind: StageKind, k: usize, cin: i64, c: i64, n: usize) -> Stage<LayerSpec> {
    let prefix = format!("stage.{k}");
    match kind {
        StageKind::DarkNet => {
            // PaddleClas names the stride-2 convolution after the stage it leaves.
            let entry =
                if k == 0 { "yolo_input.downsample".to_string() } else { format!("stage.{}.downsample", k - 1) };
            Stage { entry: layer(entry, cin, c, 3, 2, 1), body: Body::Residual(blocks(&prefix, c, n)) }
        }
        StageKind::Csp { pad_1x1 } => {
            // Stage 0 keeps the full 64 channels in each part; later stages halve them.
            let part_width = if k == 0 { c } else { c / 2 };
            Stage {
                entry: layer(format!("{prefix}.csp0"), cin, c, 3, 2, 1),
                body: Body::Csp {
                    part: layer(format!("{prefix}.csp1"), c, part_width, 1, 1, pad_1x1),
                    blocks: blocks(&prefix, part_width, n),
                    transition: layer(format!("{prefix}.csp3"), part_width, part_width, 1, 1, 0),
                    shortcut: layer(format!("{prefix}.csp2"), c, part_width, 1, 1, pad_1x1),
                    fusion: layer(format!("{prefix}.downsample"), 2 * part_width, c, 1, 1, pad_1x1),
                },
            }
        }
    }
}

/// The architecture of a registered model with a `classes`-way head.
pub fn architecture(info: &'static ModelInfo, classes: i64) -> Architecture {
    let stem = layer("yolo_input".into(), 3, STEM_CHANNELS, 3, 1, 1);
    let mut cin = STEM_CHANNELS;
    let mut stages = Vec::with_capacity(STAGES.len());
    for (k, &(c, n)) in STAGES.iter().enumerate() {
        stages.push(stage(info.stages, k, cin, c, n));
        cin = c;
    }
    Architecture { info, classes, stem, stages }
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

impl LayerSpec {
    /// Appends this ConvBNLayer's row (convolution weights plus BatchNorm's scale and shift) for
    /// `input`; returns its output shape.
    fn describe(&self, input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
        let s = self.conv;
        assert_eq!(input.c, s.cin, "{}: channel mismatch", self.name);
        let out = Shape { c: s.cout, h: s.out_size(input.h), w: s.out_size(input.w) };
        let weights = s.cout * s.cin * s.k * s.k;
        rows.push(LayerRow {
            name: self.name.clone(),
            output_shape: vec![out.c, out.h, out.w],
            params: weights + 2 * s.cout,
            macs: weights * out.h * out.w,
        });
        out
    }
}

fn describe_blocks(blocks: &[Block<LayerSpec>], input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
    blocks.iter().fold(input, |x, b| b.conv2.describe(b.conv1.describe(x, rows), rows))
}

impl Architecture {
    /// Output shape, parameters and MACs of every layer for a square `image_size` input.
    pub fn describe(&self, image_size: i64) -> Summary {
        let mut rows = Vec::new();
        let mut x = self.stem.describe(Shape { c: 3, h: image_size, w: image_size }, &mut rows);
        let mut stage_outputs = Vec::new();
        for stage in &self.stages {
            let entered = stage.entry.describe(x, &mut rows);
            x = match &stage.body {
                Body::Residual(blocks) => describe_blocks(blocks, entered, &mut rows),
                Body::Csp { part, blocks, transition, shortcut, fusion } => {
                    let p = describe_blocks(blocks, part.describe(entered, &mut rows), &mut rows);
                    let p = transition.describe(p, &mut rows);
                    let s = shortcut.describe(entered, &mut rows);
                    assert_eq!((p.h, p.w), (s.h, s.w), "concat of mismatched maps");
                    fusion.describe(Shape { c: p.c + s.c, ..p }, &mut rows)
                }
            };
            stage_outputs.push(x);
        }
        rows.push(LayerRow { name: "pool".into(), output_shape: vec![x.c, 1, 1], params: 0, macs: 0 });
        rows.push(LayerRow {
            name: "fc".into(),
            output_shape: vec![self.classes],
            params: x.c * self.classes + self.classes,
            macs: x.c * self.classes,
        });
        let conv_rows = &rows[..rows.len() - 2];
        let smallest_map = conv_rows.iter().flat_map(|r| [r.output_shape[1], r.output_shape[2]]).min().unwrap_or(0);
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
        std::iter::once(&self.stem).chain(self.stages.iter().flat_map(|s| s.layers())).collect()
    }
}

/// The layer table and totals of a registered model at `image_size` (computed from its
/// architecture; nothing is allocated).
pub fn summary(info: &'static ModelInfo, classes: i64, image_size: i64) -> Summary {
    architecture(info, classes).describe(image_size)
}

/// The tutorial's ConvBNLayer: Conv2d (no bias) -> BatchNorm -> ReLU, PaddleClas initialisation.
#[derive(Debug)]
pub struct ConvBnLayer {
    spec: ConvSpec,
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    /// While a [`FoldedBatchNorm`] guard lives: the layer with its BatchNorm folded in.
    folded: FoldSlot,
}

/// The variable path of a dotted layer name under `root`.
fn path<'a>(root: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    name.split('.').fold(root.clone(), |p, part| p.sub(part))
}

fn conv_bn(root: &nn::Path, spec: &LayerSpec) -> ConvBnLayer {
    let s = spec.conv;
    let conv_config = nn::ConvConfig {
        stride: s.stride,
        padding: s.pad,
        bias: false,
        // Normal(0, sqrt(2 / (k*k*cin))).
        ws_init: nn::init::DEFAULT_KAIMING_NORMAL,
        ..Default::default()
    };
    // eps 1e-5, momentum 0.1 in PyTorch's sense (Paddle's 0.9); weight 1, bias 0.
    let bn_config = nn::BatchNormConfig {
        eps: BN_EPS,
        ws_init: nn::Init::Const(1.),
        bs_init: nn::Init::Const(0.),
        ..Default::default()
    };
    let p = path(root, &spec.name);
    ConvBnLayer {
        spec: s,
        conv: nn::conv2d(&p / "conv", s.cin, s.cout, s.k, conv_config),
        bn: nn::batch_norm2d(&p / "bn", s.cout, bn_config),
        folded: FoldSlot::default(),
    }
}

impl ModuleT for ConvBnLayer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if !train {
            if let Some(out) = self.folded.forward(self.spec, xs) {
                return out;
            }
        }
        fastpath::conv(xs, &self.conv.ws, self.spec).apply_t(&self.bn, train).relu()
    }
}

impl ConvBnLayer {
    pub fn spec(&self) -> ConvSpec {
        self.spec
    }
}

impl ModuleT for Block<ConvBnLayer> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        xs + xs.apply_t(&self.conv1, train).apply_t(&self.conv2, train)
    }
}

fn forward_blocks(blocks: &[Block<ConvBnLayer>], xs: Tensor, train: bool) -> Tensor {
    blocks.iter().fold(xs, |x, b| x.apply_t(b, train))
}

impl ModuleT for Stage<ConvBnLayer> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = xs.apply_t(&self.entry, train);
        match &self.body {
            Body::Residual(blocks) => forward_blocks(blocks, x, train),
            Body::Csp { part, blocks, transition, shortcut, fusion } => {
                let part_out = forward_blocks(blocks, x.apply_t(part, train), train).apply_t(transition, train);
                let shortcut_out = x.apply_t(shortcut, train);
                Tensor::cat(&[part_out, shortcut_out], 1).apply_t(fusion, train)
            }
        }
    }
}

/// A whole classification network's modules.
#[derive(Debug)]
pub struct Backbone {
    pub info: &'static ModelInfo,
    pub classes: i64,
    stem: ConvBnLayer,
    stages: Vec<Stage<ConvBnLayer>>,
    head: nn::Linear,
}

/// Builds a registered model under `root` with a `classes`-way head.
pub fn build(root: &nn::Path, info: &'static ModelInfo, classes: i64) -> Backbone {
    let arch = architecture(info, classes);
    let stem = conv_bn(root, &arch.stem);
    let stages = arch.stages.iter().map(|s| s.map(|l| conv_bn(root, l))).collect();
    // PyTorch's Linear initialisation of the weight, a zero bias (PaddleClas).
    let bound = 1.0 / (HEAD_FEATURES as f64).sqrt();
    let head_config = nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -bound, up: bound },
        bs_init: Some(nn::Init::Const(0.)),
        bias: true,
    };
    let head = nn::linear(root / "fc", HEAD_FEATURES, classes, head_config);
    Backbone { info, classes, stem, stages, head }
}

impl ModuleT for Backbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let features = self.stages.iter().fold(xs.apply_t(&self.stem, train), |x, s| x.apply_t(s, train));
        features.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.head)
    }
}

impl Backbone {
    pub fn stages(&self) -> &[Stage<ConvBnLayer>] {
        &self.stages
    }

    pub fn stem(&self) -> &ConvBnLayer {
        &self.stem
    }

    /// Whether the weights are laid out channels-last (NHWC); inputs are then converted to match.
    pub fn is_channels_last(&self) -> bool {
        // The stem's weight is [32, 3, 3, 3]: its channel stride is 1 exactly when NHWC.
        self.stem.conv.ws.stride()[1] == 1
    }

    /// Every ConvBNLayer in forward order.
    pub fn layers(&self) -> Vec<&ConvBnLayer> {
        std::iter::once(&self.stem).chain(self.stages.iter().flat_map(|s| s.layers())).collect()
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
