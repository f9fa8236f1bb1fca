//! The backbones of TUTORIAL.md: DarkNet53 (PaddleClas) and CSPDarkNet53, built from one ConvBNLayer
//! and one BasicBlock, in the style of tch's `vision/resnet.rs`.
//!
//! Every network is `stem -> 5 stages -> global average pool -> linear head`. A stage opens with a
//! stride-2 ConvBNLayer (`entry`) and continues with a body:
//! - DarkNet53: `n` residual BasicBlocks on the full width;
//! - CSP: the entry's output is split into a part that goes through `csp1 -> blocks -> csp3` and a
//!   shortcut `csp2`; the two are concatenated and fused by a 1x1 ConvBNLayer.
//!
//! Layer paths mirror the tutorial's (and PaddleClas's) names, e.g. `stage.0.csp0`, `stage.2.5.1`.
//! `describe` computes each layer's output shape, parameters and MACs from the same definitions that
//! build the modules, so `csp-tch summary` can never disagree with what is trained.

use anyhow::{bail, Result};
use serde::Serialize;
use std::cell::RefCell;
use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::onednn;

/// Width `C` and block count `n` of the five stages, shared by all backbones.
pub const STAGES: [(i64, usize); 5] = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)];
/// Channels out of the stem ConvBNLayer.
const STEM_CHANNELS: i64 = 32;

/// How a backbone's stages are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
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
    pub layout: Layout,
}

/// Every backbone csp-tch knows. Adding one is one entry here.
pub const MODELS: [ModelInfo; 3] = [
    ModelInfo {
        name: "darknet53",
        about: "DarkNet53 as in PaddleClas (the tutorial's baseline)",
        layout: Layout::DarkNet,
    },
    ModelInfo {
        name: "cspdarknet53",
        about: "CSPDarkNet53 as the tutorial wrote it (1x1 convolutions padded by 1)",
        layout: Layout::Csp { pad_1x1: 1 },
    },
    ModelInfo {
        name: "cspdarknet53-pad0",
        about: "CSPDarkNet53 with unpadded 1x1 convolutions (what the CSP split itself saves)",
        layout: Layout::Csp { pad_1x1: 0 },
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

fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// Geometry of one ConvBNLayer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub cin: i64,
    pub cout: i64,
    pub k: i64,
    pub stride: i64,
    pub pad: i64,
}

impl ConvSpec {
    pub fn new(cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> Self {
        ConvSpec { cin, cout, k, stride, pad }
    }

    pub fn out_size(&self, size: i64) -> i64 {
        // Floor division, as libtorch's: a kernel larger than the padded map leaves no output.
        (size + 2 * self.pad - self.k).div_euclid(self.stride) + 1
    }

    /// On an `h x w` map, the kernel taps that touch a real pixel at some output position, as an
    /// equivalent smaller convolution; `None` when that is the whole kernel. A 3x3 convolution
    /// padded by 1 on a 1x1 map (DarkNet53's last stage at 32 px) multiplies 8 of its 9 taps by
    /// padding zeros only: it is the 1x1 convolution with its centre tap.
    pub fn live_taps(&self, h: i64, w: i64) -> Option<LiveTaps> {
        let (rows, pad_h) = self.live_range(h);
        let (cols, pad_w) = self.live_range(w);
        (rows.1 < self.k || cols.1 < self.k).then_some(LiveTaps { rows, cols, padding: [pad_h, pad_w] })
    }

    /// Along one axis of `size` pixels: `((first tap, taps), padding)` of the live taps, or the
    /// whole kernel when cutting it would change the outputs.
    fn live_range(&self, size: i64) -> ((i64, i64), i64) {
        let out = self.out_size(size);
        let live = |tap: &i64| (0..out).any(|o| (0..size).contains(&(o * self.stride - self.pad + tap)));
        let whole = ((0, self.k), self.pad);
        let (Some(first), Some(last)) = ((0..self.k).find(live), (0..self.k).rev().find(live)) else {
            return whole;
        };
        let (taps, pad) = (last - first + 1, self.pad - first);
        let same_outputs = pad >= 0 && ConvSpec { k: taps, pad, ..*self }.out_size(size) == out;
        if same_outputs {
            ((first, taps), pad)
        } else {
            whole
        }
    }

    /// Whether, on an `h x w` map, [`ConvSpec::dense_matrix`] needs no more multiply-adds than the
    /// convolution: it multiplies every output pixel by all `h * w` input pixels, the convolution by
    /// its live taps, so this holds on maps of a pixel or two (3x3 padded by 1 on 2x2: 4 against 9).
    pub fn dense_is_no_larger(&self, h: i64, w: i64) -> bool {
        let taps = self.live_taps(h, w).map_or(self.k * self.k, |live| live.rows.1 * live.cols.1);
        h * w <= taps
    }

    /// The convolution on an `h x w` map as one `[cout*oh*ow, cin*h*w]` matrix: row `(o, i, j)`
    /// holds the tap weights output pixel `(i, j)` of channel `o` gives each input value, so that
    /// flattened NCHW images times its transpose are the flattened NCHW outputs.
    pub fn dense_matrix(&self, weight: &Tensor, h: i64, w: i64) -> Tensor {
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let matrix = Tensor::zeros([self.cout, oh, ow, self.cin, h, w], (weight.kind(), weight.device()));
        let taps = |i: i64| (0..self.k).map(move |tap| (tap, i * self.stride - self.pad + tap));
        for (i, j) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
            for (tap_row, p) in taps(i).filter(|(_, p)| (0..h).contains(p)) {
                for (tap_col, q) in taps(j).filter(|(_, q)| (0..w).contains(q)) {
                    let mut pair = matrix.select(5, q).select(4, p).select(2, j).select(1, i);
                    pair.copy_(&weight.select(3, tap_col).select(2, tap_row));
                }
            }
        }
        matrix.view([self.cout * oh * ow, self.cin * h * w])
    }
}

/// The part of a kernel that can reach real pixels, from [`ConvSpec::live_taps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveTaps {
    /// `(first, count)` of the kernel rows and columns kept.
    pub rows: (i64, i64),
    pub cols: (i64, i64),
    /// Padding of the cut convolution, `[rows, columns]`.
    pub padding: [i64; 2],
}

