//! The backbones against their references (the tutorial, timm), to the unit. Every test builds a
//! model or seeds libtorch's global generator, so each takes its turn with it.

mod common;

use csp_tch::models::{self, Backbone, Shape};
use tch::nn;
use tch::{Device, Kind, Tensor};

fn build(name: &str, classes: i64) -> (nn::VarStore, Backbone) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = models::build(&vs.root(), models::model_info(name).unwrap(), classes);
    (vs, model)
}

fn numel(tensors: impl IntoIterator<Item = Tensor>) -> i64 {
    tensors.into_iter().map(|t| t.numel() as i64).sum()
}

#[test]
fn parameter_counts_match_the_tutorial() {
    let _rng = common::rng_turn();
    // (model, trainable at 10 classes, Paddle-style at 1000 classes)
    let expected = [
        ("darknet53", 40_595_178, 41_645_640),
        ("cspdarknet53", 18_061_546, 19_106_376),
        ("cspdarknet53-pad0", 18_061_546, 19_106_376),
    ];
    for (name, trainable, paddle) in expected {
        let (vs, model) = build(name, 10);
        assert_eq!(model.describe(224).trainable_params, trainable, "{name}");
        assert_eq!(numel(vs.trainable_variables()), trainable, "{name}: var store");

        let (vs, model) = build(name, 1000);
        assert_eq!(model.describe(224).paddle_style_params, paddle, "{name}");
        // Paddle-style = every variable, BatchNorm running statistics included.
        assert_eq!(numel(vs.variables().into_values()), paddle, "{name}: var store");
    }
}

#[test]
fn the_cspnet_papers_models_have_timms_parameter_counts() {
    let _rng = common::rng_turn();
    for (name, at1000, at10) in common::TIMM_PARAMS {
        let info = models::model_info(name).unwrap();
        assert_eq!(models::summary(info, 1000, 224).trainable_params, at1000, "{name}, 1000 classes");
        assert_eq!(models::summary(info, 10, 224).trainable_params, at10, "{name}, 10 classes");
        let (vs, _model) = build(name, 10);
        assert_eq!(numel(vs.trainable_variables()), at10, "{name}: var store");
    }
    // Each CSP model knows the plain network it is compared with.
    for (csp, base) in [
        ("cspresnet50", "resnet50"),
        ("cspresnext50", "resnext50"),
        ("cspdarknet53-paper", "darknet53"),
        ("cspdarknet53", "darknet53"),
        ("cspdarknet53-pad0", "darknet53"),
    ] {
        assert_eq!(models::base_of(csp), Some(base));
    }
    assert_eq!(models::base_of("resnet50"), None);
    assert_eq!(models::default_models(), ["darknet53", "cspdarknet53", "cspdarknet53-pad0"]);
}

#[test]
fn timm_models_use_timms_variable_names() {
    let _rng = common::rng_turn();
    let (vs, _model) = build("resnet50", 10);
    for expected in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv2.weight",
        "layer1.0.bn3.weight",
        "layer1.0.downsample.0.weight",
        "layer4.2.bn3.bias",
        "fc.bias",
    ] {
        assert!(vs.variables().contains_key(expected), "resnet50: missing {expected}");
    }
    let (vs, _model) = build("cspresnext50", 10);
    for expected in [
        "stem.conv1.conv.weight",
        "stages.0.conv_exp.bn.weight",
        "stages.1.conv_down.conv.weight",
        "stages.3.blocks.1.conv3.bn.weight",
        "stages.2.conv_transition_b.conv.weight",
        "head.fc.weight",
    ] {
        assert!(vs.variables().contains_key(expected), "cspresnext50: missing {expected}");
    }
    assert!(!vs.variables().contains_key("stages.0.conv_down.conv.weight"), "stage 0 keeps the stem's stride");
    // ResNeXt's 3x3 convolutions are grouped: 32 groups of 4 channels in.
    assert_eq!(vs.variables()["stages.0.blocks.0.conv2.conv.weight"].size(), [128, 4, 3, 3]);
    // The last BatchNorm of every residual branch starts at zero (timm's zero_init_last).
    assert!(vs.variables()["stages.0.blocks.0.conv3.bn.weight"].abs().sum(Kind::Float).double_value(&[]) == 0.0);
}

