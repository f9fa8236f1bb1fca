//! The CSPNet paper's pairs as timm 1.0 defines them: ResNet-50 and ResNeXt-50 32x4d (timm's
//! `resnet.py`), their CSP versions and the paper's CSPDarkNet53 (timm's `cspnet.py`, whose models use
//! LeakyReLU). Variable names are timm's, so a csp-tch checkpoint loads into timm's model as it is,
//! and so is the initialisation: convolutions Normal(0, sqrt(2 / fan_out)), the last BatchNorm of every
//! residual branch at zero (`zero_init_last`), the head as timm leaves it.

use super::{Act, Architecture, Block, ConvInit, ConvSpec, HeadInit, LayerSpec, ModelInfo, Stage};

/// timm's `ConvNormAct`: variables `<name>.conv`, `<name>.bn`; padding `(stride - 1 + k - 1) / 2`.
fn conv_norm_act(name: String, cin: i64, cout: i64, k: i64, stride: i64, act: Act) -> LayerSpec {
    LayerSpec {
        conv_var: format!("{name}.conv"),
        bn_var: format!("{name}.bn"),
        name,
        conv: ConvSpec::new(cin, cout, k, stride, (stride - 1 + k - 1) / 2),
        act,
        init: ConvInit::KaimingFanOut,
        zero_bn: false,
    }
}

/// The last layer of a residual branch: no activation, its BatchNorm starting at zero.
fn last_of_branch(layer: LayerSpec) -> LayerSpec {
    LayerSpec { act: Act::Linear, zero_bn: true, ..layer }
}

/// ResNet's layers name convolution and BatchNorm apart: `<prefix>.conv<i>` and `<prefix>.bn<i>`.
fn resnet_layer(prefix: &str, i: usize, conv: ConvSpec, act: Act) -> LayerSpec {
    LayerSpec {
        name: format!("{prefix}.conv{i}"),
        conv_var: format!("{prefix}.conv{i}"),
        bn_var: format!("{prefix}.bn{i}"),
        conv,
        act,
        init: ConvInit::KaimingFanOut,
        zero_bn: false,
    }
}

/// ResNet-50 (`cardinality` 1, `base_width` 64) or ResNeXt-50 (32, 4): a 7x7 stride-2 stem and a
/// max-pool, then 3, 4, 6 and 3 bottlenecks of 64, 128, 256 and 512 planes (4x as many outputs),
/// the stride on the 3x3 convolution of each layer's first block ("ResNet v1.5").
fn resnet(info: &'static ModelInfo, classes: i64, cardinality: i64, base_width: i64) -> Architecture {
    let stem = LayerSpec {
        name: "conv1".into(),
        conv_var: "conv1".into(),
        bn_var: "bn1".into(),
        conv: ConvSpec::new(3, 64, 7, 2, 3),
        act: Act::Relu,
        init: ConvInit::KaimingFanOut,
        zero_bn: false,
    };
    let mut inplanes = 64;
    let mut stages = Vec::new();
    for (i, &(planes, n, stride)) in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)].iter().enumerate() {
        let width = planes * base_width / 64 * cardinality;
        let out = planes * 4;
        let blocks = (0..n)
            .map(|j| {
                let prefix = format!("layer{}.{j}", i + 1);
                let s = if j == 0 { stride } else { 1 };
                let shortcut = (s != 1 || inplanes != out).then(|| LayerSpec {
                    name: format!("{prefix}.downsample"),
                    conv_var: format!("{prefix}.downsample.0"),
                    bn_var: format!("{prefix}.downsample.1"),
                    conv: ConvSpec::new(inplanes, out, 1, s, 0),
                    act: Act::Linear,
                    init: ConvInit::KaimingFanOut,
                    zero_bn: false,
                });
                let block = Block::Bottleneck {
                    conv1: resnet_layer(&prefix, 1, ConvSpec::new(inplanes, width, 1, 1, 0), Act::Relu),
                    conv2: resnet_layer(
                        &prefix,
                        2,
                        ConvSpec::new(width, width, 3, s, 1).grouped(cardinality),
                        Act::Relu,
                    ),
                    conv3: last_of_branch(resnet_layer(&prefix, 3, ConvSpec::new(width, out, 1, 1, 0), Act::Relu)),
                    shortcut,
                    act: Act::Relu,
                };
                inplanes = out;
                block
            })
            .collect();
        stages.push(Stage::Plain { entry: None, blocks });
    }
    Architecture {
        info,
        classes,
        stem: vec![stem],
        stem_pool: true,
        stages,
        head_var: "fc".into(),
        head_init: HeadInit::Uniform,
    }
}

pub fn resnet50(info: &'static ModelInfo, classes: i64) -> Architecture {
    resnet(info, classes, 1, 64)
}

pub fn resnext50(info: &'static ModelInfo, classes: i64) -> Architecture {
    resnet(info, classes, 32, 4)
}

/// The blocks of a cross stage.
#[derive(Clone, Copy)]
enum BlockKind {
    /// timm's `BottleneckBlock`: 1x1, 3x3 (grouped), linear 1x1, plus the input, LeakyReLU.
    Bottleneck,
    /// timm's `DarkBlock`: 1x1, 3x3, plus the input.
    Dark,
}

/// One cross stage as timm's `CspStagesCfg` describes it.
#[derive(Clone, Copy)]
struct CrossCfg {
    out: i64,
    depth: usize,
    stride: i64,
    /// The expansion's width relative to `out`.
    expand: f64,
    /// A block's inner width relative to its output.
    bottle: f64,
    /// A block's output relative to `out`.
    block: f64,
    groups: i64,
    /// No activation after the expansion.
    cross_linear: bool,
    /// The stride-2 convolution grows to `out` channels (else keeps its input's).
    down_growth: bool,
    kind: BlockKind,
}