impl LiveTaps {
    /// `weight` (`[cout, cin, k, k]`) restricted to the live taps; a view, so gradients reach it.
    pub fn cut(&self, weight: &Tensor) -> Tensor {
        weight.narrow(2, self.rows.0, self.rows.1).narrow(3, self.cols.0, self.cols.1)
    }
}

/// BatchNorm's epsilon (PaddleClas and PyTorch default).
const BN_EPS: f64 = 1e-5;

/// The tutorial's ConvBNLayer: Conv2d (no bias) -> BatchNorm -> ReLU, PaddleClas initialisation.
#[derive(Debug)]
pub struct ConvBnLayer {
    name: String,
    spec: ConvSpec,
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    /// While a [`FoldedBatchNorm`] guard lives: the convolution with the BatchNorm's eval-mode
    /// affine map folded in, so inference skips the BatchNorm pass.
    folded: RefCell<Option<Folded>>,
}

/// A convolution with its BatchNorm folded in.
#[derive(Debug)]
struct Folded {
    weight: Tensor,
    bias: Tensor,
    /// How the last input size is computed, kept so that evaluating batch after batch does not
    /// rebuild it every time.
    kernel: Option<(KernelKey, FoldedKernel)>,
}

/// What a [`FoldedKernel`] was built for: the input's `h x w`, and whether oneDNN's inner product
/// applies to it ([`onednn::linear_relu_applies`]).
type KernelKey = (i64, i64, bool);

/// How a folded layer computes one input size.
#[derive(Debug)]
enum FoldedKernel {
    /// The convolution, its weight cut to the live taps ([`ConvSpec::live_taps`]).
    Conv { weight: Tensor, padding: [i64; 2] },
    /// On the CPU, where [`ConvSpec::dense_is_no_larger`]: the whole convolution as one matrix
    /// ([`ConvSpec::dense_matrix`]) through oneDNN's inner product, about twice as fast as its
    /// convolution kernels on maps of a pixel or two (few output pixels leave them little to block).
    Dense { matrix: Tensor, bias: Tensor, out: [i64; 3] },
}

