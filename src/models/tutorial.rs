//! The tutorial's networks (docs/TUTORIAL.md): DarkNet53 as in PaddleClas, and CSPDarkNet53 as the
//! tutorial builds it, with and without the padding of its 1x1 convolutions. ReLU everywhere,
//! PaddleClas's initialisation, the tutorial's layer names (`stage.0.csp0`, `stage.2.5.1`, PaddleClas's
//! `yolo_input.downsample`).

use super::{Act, Architecture, Block, ConvInit, ConvSpec, HeadInit, LayerSpec, ModelInfo, Stage};

/// Width `C` and block count `n` of the five stages, shared by the tutorial's backbones.
pub const STAGES: [(i64, usize); 5] = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)];
/// Channels out of the stem ConvBNLayer.
const STEM_CHANNELS: i64 = 32;

/// The tutorial's ConvBNLayer(cin, cout, k, stride, pad): variables `<name>.conv`, `<name>.bn`.
fn layer(name: String, cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> LayerSpec {
    LayerSpec {
        conv_var: format!("{name}.conv"),
        bn_var: format!("{name}.bn"),
        name,
        conv: ConvSpec::new(cin, cout, k, stride, pad),
        act: Act::Relu,
        init: ConvInit::KaimingFanIn,
        zero_bn: false,
    }
}

/// `n` BasicBlock(c, c/2): 1x1 ConvBNLayer to c/2, 3x3 ConvBNLayer back to c, plus the input;
/// named `<prefix>.0 .. <prefix>.{n-1}`.
fn blocks(prefix: &str, c: i64, n: usize) -> Vec<Block<LayerSpec>> {
    (0..n)
        .map(|i| Block::Dark {
            conv1: layer(format!("{prefix}.{i}.0"), c, c / 2, 1, 1, 0),
            conv2: layer(format!("{prefix}.{i}.1"), c / 2, c, 3, 1, 1),
        })
        .collect()
}

/// Stem ConvBNLayer(3, 32, 3, 1, 1), five stages from `stage(k, cin, c, n)`, a linear head.
fn network(
    info: &'static ModelInfo,
    classes: i64,
    stage: fn(usize, i64, i64, usize) -> Stage<LayerSpec>,
) -> Architecture {
    let mut cin = STEM_CHANNELS;
    let stages = STAGES
        .iter()
        .enumerate()
        .map(|(k, &(c, n))| {
            let s = stage(k, cin, c, n);
            cin = c;
            s
        })
        .collect();
    Architecture {
        info,
        classes,
        stem: vec![layer("yolo_input".into(), 3, STEM_CHANNELS, 3, 1, 1)],
        stem_pool: false,
        stages,
        head_var: "fc".into(),
        head_init: HeadInit::UniformZeroBias,
    }
}

/// DarkNet53: each stage a stride-2 ConvBNLayer(cin, C, 3, 2, 1), then n BasicBlock(C, C/2).
pub fn darknet53(info: &'static ModelInfo, classes: i64) -> Architecture {
    network(info, classes, |k, cin, c, n| {
        // PaddleClas names the stride-2 convolution after the stage it leaves.
        let entry = if k == 0 { "yolo_input.downsample".to_string() } else { format!("stage.{}.downsample", k - 1) };
        Stage::Plain { entry: Some(layer(entry, cin, c, 3, 2, 1)), blocks: blocks(&format!("stage.{k}"), c, n) }
    })
}

/// The tutorial's CSP stage `k`: csp0 (stride 2), then csp1 -> blocks -> csp3 beside csp2, fused by
/// `stage.k.downsample`; `pad_1x1` pads csp1, csp2 and the fusion.
fn csp_stage(k: usize, cin: i64, c: i64, n: usize, pad_1x1: i64) -> Stage<LayerSpec> {
    let prefix = format!("stage.{k}");
    // Stage 0 keeps the full 64 channels in each part; later stages halve them.
    let part_width = if k == 0 { c } else { c / 2 };
    Stage::TutorialCsp {
        entry: layer(format!("{prefix}.csp0"), cin, c, 3, 2, 1),
        part: layer(format!("{prefix}.csp1"), c, part_width, 1, 1, pad_1x1),
        blocks: blocks(&prefix, part_width, n),
        transition: layer(format!("{prefix}.csp3"), part_width, part_width, 1, 1, 0),
        shortcut: layer(format!("{prefix}.csp2"), c, part_width, 1, 1, pad_1x1),
        fusion: layer(format!("{prefix}.downsample"), 2 * part_width, c, 1, 1, pad_1x1),
    }
}

/// CSPDarkNet53 as the tutorial wrote it: its 1x1 convolutions padded by 1.
pub fn cspdarknet53(info: &'static ModelInfo, classes: i64) -> Architecture {
    network(info, classes, |k, cin, c, n| csp_stage(k, cin, c, n, 1))
}

/// The same without that padding: what the CSP split itself saves.
pub fn cspdarknet53_pad0(info: &'static ModelInfo, classes: i64) -> Architecture {
    network(info, classes, |k, cin, c, n| csp_stage(k, cin, c, n, 0))
}
