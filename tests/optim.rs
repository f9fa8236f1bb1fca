//! Our Adam against tch's `nn::Adam` (libtorch's torch::optim::Adam), step for step.

mod common;

use csp_tch::config::{AdamConfig, OptimizerConfig};
use csp_tch::train::optim::{Kernel, Optimizer};
use tch::nn::{self, Module, OptimizerConfig as _};
use tch::{Device, Kind, Tensor};

fn net(vs: &nn::VarStore) -> impl Module {
    let p = vs.root();
    nn::seq()
        .add(nn::conv2d(&p / "conv", 3, 8, 3, Default::default()))
        .add_fn(|x| x.relu().flatten(1, -1))
        .add(nn::linear(&p / "fc", 8 * 6 * 6, 10, Default::default()))
}

#[test]
fn adam_matches_tch_adam_step_for_step() {
    for kernel in [Kernel::Fused, Kernel::TensorOps] {
        adam_matches_tch_adam(kernel);
    }
}

fn adam_matches_tch_adam(kernel: Kernel) {
    let config = AdamConfig { lr: 3e-3, ..Default::default() };
    let _rng = common::rng_turn();
    tch::manual_seed(11);
    let vs_ours = nn::VarStore::new(Device::Cpu);
    let model_ours = net(&vs_ours);
    let mut vs_tch = nn::VarStore::new(Device::Cpu);
    let model_tch = net(&vs_tch);
    vs_tch.copy(&vs_ours).unwrap();

    let mut ours = Optimizer::for_var_store(&vs_ours, OptimizerConfig::Adam(config));
    ours.kernel = kernel;
    let mut theirs = nn::Adam { beta1: config.beta1, beta2: config.beta2, wd: 0.0, amsgrad: false, eps: config.eps }
        .build(&vs_tch, config.lr)
        .unwrap();
    for step in 0..20 {
        let xs = Tensor::randn([16, 3, 8, 8], (Kind::Float, Device::Cpu));
        let ys = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
        let grads = ours.gradients(&model_ours.forward(&xs).cross_entropy_for_logits(&ys)).unwrap();
        ours.step(&grads);
        theirs.zero_grad();
        model_tch.forward(&xs).cross_entropy_for_logits(&ys).backward();
        theirs.step();
        for (name, a) in vs_ours.variables() {
            let b = &vs_tch.variables()[&name];
            let diff = (&a - b).abs().max().double_value(&[]);
            let moved = a.abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * moved.max(1.0), "{kernel:?}, step {step}, {name}: max difference {diff}");
        }
    }
    assert_eq!(ours.steps(), 20);
}

#[test]
fn a_parameter_without_gradient_is_left_alone() {
    let vs = nn::VarStore::new(Device::Cpu);
    let used = vs.root().randn("used", &[4], 0.0, 1.0);
    let unused = vs.root().randn("unused", &[4], 0.0, 1.0);
    let (unused_before, used_before) = (unused.copy(), used.copy());
    let mut adam = Optimizer::for_var_store(&vs, OptimizerConfig::Adam(AdamConfig::default()));
    let grads = adam.gradients(&(&used * &used).sum(Kind::Float)).unwrap();
    assert!(!grads[0].defined() && grads[1].defined(), "sorted by name: unused, used");
    adam.step(&grads);
    assert!(unused.equal(&unused_before));
    // Adam's first step moves every coordinate by lr against the gradient (m/sqrt(v) = sign(g)).
    let expected = &used_before - used_before.sign() * 1e-3;
    assert!(used.allclose(&expected, 1e-6, 1e-7, false), "{used:?} vs {expected:?}");
}

#[test]
fn loss_scaler_unscales_skips_overflows_and_adapts_the_scale() {
    use csp_tch::train::optim::LossScaler;
    let mut scaler = LossScaler::new();
    let initial = scaler.scale();
    let grad = Tensor::from_slice(&[2.0f32, -4.0]) * initial;
    assert!(scaler.unscale(&[grad.shallow_clone(), Tensor::new()]), "finite (an undefined gradient is skipped)");
    assert_eq!(Vec::<f32>::try_from(&grad).unwrap(), vec![2.0, -4.0], "divided by the scale in place");
    assert_eq!(scaler.scale(), initial);

    let overflow = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
    assert!(!scaler.unscale(&[grad.shallow_clone(), overflow]), "an inf gradient means: skip the step");
    assert_eq!(scaler.scale(), initial / 2.0);
    assert!(!scaler.unscale(&[Tensor::from_slice(&[f32::NAN])]));
    assert_eq!(scaler.scale(), initial / 4.0);

    for _ in 0..1999 {
        assert!(scaler.unscale(&[Tensor::from_slice(&[1.0f32])]));
    }
    assert_eq!(scaler.scale(), initial / 4.0);
    assert!(scaler.unscale(&[Tensor::from_slice(&[1.0f32])]));
    assert_eq!(scaler.scale(), initial / 2.0, "doubles after 2000 clean steps");
}