#[test]
fn macs_match_the_tutorial() {
    let _rng = common::rng_turn();
    // TUTORIAL.md's figures in GMAC, as it prints them (three decimals), at 10 classes.
    let expected =
        [("darknet53", "0.145", "7.108"), ("cspdarknet53", "0.902", "6.113"), ("cspdarknet53-pad0", "0.073", "3.589")];
    for (name, at32, at224) in expected {
        let (_vs, model) = build(name, 10);
        let giga = |size| format!("{:.3}", model.describe(size).macs as f64 / 1e9);
        assert_eq!(giga(32), at32, "{name} at 32");
        assert_eq!(giga(224), at224, "{name} at 224");
    }
}

fn square(c: i64, s: i64) -> Shape {
    Shape { c, h: s, w: s }
}

#[test]
fn stage_output_shapes_match_the_tutorial() {
    let _rng = common::rng_turn();
    let widths = [64, 128, 256, 512, 1024];
    let cases = [
        ("darknet53", 224, [112, 56, 28, 14, 7]),
        ("cspdarknet53-pad0", 224, [112, 56, 28, 14, 7]),
        ("cspdarknet53", 224, [116, 62, 35, 22, 15]),
        ("darknet53", 32, [16, 8, 4, 2, 1]),
        ("cspdarknet53-pad0", 32, [16, 8, 4, 2, 1]),
        ("cspdarknet53", 32, [20, 14, 11, 10, 9]),
    ];
    for (name, size, sides) in cases {
        let (_vs, model) = build(name, 10);
        let expected: Vec<Shape> = widths.iter().zip(sides).map(|(&c, s)| square(c, s)).collect();
        assert_eq!(model.describe(size).stage_outputs, expected, "{name} at {size}");
    }
}

#[test]
fn described_shapes_are_the_shapes_the_modules_compute() {
    let _rng = common::rng_turn();
    for name in models::model_names() {
        let (_vs, model) = build(name, 10);
        let summary = model.describe(32);
        let input = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let mut x = model.stem().iter().fold(input, |x, layer| x.apply_t(layer, false));
        if model.stem().len() == 1 && summary.layers.iter().any(|r| r.name == "stem pool") {
            x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for (stage, shape) in model.stages().iter().zip(&summary.stage_outputs) {
            x = x.apply_t(stage, false);
            assert_eq!(x.size(), [2, shape.c, shape.h, shape.w], "{name}");
        }
        let logits = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)).apply_t(&model, false);
        assert_eq!(logits.size(), [2, 10]);
    }
}

#[test]
fn layer_paths_mirror_the_tutorial_names() {
    let _rng = common::rng_turn();
    let (vs, _model) = build("cspdarknet53", 10);
    let names = vs.variables();
    for expected in [
        "yolo_input.conv.weight",
        "stage.0.csp0.conv.weight",
        "stage.0.csp1.bn.running_mean",
        "stage.0.0.1.conv.weight",
        "stage.0.csp3.conv.weight",
        "stage.0.csp2.bn.weight",
        "stage.4.downsample.conv.weight",
        "fc.weight",
    ] {
        assert!(names.contains_key(expected), "missing {expected}");
    }
    let (vs, _model) = build("darknet53", 10);
    for expected in ["yolo_input.downsample.conv.weight", "stage.3.downsample.bn.bias", "stage.4.3.1.conv.weight"] {
        assert!(vs.variables().contains_key(expected), "missing {expected}");
    }
    assert!(!vs.variables().contains_key("stage.4.downsample.conv.weight"), "no downsample after the last stage");
}

