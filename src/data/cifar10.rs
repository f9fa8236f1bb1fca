//! CIFAR-10 in its binary layout: check and load (through tch's loader).
//!
//! The layout is fixed: `data_batch_1..5.bin` and `test_batch.bin`, each 10,000 records of
//! 3,073 bytes (label byte, then 1024 R, 1024 G, 1024 B bytes, row-major), plus an optional
//! `batches.meta.txt` with the class names. tch's `vision::cifar::load_dir` reads exactly that,
//! so synthetic sets are written in the same full-size layout (see [`write_synthetic`]).

use anyhow::{bail, Context, Result};
use std::path::Path;

use tch::{Kind, Tensor};

use super::{records_file_problem, Layout, Split};

pub const TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
pub const TEST_FILE: &str = "test_batch.bin";
pub const META_FILE: &str = "batches.meta.txt";
pub const RECORDS_PER_FILE: usize = 10_000;
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
pub const RECORD_BYTES: usize = IMAGE_BYTES + 1;
pub const FILE_BYTES: u64 = (RECORDS_PER_FILE * RECORD_BYTES) as u64;
pub const CLASSES: i64 = 10;
pub const DEFAULT_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const DEFAULT_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
pub const CLASS_NAMES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

fn all_files() -> impl Iterator<Item = &'static str> {
    TRAIN_FILES.into_iter().chain([TEST_FILE])
}

/// The published archive's layout.
pub const LAYOUT: Layout = Layout {
    what: "CIFAR-10 (binary version)",
    download_flags: "",
    marker: TRAIN_FILES[0],
    problem: layout_problem,
    by_hand: "put data_batch_1..5.bin and test_batch.bin from cifar-10-binary.tar.gz",
};

/// What is wrong with the layout in `dir`, naming the file by its name alone; `None` when every
/// file is present with its exact size.
pub(crate) fn layout_problem(dir: &Path) -> Option<String> {
    all_files().find_map(|name| records_file_problem(dir, name, RECORDS_PER_FILE, RECORD_BYTES, "CIFAR-10"))
}

/// Checks that every file of the layout is present with its exact size.
pub fn check_layout(dir: &Path) -> Result<()> {
    LAYOUT.check(dir)
}

/// Loads the binary layout through `tch::vision::cifar::load_dir`, after checking it: the train
/// and test splits, and the class names. Labels outside 0..9 are an error naming the file and record.
pub fn load(dir: &Path) -> Result<(Split, Split, Vec<String>)> {
    check_layout(dir)?;
    let ds =
        tch::vision::cifar::load_dir(dir).with_context(|| format!("cannot read CIFAR-10 from {}", dir.display()))?;
    check_labels(dir, &ds.train_labels, &TRAIN_FILES)?;
    check_labels(dir, &ds.test_labels, &[TEST_FILE])?;
    // tch hands out float pixels scaled to [0, 1]; k/255 * 255 rounds back to k exactly.
    let to_u8 = |images: &Tensor| (images * 255.0).round().to_kind(Kind::Uint8);
    Ok((
        Split { images: to_u8(&ds.train_images), labels: ds.train_labels },
        Split { images: to_u8(&ds.test_images), labels: ds.test_labels },
        read_class_names(dir),
    ))
}

fn check_labels(dir: &Path, labels: &Tensor, files: &[&str]) -> Result<()> {
    let bad = labels.lt(0).logical_or(&labels.ge(CLASSES)).nonzero();
    if bad.size()[0] > 0 {
        let index = bad.int64_value(&[0, 0]) as usize;
        let label = labels.int64_value(&[index as i64]);
        bail!(
            "{}: record {} has label byte {label}, expected 0..9: the file is corrupt or not CIFAR-10; {}",
            dir.join(files[index / RECORDS_PER_FILE]).display(),
            index % RECORDS_PER_FILE,
            LAYOUT.how_to_get(dir)
        );
    }
    Ok(())
}

/// Class names from batches.meta.txt when present, else CIFAR-10's.
fn read_class_names(dir: &Path) -> Vec<String> {
    let from_file: Vec<String> = std::fs::read_to_string(dir.join(META_FILE))
        .map(|s| s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    if from_file.len() == CLASSES as usize {
        from_file
    } else {
        CLASS_NAMES.iter().map(|s| s.to_string()).collect()
    }
}
