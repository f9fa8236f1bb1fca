//! `--amp` without a GPU: the autocast switches of src/amp.cpp drive libtorch's CPU autocast the
//! same way they drive CUDA's, so bf16 and fp16 training (and the fp16 loss scaler's checkpoint)
//! are exercised here on the CPU.

mod common;

use csp_tch::config::Precision;
use csp_tch::config::{Execution, MemoryFormat, Recipe};
use csp_tch::train::amp;
use csp_tch::train::Trainer;
use tch::{Device, Kind, Tensor};

fn recipe() -> Recipe {
    common::tiny_recipe(3)
}

fn execution() -> Execution {
    common::execution(true, MemoryFormat::Contiguous)
}

#[test]
fn autocast_computes_in_the_chosen_precision_and_then_restores() {
    let xs = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
    let weight = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
    let conv = || xs.conv2d::<Tensor>(&weight, None, [1], [1], [1], 1);
    for (precision, kind) in
        [(Precision::Bf16, Kind::BFloat16), (Precision::Fp16, Kind::Half), (Precision::Fp32, Kind::Float)]
    {
        assert_eq!(amp::autocast(Device::Cpu, precision, conv).kind(), kind, "{precision:?}");
        assert_eq!(conv().kind(), Kind::Float, "autocast still on after the {precision:?} region");
    }
    // Nested regions restore the outer one's dtype.
    let inner_then_outer = amp::autocast(Device::Cpu, Precision::Bf16, || {
        let inner = amp::autocast(Device::Cpu, Precision::Fp16, conv);
        (inner.kind(), conv().kind())
    });
    assert_eq!(inner_then_outer, (Kind::Half, Kind::BFloat16));
}

#[test]
fn amp_means_fp32_on_the_cpu() {
    assert_eq!(Precision::for_run(true, Device::Cpu), Precision::Fp32);
    assert_eq!(Precision::for_run(false, Device::Cuda(0)), Precision::Fp32);
    assert!(Precision::Fp16.needs_loss_scaling() && !Precision::Bf16.needs_loss_scaling());
}

/// `STEPS` train steps of cspdarknet53-pad0 in `precision` on fixed data: the losses and the trainer.
const STEPS: usize = 8;

fn train(precision: Precision) -> (Vec<f64>, Trainer) {
    let _rng = common::rng_turn();
    let recipe = recipe();
    let mut trainer = Trainer::new("cspdarknet53-pad0", 10, &recipe, &execution(), Device::Cpu).unwrap();
    trainer.set_precision(precision);
    (common::train_on_one_batch(&mut trainer, &recipe, STEPS, 11), trainer)
}

#[test]
fn mixed_precision_trains_fp32_master_weights() {
    let (fp32, _) = train(Precision::Fp32);
    for precision in [Precision::Fp16, Precision::Bf16] {
        let (losses, trainer) = train(precision);
        assert!(trainer.vs.variables().values().all(|v| v.kind() == Kind::Float), "{precision:?}: weights left fp32");
        assert_eq!(trainer.scaler.is_some(), precision == Precision::Fp16, "{precision:?}: loss scaler");
        // The same network in lower precision: the first loss agrees to the precision's rounding
        // (bf16 keeps 8 mantissa bits; PyTorch's CPU autocast differs from fp32 as much), and is not
        // fp32's to the bit (autocast took effect).
        let tolerance = if precision == Precision::Bf16 { 0.2 } else { 0.02 };
        assert!((losses[0] - fp32[0]).abs() <= tolerance * fp32[0], "{precision:?}: {losses:?} vs fp32 {fp32:?}");
        assert_ne!(losses[0], fp32[0], "{precision:?} computed in fp32");
        assert!(losses.iter().all(|l| l.is_finite()) && losses[STEPS - 1] < losses[0], "{precision:?}: {losses:?}");
    }
}

#[test]
fn checkpoints_keep_the_loss_scale() {
    let dir = std::env::temp_dir().join(format!("csp-tch-amp-{}", std::process::id()));
    let file = dir.join("cspdarknet53-pad0.safetensors");
    let (_, trained) = train(Precision::Fp16);
    let scaler = trained.scaler.clone().expect("fp16 scaler");
    // fp16 gradients overflow at the initial scale: the first steps are skipped and the scale halved.
    assert!(scaler.scale() < csp_tch::train::optim::LossScaler::new().scale(), "{scaler:?}");
    let meta = common::run_meta("cspdarknet53-pad0", &dir, recipe(), execution());
    trained.save_checkpoint(&file, &meta).unwrap();
    let mut resumed = Trainer::new("cspdarknet53-pad0", 10, &recipe(), &execution(), Device::Cpu).unwrap();
    resumed.set_precision(Precision::Fp16);
    resumed.restore_checkpoint(&file).unwrap();
    assert_eq!(resumed.scaler.as_ref(), Some(&scaler));
    std::fs::remove_dir_all(&dir).unwrap();
}
