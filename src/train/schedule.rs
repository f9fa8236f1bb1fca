//! `--sched`: the learning rate of every step, computed as `torch.optim.lr_scheduler` computes it.
//!
//! PyTorch's schedulers are recursive (each value is the previous one times a factor), so their
//! values carry the rounding of every step before them; the closed forms differ in the last bits.
//! To give PyTorch's values to the bit, this module runs the same state machine: `LinearLR` for the
//! warm-up, chained to `CosineAnnealingLR`, `StepLR` or `MultiStepLR` by `SequentialLR`, with their
//! `last_epoch` and `_step_count` and the branch each takes. The table of values is a function of
//! the settings and the position alone, so a resumed run finds its learning rate without state.

use crate::config::{SchedName, SchedOn, Schedule};
use std::f64::consts::PI;

/// One `torch.optim.lr_scheduler` class with its settings.
#[derive(Clone, Debug)]
enum Scheduler {
    Linear { start_factor: f64, end_factor: f64, total_iters: i64 },
    Cosine { t_max: i64, eta_min: f64 },
    Step { step_size: i64, gamma: f64 },
    MultiStep { milestones: Vec<i64>, gamma: f64 },
}

/// A scheduler's counters: `last_epoch` and `_step_count`.
struct Counters {
    last_epoch: i64,
    step_count: i64,
}

impl Scheduler {
    /// `get_lr()` at `c.last_epoch` from the group's current `lr`; `initial` is PyTorch's
    /// `_is_initial` (the step the constructor takes).
    fn get_lr(&self, lr: f64, base_lr: f64, c: &Counters, initial: bool) -> f64 {
        let e = c.last_epoch;
        match *self {
            Scheduler::Linear { start_factor, end_factor, total_iters } => {
                if e == 0 {
                    lr * start_factor
                } else if initial || e > total_iters {
                    lr
                } else {
                    let slope = end_factor - start_factor;
                    lr * (1.0 + slope / (total_iters as f64 * start_factor + (e - 1) as f64 * slope))
                }
            }
            Scheduler::Cosine { t_max, eta_min } => {
                let t = t_max as f64;
                if initial {
                    lr
                } else if c.step_count == 1 && e > 0 {
                    eta_min + (base_lr - eta_min) * (1.0 + (e as f64 * PI / t).cos()) / 2.0
                } else if (e - 1 - t_max).rem_euclid(2 * t_max) == 0 {
                    lr + (base_lr - eta_min) * (1.0 - (PI / t).cos()) / 2.0
                } else {
                    (1.0 + (PI * e as f64 / t).cos()) / (1.0 + (PI * (e - 1) as f64 / t).cos()) * (lr - eta_min)
                        + eta_min
                }
            }
            Scheduler::Step { step_size, gamma } => {
                if e == 0 || e % step_size != 0 {
                    lr
                } else {
                    lr * gamma
                }
            }
            Scheduler::MultiStep { ref milestones, gamma } => {
                let hits = milestones.iter().filter(|&&m| m == e).count();
                if hits == 0 {
                    lr
                } else {
                    lr * gamma.powf(hits as f64)
                }
            }
        }
    }

    /// `_get_closed_form_lr()` at `last_epoch` 0, what `SequentialLR` sets when it hands over.
    fn closed_form_at_zero(&self, base_lr: f64) -> f64 {
        match *self {
            Scheduler::Linear { start_factor, .. } => base_lr * start_factor,
            Scheduler::Cosine { eta_min, .. } => eta_min + (base_lr - eta_min) * (1.0 + 0f64.cos()) / 2.0,
            Scheduler::Step { .. } => base_lr * 1.0,
            Scheduler::MultiStep { ref milestones, gamma } => {
                base_lr * gamma.powf(milestones.iter().filter(|&&m| m <= 0).count() as f64)
            }
        }
    }

    /// Runs `step()` once: counters forward, then the new rate.
    fn step(&self, lr: f64, base_lr: f64, c: &mut Counters) -> f64 {
        c.step_count += 1;
        c.last_epoch += 1;
        self.get_lr(lr, base_lr, c, false)
    }
}

/// The learning rate of every step of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct LrTable {
    on: SchedOn,
    steps_per_epoch: usize,
    /// One value per unit (epoch or step) of the run.
    values: Vec<f64>,
}