#[test]
fn forward_and_backward_reach_every_parameter() {
    let _rng = common::rng_turn();
    tch::manual_seed(0);
    for name in models::model_names() {
        let (vs, model) = build(name, 10);
        // timm starts the last BatchNorm of each residual branch at zero, which stops the gradient of
        // the layers before it at initialisation: give those a scale so that every path carries one.
        tch::no_grad(|| {
            for (var, mut t) in vs.variables() {
                if t.dim() == 1 && var.ends_with("weight") {
                    let _ = t.fill_(1.0);
                }
            }
        });
        let xs = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 3, 7, 9]);
        let loss = xs.apply_t(&model, true).cross_entropy_for_logits(&labels);
        let value = loss.double_value(&[]);
        assert!(value.is_finite() && value > 0.0, "{name}: loss {value}");
        loss.backward();
        for (var, tensor) in vs.variables() {
            if !tensor.requires_grad() {
                continue;
            }
            let grad = tensor.grad();
            assert!(grad.defined(), "{name}: no gradient for {var}");
            assert!(grad.isfinite().all().int64_value(&[]) == 1, "{name}: non-finite gradient in {var}");
            assert!(grad.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}: zero gradient in {var}");
        }
    }
}

#[test]
fn initialisation_follows_paddleclas() {
    let _rng = common::rng_turn();
    tch::manual_seed(1);
    let (vs, _model) = build("darknet53", 10);
    let vars = vs.variables();
    // 3x3 conv, 512 -> 1024: fan_in = 9 * 512.
    let w = &vars["stage.3.downsample.conv.weight"];
    assert_eq!(w.size(), [1024, 512, 3, 3]);
    let std = w.std(true).double_value(&[]);
    let expected = (2.0 / (9.0 * 512.0f64)).sqrt();
    assert!((std / expected - 1.0).abs() < 0.05, "conv std {std}, expected {expected}");
    assert!(w.mean(Kind::Double).double_value(&[]).abs() < 0.05 * expected);

    let head = &vars["fc.weight"];
    let bound = head.abs().max().double_value(&[]);
    assert!(bound <= 1.0 / 32.0 && bound > 0.9 / 32.0, "head weights span ±{bound}");
    assert_eq!(vars["fc.bias"].abs().sum(Kind::Double).double_value(&[]), 0.0);
    assert_eq!(vars["stage.2.3.0.bn.weight"].min().double_value(&[]), 1.0);
    assert_eq!(vars["stage.2.3.0.bn.weight"].max().double_value(&[]), 1.0);
    assert_eq!(vars["stage.2.3.0.bn.bias"].abs().max().double_value(&[]), 0.0);
}

#[test]
fn initialisation_follows_timm_for_its_models() {
    let _rng = common::rng_turn();
    tch::manual_seed(2);
    let (vs, _model) = build("cspresnet50", 10);
    let vars = vs.variables();
    // Normal(0, sqrt(2 / fan_out)): 3x3, 512 -> 512 at stage 3's entry, fan_out = 9 * 512.
    let w = &vars["stages.3.conv_down.conv.weight"];
    let (std, expected) = (w.std(true).double_value(&[]), (2.0 / (9.0 * 512.0f64)).sqrt());
    assert!((std / expected - 1.0).abs() < 0.05, "conv std {std}, expected {expected}");
    // The CSPNet head: Normal(0, 0.01), zero bias.
    let head_std = vars["head.fc.weight"].std(true).double_value(&[]);
    assert!((head_std / 0.01 - 1.0).abs() < 0.1, "head std {head_std}");
    assert_eq!(vars["head.fc.bias"].abs().sum(Kind::Double).double_value(&[]), 0.0);
    // Zero-initialised last BatchNorm of each residual branch; the others at one.
    assert_eq!(vars["stages.2.blocks.4.conv3.bn.weight"].abs().max().double_value(&[]), 0.0);
    assert_eq!(vars["stages.2.blocks.4.conv2.bn.weight"].min().double_value(&[]), 1.0);
    // ResNet's head keeps nn.Linear's start: weight and bias Uniform(-1/sqrt(2048), 1/sqrt(2048)).
    let (vs, _model) = build("resnet50", 10);
    let bound = 1.0 / 2048f64.sqrt();
    for var in ["fc.weight", "fc.bias"] {
        let largest = vs.variables()[var].abs().max().double_value(&[]);
        assert!(largest <= bound && largest > 0.5 * bound, "{var} spans ±{largest}");
    }
    assert_eq!(vs.variables()["layer3.5.bn3.weight"].abs().max().double_value(&[]), 0.0);
}

