//! The modules an [`Architecture`] builds: ConvBNLayer, the residual blocks, the stages and the
//! backbone, as tch `ModuleT`s.

use std::sync::Arc;
use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::architecture::*;
use super::fastpath::{self, FoldSlot, FoldedBatchNorm};
use super::registry::{ModelInfo, BN_EPS, BN_MOMENTUM};
use super::sync_bn::{SyncBatchNorm, SyncSlot};
use super::{Act, ConvSpec};

/// A ConvBNLayer's modules: convolution (no bias), BatchNorm, activation.
#[derive(Debug)]
pub struct ConvBnLayer {
    spec: ConvSpec,
    act: Act,
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    /// While a [`FoldedBatchNorm`] guard lives: the layer with its BatchNorm folded in.
    folded: FoldSlot,
    /// `--sync-bn`: its training-mode statistics over every rank's images.
    sync: SyncSlot,
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
    // weight 1 (or 0), bias 0.
    let bn_config = nn::BatchNormConfig {
        eps: BN_EPS,
        momentum: BN_MOMENTUM,
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
        sync: SyncSlot::default(),
    }
}

impl ModuleT for ConvBnLayer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if !train {
            if let Some(out) = self.folded.forward(self.spec, self.act, xs) {
                return out;
            }
        }
        let conv = fastpath::conv(xs, &self.conv.ws, self.spec);
        let synced = if train { self.sync.forward(&conv, &self.bn, BN_MOMENTUM, BN_EPS) } else { None };
        self.act.apply(synced.unwrap_or_else(|| conv.apply_t(&self.bn, train)))
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
    /// [`crate::models::fastpath`]). Train-mode forwards are unaffected; the fold is a snapshot of the
    /// current weights and statistics: drop the guard before training again.
    pub fn fold_batch_norm(&self) -> FoldedBatchNorm<'_> {
        FoldedBatchNorm::new(self.layers().into_iter().map(|l| (&l.folded, &l.conv.ws, &l.bn)), BN_EPS)
    }

    /// `--sync-bn`: every BatchNorm's training statistics over the ranks of `sync`'s group (`None`:
    /// each process's own again).
    pub fn set_sync_batch_norm(&self, sync: Option<Arc<SyncBatchNorm>>) {
        self.layers().into_iter().for_each(|l| l.sync.set(sync.clone()));
    }

    /// Output shape, parameters and MACs of every layer for a square `image_size` input.
    pub fn describe(&self, image_size: i64) -> Summary {
        summary(self.info, self.classes, image_size)
    }
}