impl Folded {
    fn forward(&mut self, spec: ConvSpec, xs: &Tensor) -> Tensor {
        let [n, _, h, w] = xs.size()[..] else { panic!("a convolution expects NCHW input, got {:?}", xs.size()) };
        let key = (h, w, onednn::linear_relu_applies(xs));
        if self.kernel.as_ref().is_none_or(|(built_for, _)| *built_for != key) {
            self.kernel = Some((key, self.kernel_for(spec, key)));
        }
        match &self.kernel.as_ref().expect("just built").1 {
            FoldedKernel::Conv { weight, padding } => {
                xs.conv2d(weight, Some(&self.bias), [spec.stride], padding, [1], 1).relu()
            }
            FoldedKernel::Dense { matrix, bias, out } => {
                onednn::linear_relu(&xs.flatten(1, -1), matrix, bias).view([n, out[0], out[1], out[2]])
            }
        }
    }

    fn kernel_for(&self, spec: ConvSpec, (h, w, onednn): KernelKey) -> FoldedKernel {
        if onednn && spec.dense_is_no_larger(h, w) {
            let out = [spec.cout, spec.out_size(h), spec.out_size(w)];
            return FoldedKernel::Dense {
                matrix: spec.dense_matrix(&self.weight, h, w),
                bias: self.bias.repeat_interleave_self_int(out[1] * out[2], 0, None),
                out,
            };
        }
        match spec.live_taps(h, w) {
            // A dense copy in the weight's own layout (NCHW or channels-last).
            Some(live) => FoldedKernel::Conv { weight: live.cut(&self.weight).copy(), padding: live.padding },
            None => FoldedKernel::Conv { weight: self.weight.shallow_clone(), padding: [spec.pad; 2] },
        }
    }
}

fn conv_bn(p: nn::Path, spec: ConvSpec) -> ConvBnLayer {
    let conv_config = nn::ConvConfig {
        stride: spec.stride,
        padding: spec.pad,
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
    ConvBnLayer {
        name: path_name(&p),
        spec,
        conv: nn::conv2d(&p / "conv", spec.cin, spec.cout, spec.k, conv_config),
        bn: nn::batch_norm2d(&p / "bn", spec.cout, bn_config),
        folded: RefCell::new(None),
    }
}

impl ModuleT for ConvBnLayer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let s = self.spec;
        if !train {
            if let Some(folded) = self.folded.borrow_mut().as_mut() {
                return folded.forward(s, xs);
            }
        }
        let conv = match s.live_taps(xs.size()[2], xs.size()[3]) {
            Some(live) => xs.conv2d::<Tensor>(&live.cut(&self.conv.ws), None, [s.stride], live.padding, [1], 1),
            None => xs.apply(&self.conv),
        };
        conv.apply_t(&self.bn, train).relu()
    }
}

impl ConvBnLayer {
    pub fn spec(&self) -> ConvSpec {
        self.spec
    }

    /// Folds the eval-mode BatchNorm into the convolution:
    /// `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * gamma / sqrt(var + eps)`.
    fn fold(&self) {
        let bn = &self.bn;
        let (gamma, beta) = (bn.ws.as_ref().expect("affine"), bn.bs.as_ref().expect("affine"));
        let folded = tch::no_grad(|| {
            let scale = gamma / (&bn.running_var + BN_EPS).sqrt();
            let weight = &self.conv.ws * scale.view([-1, 1, 1, 1]);
            Folded { weight, bias: beta - &bn.running_mean * scale, kernel: None }
        });
        *self.folded.borrow_mut() = Some(folded);
    }

    fn unfold(&self) {
        *self.folded.borrow_mut() = None;
    }