impl LrTable {
    /// The rates of `epochs` epochs of `steps_per_epoch` steps each, starting from `base_lr`.
    pub fn new(schedule: &Schedule, base_lr: f64, epochs: usize, steps_per_epoch: usize) -> LrTable {
        let per_epoch = match schedule.on {
            SchedOn::Epoch => 1,
            SchedOn::Step => steps_per_epoch as i64,
        };
        let units = epochs as i64 * per_epoch;
        let warmup = schedule.warmup_epochs as i64 * per_epoch;
        let main = match schedule.sched {
            SchedName::None => None,
            SchedName::Cosine => Some(Scheduler::Cosine { t_max: (units - warmup).max(1), eta_min: schedule.min_lr }),
            SchedName::Step => Some(Scheduler::Step {
                step_size: (schedule.decay_epochs.first().copied().unwrap_or(1) as i64 * per_epoch).max(1),
                gamma: schedule.decay_rate,
            }),
            SchedName::Multistep => Some(Scheduler::MultiStep {
                milestones: schedule.decay_epochs.iter().map(|&m| m as i64 * per_epoch - warmup).collect(),
                gamma: schedule.decay_rate,
            }),
        };
        let warm = (warmup > 0).then(|| Scheduler::Linear {
            start_factor: schedule.warmup_lr / base_lr,
            end_factor: 1.0,
            total_iters: warmup,
        });
        LrTable { on: schedule.on, steps_per_epoch, values: course(base_lr, warm, main, warmup, units.max(1)) }
    }

    /// The rate of step `step` (0-based) of epoch `epoch` (1-based).
    pub fn lr(&self, epoch: usize, step: usize) -> f64 {
        let unit = match self.on {
            SchedOn::Epoch => epoch - 1,
            SchedOn::Step => (epoch - 1) * self.steps_per_epoch + step,
        };
        self.values[unit.min(self.values.len() - 1)]
    }

    /// Every unit's rate, in order (epochs or steps, as `--sched-on`).
    pub fn values(&self) -> &[f64] {
        &self.values
    }
}

/// The rates of `units` units: the group's `lr` after construction, then after each `step()`.
fn course(base_lr: f64, warm: Option<Scheduler>, main: Option<Scheduler>, warmup: i64, units: i64) -> Vec<f64> {
    let mut out = Vec::with_capacity(units as usize);
    match (warm, main) {
        (None, None) => out.resize(units as usize, base_lr),
        // One scheduler: its constructor's step (initial), then `step()` per unit.
        (Some(only), None) | (None, Some(only)) => {
            let mut c = Counters { last_epoch: 0, step_count: 1 };
            let mut lr = only.get_lr(base_lr, base_lr, &c, true);
            out.push(lr);
            for _ in 1..units {
                lr = only.step(lr, base_lr, &mut c);
                out.push(lr);
            }
        }
        // SequentialLR([warm, main], milestones=[warmup]): the constructors of both ran their
        // initial steps (main's `_step_count` stays 1), SequentialLR restored the base rate, undid
        // one epoch of each and re-ran warm's initial step.
        (Some(warm), Some(main)) => {
            let mut w = Counters { last_epoch: 0, step_count: 1 };
            let mut m = Counters { last_epoch: -1, step_count: 1 };
            let mut lr = warm.get_lr(base_lr, base_lr, &w, true);
            out.push(lr);
            for t in 1..units {
                lr = if t < warmup {
                    warm.step(lr, base_lr, &mut w)
                } else if t == warmup {
                    m.last_epoch = 0;
                    main.closed_form_at_zero(base_lr)
                } else {
                    main.step(lr, base_lr, &mut m)
                };
                out.push(lr);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(sched: SchedName, warmup_epochs: usize) -> Schedule {
        Schedule {
            sched,
            on: SchedOn::Epoch,
            warmup_epochs,
            warmup_lr: 1e-4,
            min_lr: 0.0,
            decay_epochs: vec![3, 6],
            decay_rate: 0.5,
        }
    }

    #[test]
    fn warmup_rises_linearly_then_cosine_falls_to_the_floor() {
        let table = LrTable::new(&schedule(SchedName::Cosine, 2), 1e-3, 10, 7);
        let v = table.values();
        assert_eq!(v.len(), 10);
        assert!((v[0] - 1e-4).abs() < 1e-18 && v[1] > v[0], "{v:?}");
        assert!((v[2] - 1e-3).abs() < 1e-15, "the main schedule starts at the base rate: {v:?}");
        assert!(v[2..].windows(2).all(|w| w[1] < w[0]), "cosine falls: {v:?}");
        assert_eq!(table.lr(3, 5), v[2], "per epoch, every step of epoch 3 has its rate");
    }

    #[test]
    fn multistep_drops_at_the_named_epochs_counted_from_the_start() {
        let v = LrTable::new(&schedule(SchedName::Multistep, 1), 0.1, 8, 3).values().to_vec();
        // Warm-up in epoch 1, then 0.1 until epoch 3's end, 0.05 until epoch 6's, then 0.025.
        assert_eq!(&v[1..], &[0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]);
    }

    #[test]
    fn per_step_units_are_steps() {
        let mut s = schedule(SchedName::Step, 0);
        s.on = SchedOn::Step;
        s.decay_epochs = vec![1];
        let table = LrTable::new(&s, 0.1, 3, 4);
        assert_eq!(table.values().len(), 12);
        assert_eq!((table.lr(1, 3), table.lr(2, 0), table.lr(3, 0)), (0.1, 0.05, 0.025));
    }
}
