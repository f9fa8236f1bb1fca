//! What training measures: one row of a model's metrics CSV per epoch.

use serde::{Deserialize, Serialize};

/// One row of `<model>.csv`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Running accuracy over the epoch's batches, as the tutorial's log reports it.
    pub train_acc: f64,
    /// Mean loss over the whole test set.
    pub eval_loss: f64,
    pub eval_acc: f64,
    pub train_ms_per_step: f64,
    pub eval_ms_per_step: f64,
    pub epoch_seconds: f64,
    pub train_images_per_s: f64,
    /// The epoch's last training batch loss (what the tutorial's log prints as `loss`).
    pub last_train_loss: f64,
    /// The last test batch's loss (what the tutorial's eval log prints as `loss`).
    pub last_eval_loss: f64,
    /// Time the epoch's first training and evaluation steps took beyond the epoch's steady rate:
    /// cuDNN's algorithm search, the allocator's growth, CUDA graph capture
    /// ([`crate::train::warmup_seconds`]).
    #[serde(default)]
    pub warmup_seconds: f64,
    /// The learning rate of the epoch's first step, when a schedule moves it (`--sched`,
    /// `--warmup-epochs`); absent from the CSV of a constant rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The evaluation of the `--ema` weights, beside the raw weights' above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss_ema: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_acc_ema: Option<f64>,
    /// The dataset trained on (`--dataset`), when it is not the tutorial's CIFAR-10 (whose CSVs stay
    /// as they were); comparison.json's `data` says the rest (splits, sizes, cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

impl EpochMetrics {
    /// Whether every metric is a finite number (a diverged run writes NaN or infinity).
    pub fn all_finite(&self) -> bool {
        [
            self.train_loss,
            self.train_acc,
            self.eval_loss,
            self.eval_acc,
            self.train_ms_per_step,
            self.eval_ms_per_step,
            self.epoch_seconds,
            self.train_images_per_s,
            self.last_train_loss,
            self.last_eval_loss,
            self.warmup_seconds,
        ]
        .iter()
        .all(|v| v.is_finite())
    }
}
