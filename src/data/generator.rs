//! The seeded randomness of data: a device-independent generator, each epoch's shuffle, and
//! class-balanced subsets.

use anyhow::{ensure, Result};

/// SplitMix64: a tiny, fast, well-mixed generator; device-independent, so a seed means the same
/// subset and the same shuffles on CPU and GPU.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-40 for our sizes).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// The seeded order of `0..n` for one epoch: the same `(seed, epoch)` always gives the same order,
/// so a resumed run replays the exact batches.
pub fn epoch_permutation(n: usize, seed: u64, epoch: usize) -> Vec<i64> {
    let mut order: Vec<i64> = (0..n as i64).collect();
    SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).shuffle(&mut order);
    order
}

/// Indices of a class-balanced subset of `limit` records with labels in `0..classes`:
/// `limit / classes` per class, the remainder spread one each over the first classes, each class's
/// records drawn at random; sorted.
pub fn balanced_subset(labels: &[i64], classes: usize, limit: usize, seed: u64) -> Result<Vec<i64>> {
    let mut rng = SplitMix64::new(seed);
    let mut by_class: Vec<Vec<i64>> = vec![Vec::new(); classes];
    for (i, &label) in labels.iter().enumerate() {
        by_class[label as usize].push(i as i64);
    }
    let mut picked = Vec::with_capacity(limit);
    for (class, members) in by_class.iter_mut().enumerate() {
        let want = limit / classes + usize::from(class < limit % classes);
        ensure!(
            members.len() >= want,
            "a balanced subset of {limit} needs {want} images of class {class}, the split has {}",
            members.len()
        );
        rng.shuffle(members);
        picked.extend_from_slice(&members[..want]);
    }
    picked.sort_unstable();
    Ok(picked)
}