#[test]
fn unknown_model_lists_the_valid_ones() {
    let _rng = common::rng_turn();
    let err = models::model_info("vgg16").unwrap_err().to_string();
    for name in models::model_names() {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn min_image_size_gives_a_one_pixel_final_map() {
    let _rng = common::rng_turn();
    for name in models::model_names() {
        let info = models::model_info(name).unwrap();
        assert_eq!(info.min_image_size(), 32, "{name}");
        let last = *models::summary(info, 10, 32).stage_outputs.last().unwrap();
        // The tutorial's padded CSP model grows its maps; the others end at one pixel.
        let expected = if name == "cspdarknet53" { 9 } else { 1 };
        assert_eq!((last.h, last.w), (expected, expected), "{name} at 32 px");
        assert!(info.check_image_size(31).is_err() && info.check_image_size(32).is_ok());
    }
}

#[test]
fn folded_batch_norm_matches_batch_norm_in_eval_mode() {
    let _rng = common::rng_turn();
    use csp_tch::data::transform::to_channels_last;
    tch::manual_seed(4);
    for (name, channels_last) in models::model_names().into_iter().flat_map(|n| [(n, false), (n, true)]) {
        let case = format!("{name}, {}", if channels_last { "NHWC" } else { "NCHW" });
        let (vs, model) = build(name, 10);
        // Non-trivial statistics and affine parameters, in the layout the case asks for.
        tch::no_grad(|| {
            for (var, mut t) in vs.variables() {
                if var.ends_with("running_mean") || var.ends_with("bn.bias") {
                    t.copy_(&(Tensor::randn_like(&t) * 0.1));
                } else if var.ends_with("running_var") || var.ends_with("bn.weight") {
                    t.copy_(&(Tensor::rand_like(&t) + 0.5));
                } else if channels_last && t.dim() == 4 {
                    t.set_data(&to_channels_last(&t));
                }
            }
        });
        assert_eq!(model.is_channels_last(), channels_last, "{case}");
        let xs = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
        let xs = if channels_last { to_channels_last(&xs) } else { xs };
        let plain = tch::no_grad(|| xs.apply_t(&model, false));
        let folded = {
            let _guard = model.fold_batch_norm();
            tch::no_grad(|| xs.apply_t(&model, false))
        };
        let scale = plain.abs().max().double_value(&[]);
        let diff = (&plain - &folded).abs().max().double_value(&[]);
        assert!(scale > 0.0 && diff <= 1e-5 * scale, "{case}: folded differs by {diff} (logits up to {scale})");
        assert!(!plain.equal(&folded), "{case}: the folded path was not taken");
        // The guard is gone: eval mode is the plain path again, bit for bit.
        assert!(tch::no_grad(|| xs.apply_t(&model, false)).equal(&plain), "{case}");
    }
}

#[test]
fn live_taps_cut_only_kernel_taps_that_see_padding_alone() {
    let _rng = common::rng_turn();
    use models::ConvSpec;
    let centre = ConvSpec::new(4, 4, 3, 1, 1).live_taps(1, 1).expect("3x3 on 1x1 keeps its centre");
    assert_eq!((centre.rows, centre.cols, centre.padding), ((1, 1), (1, 1), [0, 0]));
    let entry = ConvSpec::new(4, 4, 3, 2, 1).live_taps(2, 2).expect("stride 2 on 2x2 keeps 2x2 taps");
    assert_eq!((entry.rows, entry.cols, entry.padding), ((1, 2), (1, 2), [0, 0]));
    let strip = ConvSpec::new(4, 4, 3, 1, 1).live_taps(5, 1).expect("a one-pixel-wide map keeps a column");
    assert_eq!((strip.rows, strip.cols, strip.padding), ((0, 3), (1, 1), [1, 0]));
    assert!(ConvSpec::new(4, 4, 3, 1, 1).live_taps(2, 2).is_none(), "every tap of 3x3 on 2x2 sees a pixel");
    assert!(ConvSpec::new(4, 4, 1, 1, 1).live_taps(1, 1).is_none(), "a 1x1 kernel has nothing to cut");
}

#[test]
fn cut_convolutions_compute_the_full_ones() {
    let _rng = common::rng_turn();
    tch::manual_seed(5);
    let mut cut = 0;
    for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 0), (1, 1, 1), (5, 1, 2), (5, 2, 2)] {
        for (h, w) in [(1, 1), (2, 2), (3, 3), (1, 4), (4, 2), (5, 5)] {
            let spec = models::ConvSpec::new(3, 5, k, stride, pad);
            if spec.out_size(h) < 1 || spec.out_size(w) < 1 {
                continue;
            }
            let Some(live) = spec.live_taps(h, w) else {
                continue;
            };
            cut += 1;
            let xs = Tensor::randn([2, 3, h, w], (Kind::Float, Device::Cpu));
            let weight = Tensor::randn([5, 3, k, k], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let full = xs.conv2d::<Tensor>(&weight, None, [stride], [pad], [1], 1);
            let full_grad = Tensor::run_backward(&[full.sum(Kind::Float)], &[&weight], false, false).remove(0);
            let part = xs.conv2d::<Tensor>(&live.cut(&weight), None, [stride], live.padding, [1], 1);
            let part_grad = Tensor::run_backward(&[part.sum(Kind::Float)], &[&weight], false, false).remove(0);
            let case = format!("k{k} s{stride} p{pad} on {h}x{w}");
            assert_eq!(full.size(), part.size(), "{case}");
            assert!(full.allclose(&part, 1e-5, 1e-5, false), "{case}: outputs differ");
            assert!(full_grad.allclose(&part_grad, 1e-5, 1e-5, false), "{case}: weight gradients differ");
        }
    }
    assert!(cut >= 8, "only {cut} cases had taps to cut");
}

#[test]
fn dense_matrices_are_the_convolutions() {
    let _rng = common::rng_turn();
    use models::ConvSpec;
    // The matrix is used where it needs no more multiply-adds than the convolution's live taps.
    for (spec, h, w, no_larger) in [
        (ConvSpec::new(3, 5, 3, 1, 1), 2, 2, true), // DarkNet53's stage 3 at 32 px: 4 pixels, 9 taps
        (ConvSpec::new(3, 5, 3, 1, 1), 1, 1, true), // its stage 4: the centre tap
        (ConvSpec::new(3, 5, 3, 2, 1), 2, 2, true), // stage 4's entry: 2x2 taps
        (ConvSpec::new(3, 5, 1, 1, 0), 1, 1, true),
        (ConvSpec::new(3, 5, 3, 1, 1), 3, 3, true),
        (ConvSpec::new(3, 5, 3, 1, 1), 4, 4, false),
        (ConvSpec::new(3, 5, 3, 2, 1), 4, 4, false),
        (ConvSpec::new(3, 5, 1, 1, 0), 2, 2, false),
    ] {
        assert_eq!(spec.dense_is_no_larger(h, w), no_larger, "{spec:?} on {h}x{w}");
    }
    // And it computes the convolution on NCHW-flattened images, whatever the geometry.
    tch::manual_seed(8);
    let mut cases = 0;
    for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0), (1, 1, 1), (5, 2, 2)] {
        for (h, w) in [(1, 1), (2, 2), (3, 3), (1, 4), (4, 2)] {
            let spec = models::ConvSpec::new(3, 5, k, stride, pad);
            if spec.out_size(h) < 1 || spec.out_size(w) < 1 {
                continue;
            }
            cases += 1;
            let xs = Tensor::randn([2, 3, h, w], (Kind::Float, Device::Cpu));
            let weight = Tensor::randn([5, 3, k, k], (Kind::Float, Device::Cpu));
            let conv = xs.conv2d::<Tensor>(&weight, None, [stride], [pad], [1], 1);
            let matrix = spec.dense_matrix(&weight, h, w);
            assert_eq!(matrix.size(), [5 * conv.size()[2] * conv.size()[3], 3 * h * w]);
            let dense = xs.flatten(1, -1).matmul(&matrix.tr()).view_as(&conv);
            assert!(dense.allclose(&conv, 1e-5, 1e-5, false), "k{k} s{stride} p{pad} on {h}x{w}");
        }
    }
    assert!(cases >= 25, "only {cases} cases");
}