#[test]
fn the_fused_step_handles_channels_last_and_gradients_in_another_layout() {
    // Two copies of a channels-last parameter set: one updated by the fused loop, one by tensor ops.
    let (vs_fused, vs_tensor) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let _rng = common::rng_turn();
    tch::manual_seed(12);
    for vs in [&vs_fused, &vs_tensor] {
        for (name, shape) in [("a", [8i64, 4, 3, 3]), ("b", [8, 4, 2, 2])] {
            let mut var = vs.root().zeros(name, &shape);
            tch::no_grad(|| {
                var.set_data(&csp_tch::data::transform::to_channels_last(&Tensor::ones(shape, tch::kind::FLOAT_CPU)))
            });
        }
    }
    let mut fused = Optimizer::for_var_store(&vs_fused, OptimizerConfig::Adam(AdamConfig::default()));
    let mut tensor = Optimizer::for_var_store(&vs_tensor, OptimizerConfig::Adam(AdamConfig::default()));
    tensor.kernel = Kernel::TensorOps;
    for _ in 0..5 {
        // "a" gets a channels-last gradient (its own layout), "b" a contiguous one.
        let a = csp_tch::data::transform::to_channels_last(&Tensor::randn([8, 4, 3, 3], tch::kind::FLOAT_CPU));
        let b = Tensor::randn([8, 4, 2, 2], tch::kind::FLOAT_CPU);
        fused.step(&[a.shallow_clone(), b.shallow_clone()]);
        tensor.step(&[a, b]);
    }
    for (name, p) in vs_fused.variables() {
        let q = &vs_tensor.variables()[&name];
        assert!(p.allclose(q, 1e-6, 1e-7, false), "{name}: fused and tensor updates differ");
        assert!(!p.equal(&Tensor::ones_like(&p)), "{name} was not updated");
    }
    let a = &vs_fused.variables()["a"];
    assert_eq!(a.stride(), vec![36, 1, 12, 4], "still channels-last");
}

#[test]
fn a_learning_rate_changed_between_steps_changes_the_fused_update() {
    // Three copies of one parameter under the same gradients: the fused kernel with the learning
    // rate halved after two steps, tensor ops with the same schedule, and the fused kernel at 1e-3.
    let _rng = common::rng_turn();
    tch::manual_seed(5);
    let start = Tensor::randn([6, 5], tch::kind::FLOAT_CPU);
    let grads: Vec<Tensor> = (0..4).map(|_| Tensor::randn([6, 5], tch::kind::FLOAT_CPU)).collect();
    // An optimizer over a copy of `start`, and that copy (updated in place by its steps).
    let adam = |kernel| {
        let w = start.copy();
        let mut adam =
            Optimizer::new(vec![("w".into(), w.shallow_clone())], OptimizerConfig::Adam(AdamConfig::default()));
        adam.kernel = kernel;
        (adam, w)
    };
    let (mut scheduled, w_scheduled) = adam(Kernel::Fused);
    let (mut reference, w_reference) = adam(Kernel::TensorOps);
    let (mut constant, w_constant) = adam(Kernel::Fused);
    for (i, g) in grads.iter().enumerate() {
        if i == 2 {
            scheduled.set_lr(5e-4);
            reference.set_lr(5e-4);
        }
        for adam in [&mut scheduled, &mut reference, &mut constant] {
            adam.step(std::slice::from_ref(g));
        }
    }
    assert_eq!(scheduled.config().lr(), 5e-4);
    assert!(w_scheduled.allclose(&w_reference, 1e-6, 1e-8, false), "the fused kernel follows the schedule");
    let moved = |w: &Tensor| (w - &start).abs().sum(tch::Kind::Double).double_value(&[]);
    // Two of the four steps at half the rate move the weights less than four at the full rate.
    assert!(moved(&w_scheduled) < moved(&w_constant) * 0.9, "{} vs {}", moved(&w_scheduled), moved(&w_constant));
}

/// The parameters of the peer test: a convolution, a BatchNorm and a linear layer's, by name.
const PEER_PARAMS: [(&str, &[i64]); 5] = [
    ("bn.bias", &[4]),
    ("bn.weight", &[4]),
    ("conv.weight", &[4, 3, 3, 3]),
    ("fc.bias", &[10]),
    ("fc.weight", &[10, 4]),
];
const PEER_STEPS: usize = 5;

