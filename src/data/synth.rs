//! Synthetic sets in CIFAR-10's binary layout, for tests and demos.

use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::Path;

use super::cifar10::{CLASSES, META_FILE, RECORDS_PER_FILE, RECORD_BYTES, TEST_FILE, TRAIN_FILES};
use super::generator::SplitMix64;
use crate::files::Staging;

/// Writes a learnable synthetic set in the CIFAR-10 binary layout: `train` and `test` distinct
/// images, 10 classes, each a colour grating of its own orientation and frequency plus noise.
///
/// tch's loader reads exactly 10,000 records per file, so every file is written full-size: the
/// `train` (`test`) distinct records are repeated in order to fill the 50,000 (10,000) slots. The
/// defaults fill the layout with distinct images; `--train-limit` then picks from the full layout.
pub fn write_synthetic(dir: &Path, train: usize, test: usize, seed: u64) -> Result<()> {
    ensure!((1..=50_000).contains(&train), "--train {train} must be in 1..=50000");
    ensure!((1..=10_000).contains(&test), "--test {test} must be in 1..=10000");
    let staging = Staging::new(dir)?;
    let train_records = synthetic_records(train, seed);
    let test_records = synthetic_records(test, seed ^ 0x5EED_7E57);
    for (k, name) in TRAIN_FILES.iter().enumerate() {
        write_cycled(&staging.path.join(name), &train_records, k * RECORDS_PER_FILE)?;
    }
    write_cycled(&staging.path.join(TEST_FILE), &test_records, 0)?;
    let names: Vec<String> = (0..CLASSES).map(|c| format!("pattern{c}")).collect();
    std::fs::write(staging.path.join(META_FILE), names.join("\n") + "\n")?;
    staging.commit(dir)
}

/// `n` records (label byte + CHW pixels) of the synthetic classes, drawn from `seed` alone (not from
/// libtorch's global generator, which training seeds).
fn synthetic_records(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let mut labels: Vec<usize> = (0..n).map(|i| i % CLASSES as usize).collect();
    rng.shuffle(&mut labels);
    let mut records = Vec::with_capacity(n * RECORD_BYTES);
    for &label in &labels {
        records.push(label as u8);
        // Class c: a grating at angle c * 18 degrees, frequency 2 + c % 3 cycles per image, its three
        // channels phase-shifted by c; then a random brightness and Gaussian noise.
        let c = label as f64;
        let angle = c * std::f64::consts::PI / 10.0;
        let freq = (2.0 + c % 3.0) * std::f64::consts::TAU;
        let brightness = rng.uniform() * 0.6 + 0.7;
        for channel in 0..3 {
            let phase = [0.0, 2.1, 4.2][channel] * (c + 1.0);
            for (y, x) in (0..32).flat_map(|y| (0..32).map(move |x| (y as f64 / 32.0, x as f64 / 32.0))) {
                let wave = ((x * angle.cos() + y * angle.sin()) * freq + phase).sin();
                let pixel = wave * 90.0 * brightness + 128.0 + rng.normal() * 25.0;
                records.push(pixel.clamp(0.0, 255.0).round() as u8);
            }
        }
    }
    records
}

/// Writes one full-size file: records `first .. first + 10,000` of `records` repeated cyclically.
fn write_cycled(path: &Path, records: &[u8], first: usize) -> Result<()> {
    let count = records.len() / RECORD_BYTES;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in first..first + RECORDS_PER_FILE {
        let r = i % count;
        out.write_all(&records[r * RECORD_BYTES..(r + 1) * RECORD_BYTES])?;
    }
    out.flush().with_context(|| format!("cannot write {}", path.display()))
}