fn scaled(channels: i64, ratio: f64) -> i64 {
    (channels as f64 * ratio).round() as i64
}

/// Cross stage `i` fed `cin` channels (timm's `CrossStage`).
fn cross_stage(i: usize, cin: i64, cfg: CrossCfg) -> Stage<LayerSpec> {
    let name = |part: &str| format!("stages.{i}.{part}");
    let leaky = Act::LeakyRelu;
    let down_chs = if cfg.down_growth { cfg.out } else { cin };
    let down = (cfg.stride != 1).then(|| {
        let mut down = conv_norm_act(name("conv_down"), cin, down_chs, 3, cfg.stride, leaky);
        down.conv = down.conv.grouped(cfg.groups);
        down
    });
    let expanded = scaled(cfg.out, cfg.expand);
    let expand_act = if cfg.cross_linear { Act::Linear } else { leaky };
    let expand =
        conv_norm_act(name("conv_exp"), if down.is_some() { down_chs } else { cin }, expanded, 1, 1, expand_act);
    let (half, block_out) = (expanded / 2, scaled(cfg.out, cfg.block));
    let mid = scaled(block_out, cfg.bottle);
    let blocks = (0..cfg.depth)
        .map(|j| {
            let block = |part: &str| name(&format!("blocks.{j}.{part}"));
            let cin = if j == 0 { half } else { block_out };
            match cfg.kind {
                BlockKind::Bottleneck => {
                    let mut conv2 = conv_norm_act(block("conv2"), mid, mid, 3, 1, leaky);
                    conv2.conv = conv2.conv.grouped(cfg.groups);
                    Block::Bottleneck {
                        conv1: conv_norm_act(block("conv1"), cin, mid, 1, 1, leaky),
                        conv2,
                        conv3: last_of_branch(conv_norm_act(block("conv3"), mid, block_out, 1, 1, leaky)),
                        shortcut: None,
                        act: leaky,
                    }
                }
                BlockKind::Dark => Block::Dark {
                    conv1: conv_norm_act(block("conv1"), cin, mid, 1, 1, leaky),
                    conv2: LayerSpec { zero_bn: true, ..conv_norm_act(block("conv2"), mid, block_out, 3, 1, leaky) },
                },
            }
        })
        .collect();
    Stage::Cross {
        down,
        expand,
        blocks,
        transition_b: conv_norm_act(name("conv_transition_b"), block_out, half, 1, 1, leaky),
        transition: conv_norm_act(name("conv_transition"), expanded, cfg.out, 1, 1, leaky),
    }
}

/// A CSPNet: `stem_out` channels from a k x k stem (stride 2 and a max-pool when `pool`), then the
/// cross stages of `stages`.
fn cspnet(
    info: &'static ModelInfo,
    classes: i64,
    stem_out: i64,
    stem_k: i64,
    pool: bool,
    stages: &[CrossCfg],
) -> Architecture {
    let stem_stride = if pool { 2 } else { 1 };
    let mut cin = stem_out;
    let stages = stages
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            let stage = cross_stage(i, cin, *cfg);
            cin = cfg.out;
            stage
        })
        .collect();
    Architecture {
        info,
        classes,
        stem: vec![conv_norm_act("stem.conv1".into(), 3, stem_out, stem_k, stem_stride, Act::LeakyRelu)],
        stem_pool: pool,
        stages,
        head_var: "head.fc".into(),
        head_init: HeadInit::NormalZeroBias,
    }
}

/// The stages of timm's CSPResNet-50 (`groups` 1, `expand` 2, `bottle` 0.5, `block` 1) or CSPResNeXt-50
/// (`groups` 32, wider stages, `expand` 1, `bottle` 1, `block` 0.5).
fn csp_resnet_stages(widths: [i64; 4], groups: i64, expand: f64, bottle: f64, block: f64) -> Vec<CrossCfg> {
    [3, 3, 5, 2]
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(i, (&depth, out))| CrossCfg {
            out,
            depth,
            stride: if i == 0 { 1 } else { 2 },
            expand,
            bottle,
            block,
            groups,
            cross_linear: true,
            down_growth: false,
            kind: BlockKind::Bottleneck,
        })
        .collect()
}

pub fn cspresnet50(info: &'static ModelInfo, classes: i64) -> Architecture {
    cspnet(info, classes, 64, 7, true, &csp_resnet_stages([128, 256, 512, 1024], 1, 2.0, 0.5, 1.0))
}

pub fn cspresnext50(info: &'static ModelInfo, classes: i64) -> Architecture {
    cspnet(info, classes, 64, 7, true, &csp_resnet_stages([256, 512, 1024, 2048], 32, 1.0, 1.0, 0.5))
}

/// The paper's CSPDarkNet53: DarkNet53's stem and widths in cross stages of DarkBlocks; the first
/// stage expands to twice its width and keeps full-width blocks.
pub fn cspdarknet53(info: &'static ModelInfo, classes: i64) -> Architecture {
    let stages: Vec<CrossCfg> = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)]
        .iter()
        .enumerate()
        .map(|(i, &(out, depth))| {
            let first = i == 0;
            CrossCfg {
                out,
                depth,
                stride: 2,
                expand: if first { 2.0 } else { 1.0 },
                bottle: if first { 0.5 } else { 1.0 },
                block: if first { 1.0 } else { 0.5 },
                groups: 1,
                cross_linear: false,
                down_growth: true,
                kind: BlockKind::Dark,
            }
        })
        .collect();
    cspnet(info, classes, 32, 3, false, &stages)
}