#[test]
fn every_optimizer_matches_torch_optim_step_for_step() {
    use common::peer::{assert_close, read_f32, run_python, write_f32};
    use csp_tch::config::{SgdConfig, WeightDecay};
    let tmp = tempfile::tempdir().unwrap();
    let (start, grads): (Vec<Tensor>, Vec<Vec<Tensor>>) = {
        let _rng = common::rng_turn();
        tch::manual_seed(21);
        let start = PEER_PARAMS.iter().map(|(_, shape)| Tensor::randn(*shape, tch::kind::FLOAT_CPU)).collect();
        let grads = (0..PEER_STEPS)
            .map(|_| PEER_PARAMS.iter().map(|(_, shape)| Tensor::randn(*shape, tch::kind::FLOAT_CPU)).collect())
            .collect();
        (start, grads)
    };
    for (i, p) in start.iter().enumerate() {
        write_f32(&tmp.path().join(format!("p{i}")), p);
        for (k, step) in grads.iter().enumerate() {
            write_f32(&tmp.path().join(format!("g{i}-{k}")), &step[i]);
        }
    }
    let decay = |weight_decay, no_decay_bn_bias| WeightDecay { weight_decay, no_decay_bn_bias };
    let adam = |weight_decay, exempt| AdamConfig {
        lr: 0.01,
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-6,
        decay: decay(weight_decay, exempt),
    };
    let sgd = |momentum, nesterov, weight_decay, exempt| SgdConfig {
        lr: 0.05,
        momentum,
        nesterov,
        decay: decay(weight_decay, exempt),
    };
    // (the peer's constructor, our configuration)
    let cases: Vec<(&str, OptimizerConfig)> = vec![
        ("Adam(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6)", OptimizerConfig::Adam(adam(0.0, false))),
        ("Adam(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6)", OptimizerConfig::Adam(adam(0.1, false))),
        ("AdamW(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6)", OptimizerConfig::Adamw(adam(0.5, false))),
        ("AdamW(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6)", OptimizerConfig::Adamw(adam(0.5, true))),
        ("SGD(g, lr=0.05)", OptimizerConfig::Sgd(sgd(0.0, false, 0.0, false))),
        ("SGD(g, lr=0.05, momentum=0.9)", OptimizerConfig::Sgd(sgd(0.9, false, 0.2, false))),
        ("SGD(g, lr=0.05, momentum=0.9)", OptimizerConfig::Sgd(sgd(0.9, false, 0.2, true))),
        ("SGD(g, lr=0.05, momentum=0.9, nesterov=True)", OptimizerConfig::Sgd(sgd(0.9, true, 0.2, true))),
    ];
    let mut script = String::from(
        r#"
import sys, numpy as np, torch
d = sys.argv[1]
names = NAMES
shapes = SHAPES
def run(k, make, weight_decay, exempt):
    params = [torch.nn.Parameter(torch.from_numpy(np.fromfile(f"{d}/p{i}", np.float32).reshape(s)).clone()) for i, s in enumerate(shapes)]
    # timm's param_groups_weight_decay
    no = [p for n, p in zip(names, params) if exempt and (p.ndim <= 1 or n.endswith(".bias"))]
    yes = [p for n, p in zip(names, params) if not (exempt and (p.ndim <= 1 or n.endswith(".bias")))]
    g = [{"params": no, "weight_decay": 0.0}, {"params": yes, "weight_decay": weight_decay}]
    opt = make(g)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(np.fromfile(f"{d}/g{i}-{step}", np.float32).reshape(shapes[i])).clone()
        opt.step()
    for i, p in enumerate(params):
        p.detach().numpy().tofile(f"{d}/out{k}-{i}")
"#,
    )
    .replace("NAMES", &format!("{:?}", PEER_PARAMS.iter().map(|(n, _)| *n).collect::<Vec<_>>()))
    .replace("SHAPES", &format!("{:?}", PEER_PARAMS.iter().map(|(_, s)| s.to_vec()).collect::<Vec<_>>()))
    .replace("STEPS", &PEER_STEPS.to_string());
    for (k, (make, config)) in cases.iter().enumerate() {
        let d = config.weight_decay();
        let exempt = if d.no_decay_bn_bias { "True" } else { "False" };
        script += &format!("run({k}, lambda g: torch.optim.{make}, {}, {exempt})\n", d.weight_decay);
    }
    run_python(&script, tmp.path());
    for (k, (make, config)) in cases.iter().enumerate() {
        for kernel in [Kernel::Fused, Kernel::TensorOps] {
            let params: Vec<Tensor> = start.iter().map(Tensor::copy).collect();
            let named = PEER_PARAMS.iter().zip(&params).map(|((n, _), p)| (n.to_string(), p.shallow_clone())).collect();
            let mut ours = Optimizer::new(named, *config);
            ours.kernel = kernel;
            for step in &grads {
                ours.step(step);
            }
            for (i, p) in params.iter().enumerate() {
                let theirs = read_f32(&tmp.path().join(format!("out{k}-{i}")));
                let what = format!("{make} {config:?}, {kernel:?}: {}", PEER_PARAMS[i].0);
                assert_close(&Vec::<f32>::try_from(p.flatten(0, -1)).unwrap(), &theirs, &what);
            }
        }
    }
    // The cases differ from one another: the decay and the exemption change the weights.
    let outcome = |k: usize, i: usize| read_f32(&tmp.path().join(format!("out{k}-{i}")));
    assert_ne!(outcome(0, 2), outcome(1, 2), "Adam's L2 term moves the conv weight");
    assert_ne!(outcome(2, 0), outcome(3, 0), "the exemption keeps AdamW's decay off bn.bias");
    assert_eq!(outcome(2, 2), outcome(3, 2), "and leaves the conv weight's decay alone");
    assert_ne!(outcome(6, 2), outcome(7, 2), "Nesterov changes SGD's update");
}