    fn describe(&self, input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
        let s = self.spec;
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

/// The tutorial's BasicBlock(cin, c): 1x1 ConvBNLayer to c, 3x3 ConvBNLayer to 2c, plus the input.
#[derive(Debug)]
pub struct BasicBlock {
    conv1: ConvBnLayer,
    conv2: ConvBnLayer,
}

fn basic_block(p: nn::Path, cin: i64, c: i64) -> BasicBlock {
    assert_eq!(cin, 2 * c, "BasicBlock adds its input: needs cin = 2c");
    BasicBlock {
        conv1: conv_bn(&p / "0", ConvSpec::new(cin, c, 1, 1, 0)),
        conv2: conv_bn(&p / "1", ConvSpec::new(c, 2 * c, 3, 1, 1)),
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        xs + xs.apply_t(&self.conv1, train).apply_t(&self.conv2, train)
    }
}

impl BasicBlock {
    fn layers(&self) -> [&ConvBnLayer; 2] {
        [&self.conv1, &self.conv2]
    }

    fn describe(&self, input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
        let mid = self.conv1.describe(input, rows);
        self.conv2.describe(mid, rows)
    }
}

/// `n` BasicBlocks on width `c`, named `<p>.0 .. <p>.{n-1}`.
fn blocks(p: &nn::Path, c: i64, n: usize) -> Vec<BasicBlock> {
    (0..n).map(|i| basic_block(p / i, c, c / 2)).collect()
}

fn forward_blocks(blocks: &[BasicBlock], xs: Tensor, train: bool) -> Tensor {
    blocks.iter().fold(xs, |x, b| x.apply_t(b, train))
}

/// What follows a stage's stride-2 entry convolution.
// Five stages per model: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Body {
    Residual(Vec<BasicBlock>),
    Csp {
        /// csp1: the part that goes through the blocks.
        part: ConvBnLayer,
        blocks: Vec<BasicBlock>,
        /// csp3: transition after the blocks.
        transition: ConvBnLayer,
        /// csp2: the part that skips the blocks.
        shortcut: ConvBnLayer,
        /// "stage.k.downsample" in the text: 1x1 fusion of concat(csp3, csp2).
        fusion: ConvBnLayer,
    },
}

/// One stage: stride-2 entry ConvBNLayer, then the body.
#[derive(Debug)]
pub struct Stage {
    entry: ConvBnLayer,
    body: Body,
}

/// Stage `k` of width `c` with `n` blocks, fed `cin` channels.
fn stage(root: &nn::Path, layout: Layout, k: usize, cin: i64, c: i64, n: usize) -> Stage {
    let p = root / "stage" / k;
    let entry_spec = ConvSpec::new(cin, c, 3, 2, 1);
    match layout {
        Layout::DarkNet => {
            // PaddleClas names the stride-2 convolution after the stage it leaves.
            let entry_path =
                if k == 0 { root / "yolo_input" / "downsample" } else { root / "stage" / (k - 1) / "downsample" };
            Stage { entry: conv_bn(entry_path, entry_spec), body: Body::Residual(blocks(&p, c, n)) }
        }
        Layout::Csp { pad_1x1 } => {
            // Stage 0 keeps the full 64 channels in each part; later stages halve them.
            let h = if k == 0 { c } else { c / 2 };
            Stage {
                entry: conv_bn(&p / "csp0", entry_spec),
                body: Body::Csp {
                    part: conv_bn(&p / "csp1", ConvSpec::new(c, h, 1, 1, pad_1x1)),
                    blocks: blocks(&p, h, n),
                    transition: conv_bn(&p / "csp3", ConvSpec::new(h, h, 1, 1, 0)),
                    shortcut: conv_bn(&p / "csp2", ConvSpec::new(c, h, 1, 1, pad_1x1)),
                    fusion: conv_bn(&p / "downsample", ConvSpec::new(2 * h, c, 1, 1, pad_1x1)),
                },
            }
        }
    }
}

impl ModuleT for Stage {
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

impl Stage {
    /// Every ConvBNLayer of the stage, in forward order.
    pub fn layers(&self) -> Vec<&ConvBnLayer> {
        let mut layers = vec![&self.entry];
        match &self.body {
            Body::Residual(blocks) => layers.extend(blocks.iter().flat_map(|b| b.layers())),
            Body::Csp { part, blocks, transition, shortcut, fusion } => {
                layers.push(part);
                layers.extend(blocks.iter().flat_map(|b| b.layers()));
                layers.extend([transition, shortcut, fusion]);
            }
        }
        layers
    }