#[test]
fn onednn_inner_product_is_relu_of_the_linear_map() {
    let _rng = common::rng_turn();
    use csp_tch::models::onednn;
    tch::manual_seed(9);
    let xs = Tensor::randn([6, 20], (Kind::Float, Device::Cpu));
    let (weight, bias) =
        (Tensor::randn([7, 20], (Kind::Float, Device::Cpu)), Tensor::randn([7], (Kind::Float, Device::Cpu)));
    // The pinned libtorch is built with oneDNN; other dtypes take the convolution path.
    assert!(onednn::linear_relu_applies(&xs));
    assert!(!onednn::linear_relu_applies(&xs.to_kind(Kind::Double)));
    let out = onednn::linear_relu(&xs, &weight, &bias);
    let expected = xs.linear(&weight, Some(&bias)).relu();
    assert!(out.allclose(&expected, 1e-5, 1e-5, false));
    let zeros = out.eq(0.0).sum(Kind::Int64).int64_value(&[]);
    assert!(zeros > 0 && zeros < 42, "ReLU clamps some outputs, not all: {zeros} of 42");
    let wrong = std::panic::catch_unwind(|| onednn::linear_relu(&xs, &weight.narrow(1, 0, 10), &bias));
    let message = *wrong.expect_err("mismatched shapes").downcast::<String>().unwrap();
    assert!(message.starts_with("oneDNN inner product: "), "{message}");
}