#[test]
fn the_ema_matches_timms_model_ema_v2_after_every_step() {
    use common::peer::{assert_close, read_f32, run_python, write_f32};
    use csp_tch::train::ema::Average;
    const STEPS: usize = 12;
    let tmp = tempfile::tempdir().unwrap();
    // A weight, a bias and a BatchNorm-style statistic (not trained), as a Linear(3, 4) and a buffer.
    let build = |vs: &nn::VarStore| {
        let (p, fc) = (vs.root(), vs.root() / "fc");
        (fc.zeros("weight", &[4, 3]), fc.zeros("bias", &[4]), p.zeros_no_train("running_mean", &[4]))
    };
    let (live, mut ema) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (mut w, mut b, mut m) = build(&live);
    let _ = build(&ema);
    let states: Vec<[Tensor; 3]> = {
        let _rng = common::rng_turn();
        tch::manual_seed(31);
        (0..=STEPS)
            .map(|_| [[4i64, 3].as_slice(), &[4], &[4]].map(|s| Tensor::randn(s, tch::kind::FLOAT_CPU)))
            .collect()
    };
    for (k, state) in states.iter().enumerate() {
        for (i, t) in state.iter().enumerate() {
            write_f32(&tmp.path().join(format!("s{k}-{i}")), t);
        }
    }
    let set = |w: &mut Tensor, b: &mut Tensor, m: &mut Tensor, s: &[Tensor; 3]| {
        tch::no_grad(|| {
            w.copy_(&s[0]);
            b.copy_(&s[1]);
            m.copy_(&s[2]);
        })
    };
    // The copy starts from the model as it is when the average is made (state 0), then one update per step.
    set(&mut w, &mut b, &mut m, &states[0]);
    let mut average = Average::new(0.9, &mut ema, &live);
    for state in &states[1..] {
        set(&mut w, &mut b, &mut m, state);
        average.update();
    }
    let script = format!(
        r#"
import sys, numpy as np, torch
from timm.utils import ModelEmaV2
d = sys.argv[1]
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.register_buffer("running_mean", torch.zeros(4))
net = Net()
def load(k):
    with torch.no_grad():
        for i, t in enumerate([net.fc.weight, net.fc.bias, net.running_mean]):
            t.copy_(torch.from_numpy(np.fromfile(f"{{d}}/s{{k}}-{{i}}", np.float32).reshape(t.shape)))
load(0)
ema = ModelEmaV2(net, decay=0.9)
for k in range(1, {STEPS} + 1):
    load(k)
    ema.update(net)
m = ema.module
for i, t in enumerate([m.fc.weight, m.fc.bias, m.running_mean]):
    t.detach().numpy().tofile(f"{{d}}/ema{{i}}")
"#
    );
    run_python(&script, tmp.path());
    let ours = ema.variables();
    for (i, name) in ["fc.weight", "fc.bias", "running_mean"].into_iter().enumerate() {
        let theirs = read_f32(&tmp.path().join(format!("ema{i}")));
        assert_close(&Vec::<f32>::try_from(ours[name].flatten(0, -1)).unwrap(), &theirs, name);
        assert!(!ours[name].equal(&states[STEPS][i]), "{name}: an average, not the last weights");
    }
}
