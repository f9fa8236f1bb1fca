//! A model as an architecture: the layers' names and geometry alone, from which both the modules
//! ([`super::build`]) and the layer table ([`Architecture::describe`]) are made.

use serde::Serialize;

use super::registry::ModelInfo;
use super::{Act, ConvSpec};

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
    pub(super) fn total_stride(&self) -> i64 {
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
