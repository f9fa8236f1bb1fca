//! `--sched` against `torch.optim.lr_scheduler` in the project's venv: the learning rate of every
//! step of a few hundred, for every schedule with and without warm-up, per epoch and per step.

mod common;

use common::peer::{read_f64, run_python};
use csp_tch::config::{SchedName, SchedOn, Schedule};
use csp_tch::train::schedule::LrTable;

struct Case {
    schedule: Schedule,
    base_lr: f64,
    epochs: usize,
    steps_per_epoch: usize,
    /// The same in PyTorch: `main` builds the scheduler after warm-up from `opt` (None: LinearLR alone).
    main: Option<&'static str>,
}

fn case(
    sched: SchedName,
    on: SchedOn,
    warmup_epochs: usize,
    decay_epochs: Vec<usize>,
    main: Option<&'static str>,
) -> Case {
    let (epochs, steps_per_epoch) = match on {
        SchedOn::Step => (4, 75),
        SchedOn::Epoch => (300, 1),
    };
    Case {
        schedule: Schedule { sched, on, warmup_epochs, warmup_lr: 2e-5, min_lr: 1e-5, decay_epochs, decay_rate: 0.3 },
        base_lr: 0.1,
        epochs,
        steps_per_epoch,
        main,
    }
}

#[test]
fn every_schedule_gives_torchs_learning_rate_at_every_step() {
    use SchedName::*;
    use SchedOn::{Epoch as PerEpoch, Step as PerStep};
    // In PyTorch terms, with U the units per epoch (75 steps, or 1) and W the warm-up's units.
    let cases = [
        case(Cosine, PerStep, 0, vec![], Some("CosineAnnealingLR(opt, T_max=300, eta_min=1e-5)")),
        case(Cosine, PerStep, 1, vec![], Some("CosineAnnealingLR(opt, T_max=225, eta_min=1e-5)")),
        case(Cosine, PerEpoch, 0, vec![], Some("CosineAnnealingLR(opt, T_max=300, eta_min=1e-5)")),
        case(Cosine, PerEpoch, 10, vec![], Some("CosineAnnealingLR(opt, T_max=290, eta_min=1e-5)")),
        case(Step, PerStep, 0, vec![1], Some("StepLR(opt, step_size=75, gamma=0.3)")),
        case(Step, PerStep, 1, vec![1], Some("StepLR(opt, step_size=75, gamma=0.3)")),
        case(Multistep, PerStep, 1, vec![2, 3], Some("MultiStepLR(opt, milestones=[75, 150], gamma=0.3)")),
        case(Multistep, PerEpoch, 0, vec![100, 200], Some("MultiStepLR(opt, milestones=[100, 200], gamma=0.3)")),
        case(None, PerStep, 2, vec![], Option::None),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut script = String::from(
        r#"
import sys, warnings, numpy as np, torch
from torch.optim.lr_scheduler import *
warnings.simplefilter("ignore")
d = sys.argv[1]
def run(k, base_lr, units, warmup, warmup_lr, main):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    if warmup == 0:
        sched = main(opt)
    else:
        warm = LinearLR(opt, start_factor=warmup_lr / base_lr, end_factor=1.0, total_iters=warmup)
        sched = warm if main is None else SequentialLR(opt, [warm, main(opt)], milestones=[warmup])
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(units - 1):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    np.array(lrs, np.float64).tofile(f"{d}/lr{k}")
"#,
    );
    for (k, c) in cases.iter().enumerate() {
        let units = c.epochs * c.steps_per_epoch;
        let warmup = c.schedule.warmup_epochs * c.steps_per_epoch;
        let main = c.main.map_or("None".to_string(), |m| format!("lambda opt: {m}"));
        script += &format!("run({k}, {}, {units}, {warmup}, {}, {main})\n", c.base_lr, c.schedule.warmup_lr);
    }
    run_python(&script, tmp.path());
    for (k, c) in cases.iter().enumerate() {
        let theirs = read_f64(&tmp.path().join(format!("lr{k}")));
        let table = LrTable::new(&c.schedule, c.base_lr, c.epochs, c.steps_per_epoch);
        let ours = table.values();
        assert_eq!(ours.len(), theirs.len(), "case {k}");
        for (unit, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a - b).abs() <= 1e-12 * b.abs(), "case {k} ({:?}), unit {unit}: {a} vs torch's {b}", c.main);
        }
        // Units are what --sched-on says: per step, every step of an epoch has its own rate.
        let (epoch, step) = (3, c.steps_per_epoch - 1);
        assert_eq!(table.lr(epoch, step), theirs[(epoch - 1) * c.steps_per_epoch + step], "case {k}");
        assert!(theirs.windows(2).any(|w| w[0] != w[1]), "case {k}: the rate moves");
    }
}