    fn describe(&self, input: Shape, rows: &mut Vec<LayerRow>) -> Shape {
        let x = self.entry.describe(input, rows);
        match &self.body {
            Body::Residual(blocks) => blocks.iter().fold(x, |s, b| b.describe(s, rows)),
            Body::Csp { part, blocks, transition, shortcut, fusion } => {
                let p = blocks.iter().fold(part.describe(x, rows), |s, b| b.describe(s, rows));
                let p = transition.describe(p, rows);
                let s = shortcut.describe(x, rows);
                assert_eq!((p.h, p.w), (s.h, s.w), "concat of mismatched maps");
                fusion.describe(Shape { c: p.c + s.c, ..p }, rows)
            }
        }
    }
}

/// A whole classification network: stem, five stages, pool, linear head.
#[derive(Debug)]
pub struct Backbone {
    pub info: &'static ModelInfo,
    pub classes: i64,
    stem: ConvBnLayer,
    stages: Vec<Stage>,
    head: nn::Linear,
}

/// The layer table and totals of a registered model at `image_size`, from a throwaway CPU build.
pub fn summary(info: &'static ModelInfo, classes: i64, image_size: i64) -> Summary {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    build(&vs.root(), info, classes).describe(image_size)
}

/// Channels into the linear head (the last stage's width).
pub const HEAD_FEATURES: i64 = STAGES[STAGES.len() - 1].0;

/// Builds a registered model under `p` with a `classes`-way head.
pub fn build(p: &nn::Path, info: &'static ModelInfo, classes: i64) -> Backbone {
    let stem = conv_bn(p / "yolo_input", ConvSpec::new(3, STEM_CHANNELS, 3, 1, 1));
    let mut cin = STEM_CHANNELS;
    let mut stages = Vec::with_capacity(STAGES.len());
    for (k, &(c, n)) in STAGES.iter().enumerate() {
        stages.push(stage(p, info.layout, k, cin, c, n));
        cin = c;
    }
    let bound = 1.0 / (cin as f64).sqrt();
    let head_config = nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -bound, up: bound },
        bs_init: Some(nn::Init::Const(0.)),
        bias: true,
    };
    let head = nn::linear(p / "fc", cin, classes, head_config);
    Backbone { info, classes, stem, stages, head }
}

impl ModuleT for Backbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let features = self.stages.iter().fold(xs.apply_t(&self.stem, train), |x, s| x.apply_t(s, train));
        features.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.head)
    }
}

impl Backbone {
    pub fn stages(&self) -> &[Stage] {
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

    /// Folds every BatchNorm into its convolution for inference until the guard is dropped.
    /// Eval-mode forwards then run one biased convolution per layer instead of convolution and
    /// BatchNorm; train-mode forwards are unaffected. The fold is a snapshot of the current
    /// weights and statistics: drop the guard before training again.
    pub fn fold_batch_norm(&self) -> FoldedBatchNorm<'_> {
        let layers = self.layers();
        for layer in &layers {
            layer.fold();
        }
        FoldedBatchNorm { layers }
    }

    /// Output shape, parameters and MACs of every layer for a square `image_size` input.
    pub fn describe(&self, image_size: i64) -> Summary {
        let mut rows = Vec::new();
        let input = Shape { c: 3, h: image_size, w: image_size };
        let mut stage_outputs = Vec::new();
        let mut x = self.stem.describe(input, &mut rows);
        for stage in &self.stages {
            x = stage.describe(x, &mut rows);
            stage_outputs.push(x);
        }
        rows.push(LayerRow { name: "pool".into(), output_shape: vec![x.c, 1, 1], params: 0, macs: 0 });
        let head_params = x.c * self.classes + self.classes;
        rows.push(LayerRow {
            name: "fc".into(),
            output_shape: vec![self.classes],
            params: head_params,
            macs: x.c * self.classes,
        });
        let bn_channels: i64 = self.layers().iter().map(|l| l.spec.cout).sum();
        let conv_rows = &rows[..rows.len() - 2];
        let smallest_map = conv_rows.iter().flat_map(|r| [r.output_shape[1], r.output_shape[2]]).min().unwrap_or(0);
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
}

/// Keeps a backbone's BatchNorms folded into its convolutions while it lives.
pub struct FoldedBatchNorm<'a> {
    layers: Vec<&'a ConvBnLayer>,
}

impl Drop for FoldedBatchNorm<'_> {
    fn drop(&mut self) {
        for layer in &self.layers {
            layer.unfold();
        }
    }
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