#[test]
fn folded_evaluation_follows_the_input_size() {
    let _rng = common::rng_turn();
    // The folded path keeps the kernel cut for the last input size: another size must not reuse it.
    tch::manual_seed(6);
    let (_vs, model) = build("darknet53", 10);
    // Stage 4 maps of 1x1, 1x2 and 1x1: a kernel cut to its centre, then its centre row.
    let inputs: Vec<Tensor> = [(32, 32), (32, 64), (32, 32)]
        .iter()
        .map(|&(h, w)| Tensor::randn([2, 3, h, w], (Kind::Float, Device::Cpu)))
        .collect();
    let plain: Vec<Tensor> = inputs.iter().map(|xs| tch::no_grad(|| xs.apply_t(&model, false))).collect();
    let _guard = model.fold_batch_norm();
    for (xs, plain) in inputs.iter().zip(&plain) {
        let folded = tch::no_grad(|| xs.apply_t(&model, false));
        let diff = (plain - &folded).abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * plain.abs().max().double_value(&[]), "{:?}: folded differs by {diff}", xs.size());
    }
}

#[test]
fn describing_a_model_builds_nothing_and_draws_no_random_number() {
    let _rng = common::rng_turn();
    // `summary` reads the architecture alone: building the modules would initialise 40 M parameters
    // from libtorch's global generator, shifting every seeded run that described a model first.
    tch::manual_seed(3);
    let expected = Tensor::randn([4], (Kind::Float, Device::Cpu));
    tch::manual_seed(3);
    for name in models::model_names() {
        assert!(models::summary(models::model_info(name).unwrap(), 10, 224).trainable_params > 0);
    }
    assert!(Tensor::randn([4], (Kind::Float, Device::Cpu)).equal(&expected), "summary drew from the generator");
}
