//! CIFAR-100 in its binary layout (`cifar-100-binary.tar.gz`): `train.bin` (50,000 records) and
//! `test.bin` (10,000), each record 3,074 bytes: the coarse label, the fine label, then 1024 R,
//! 1024 G, 1024 B bytes row-major; `fine_label_names.txt` and `coarse_label_names.txt` name them.
//! tch's loader reads CIFAR-10's records only, so these are read here, straight into uint8 tensors.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::Tensor;

use super::{records_file_problem, Layout, Split};
use crate::config::Cifar100Labels;

pub const TRAIN_FILE: &str = "train.bin";
pub const TEST_FILE: &str = "test.bin";
pub const FINE_NAMES: &str = "fine_label_names.txt";
pub const COARSE_NAMES: &str = "coarse_label_names.txt";
pub const TRAIN_RECORDS: usize = 50_000;
pub const TEST_RECORDS: usize = 10_000;
pub const RECORD_BYTES: usize = 2 + 3 * 32 * 32;
pub const DEFAULT_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz";
pub const DEFAULT_MD5: &str = "03b5dce01913d631647c71ecec9e9cb8";

pub const LAYOUT: Layout = Layout {
    what: "CIFAR-100 (binary version)",
    download_flags: "--dataset cifar100 ",
    marker: TRAIN_FILE,
    problem: layout_problem,
    by_hand: "put train.bin and test.bin from cifar-100-binary.tar.gz",
};

fn layout_problem(dir: &Path) -> Option<String> {
    [(TRAIN_FILE, TRAIN_RECORDS), (TEST_FILE, TEST_RECORDS)]
        .into_iter()
        .find_map(|(name, records)| records_file_problem(dir, name, records, RECORD_BYTES, "CIFAR-100"))
}

fn read_split(dir: &Path, name: &str, labels: Cifar100Labels) -> Result<Split> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (limit, offset) = match labels {
        Cifar100Labels::Coarse => (20, 0),
        Cifar100Labels::Fine => (100, 1),
    };
    let records = bytes.len() / RECORD_BYTES;
    let mut label_values = Vec::with_capacity(records);
    let mut pixels = Vec::with_capacity(records * (RECORD_BYTES - 2));
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[offset];
        if i64::from(label) >= limit {
            bail!(
                "{}: record {i} has {labels:?} label {label}, expected 0..{}: the file is corrupt or not CIFAR-100",
                path.display(),
                limit - 1
            );
        }
        label_values.push(i64::from(label));
        pixels.extend_from_slice(&record[2..]);
    }
    Ok(Split {
        images: Tensor::from_slice(&pixels).view([records as i64, 3, 32, 32]),
        labels: Tensor::from_slice(&label_values),
    })
}

fn class_names(dir: &Path, labels: Cifar100Labels) -> Vec<String> {
    let (file, count) = match labels {
        Cifar100Labels::Coarse => (COARSE_NAMES, 20),
        Cifar100Labels::Fine => (FINE_NAMES, 100),
    };
    let names: Vec<String> = std::fs::read_to_string(dir.join(file))
        .map(|s| s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    if names.len() == count {
        names
    } else {
        (0..count).map(|c| format!("class{c}")).collect()
    }
}

/// Loads both splits with the fine (100) or coarse (20) labels, and their names.
pub fn load(dir: &Path, labels: Cifar100Labels) -> Result<(Split, Split, Vec<String>)> {
    LAYOUT.check(dir)?;
    Ok((read_split(dir, TRAIN_FILE, labels)?, read_split(dir, TEST_FILE, labels)?, class_names(dir, labels)))
}
