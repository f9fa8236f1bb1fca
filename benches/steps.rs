//! `cargo bench`: csp-tch's train and eval steps for every backbone (32 px, batch 64), through the
//! same code as `csp-tch bench`. For the side-by-side comparison with PyTorch use `scripts/bench.sh`.

use csp_tch::bench::{self, BenchConfig, Mode};
use csp_tch::config::Recipe;

fn main() {
    // As the csp-tch binary runs.
    csp_tch::environment::keep_freed_memory();
    let device = tch::Device::cuda_if_available();
    for model in csp_tch::models::model_names() {
        for mode in [Mode::Train, Mode::Eval] {
            let config = BenchConfig {
                model: model.to_string(),
                recipe: Recipe { epochs: 1, image_size: 32, ..Recipe::tutorial() },
                execution: Default::default(),
                steps: 5,
                warmup: 2,
                mode,
                device,
                breakdown: false,
            };
            let r = bench::run(&config, None).expect("benchmark");
            println!(
                "{model:<18} {mode:<5?} {:>9.1} ms/step {:>8.1} images/s {:>7.1} GFLOP/s ({})",
                r.ms_per_step, r.images_per_s, r.gflops, r.device
            );
        }
    }
}
