//! The tutorial's logged figures (its Paddle run on one GPU, as TUTORIAL.md restates them), which
//! the report and the plot set beside a run's own.

use serde::{Deserialize, Serialize};

/// One epoch of the tutorial's log (docs/TUTORIAL.md, "The tutorial's log").
pub struct TutorialEpoch {
    pub model: &'static str,
    pub epoch: usize,
    pub figures: Figures,
}

/// What the tutorial logged for an epoch (`None` where its log is cut off).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Figures {
    pub train_acc: f64,
    pub eval_acc: Option<f64>,
    pub train_ms_per_step: f64,
    pub eval_ms_per_step: Option<f64>,
    pub last_train_loss: f64,
    pub last_eval_loss: Option<f64>,
}

const fn tutorial_epoch(
    model: &'static str,
    epoch: usize,
    (train_acc, eval_acc): (f64, Option<f64>),
    (train_ms_per_step, eval_ms_per_step): (f64, Option<f64>),
    (last_train_loss, last_eval_loss): (f64, Option<f64>),
) -> TutorialEpoch {
    TutorialEpoch {
        model,
        epoch,
        figures: Figures { train_acc, eval_acc, train_ms_per_step, eval_ms_per_step, last_train_loss, last_eval_loss },
    }
}

/// The tutorial's logged epochs (one GPU on Baidu AI Studio, Paddle 2.0, 224 px, batch 64).
pub const TUTORIAL_EPOCHS: [TutorialEpoch; 7] = [
    tutorial_epoch("cspdarknet53", 1, (0.4020, Some(0.4445)), (355.0, Some(187.0)), (1.0268, Some(1.5527))),
    tutorial_epoch("cspdarknet53", 2, (0.6099, None), (354.0, None), (1.2340, None)),
    tutorial_epoch("darknet53", 1, (0.3489, Some(0.4902)), (233.0, Some(169.0)), (1.4409, Some(1.5534))),
    tutorial_epoch("darknet53", 2, (0.5933, Some(0.6465)), (227.0, Some(165.0)), (0.9414, Some(1.1782))),
    tutorial_epoch("darknet53", 3, (0.7077, Some(0.6902)), (228.0, Some(181.0)), (1.2450, Some(0.9096))),
    tutorial_epoch("darknet53", 4, (0.7720, Some(0.7727)), (228.0, Some(165.0)), (0.5926, Some(0.6070))),
    tutorial_epoch("darknet53", 5, (0.8134, Some(0.8045)), (226.0, Some(167.0)), (0.1841, Some(0.3209))),
];

/// Paddle-style parameter counts (1000-class head) as the tutorial's text states them.
pub const TUTORIAL_PARAMS: [(&str, i64); 2] = [("darknet53", 41_645_640), ("cspdarknet53", 19_047_240)];
