//! CIFAR-10 in its binary layout: check, fetch, load (through tch's loader), subset, synthesise.
//!
//! The layout is fixed: `data_batch_1..5.bin` and `test_batch.bin`, each 10,000 records of
//! 3,073 bytes (label byte, then 1024 R, 1024 G, 1024 B bytes, row-major), plus an optional
//! `batches.meta.txt` with the class names. tch's `vision::cifar::load_dir` reads exactly that,
//! so synthetic sets are written in the same full-size layout (see [`write_synthetic`]).

pub mod download;
pub mod generator;
pub mod synth;
pub mod transform;

pub use download::{download, ensure, Source};
pub use generator::{balanced_subset, epoch_permutation, SplitMix64};
pub use synth::write_synthetic;

use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

use tch::{Device, Kind, Tensor};

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

/// What to tell a user whose data folder is missing or broken (`download` wants a folder that does
/// not exist yet, so a broken one has to go first).
fn how_to_get(dir: &Path) -> String {
    let remove = if dir.exists() { format!("remove {} and ", dir.display()) } else { String::new() };
    format!(
        "{remove}get CIFAR-10 (binary version) with `csp-tch data download --data-dir {0}`, or put \
         data_batch_1..5.bin and test_batch.bin from cifar-10-binary.tar.gz into {0}",
        dir.display()
    )
}

/// What is wrong with the layout in `dir`, naming the file by its name alone; `None` when every
/// file is present with its exact size.
pub(crate) fn layout_problem(dir: &Path) -> Option<String> {
    all_files().find_map(|name| match std::fs::metadata(dir.join(name)) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some(format!("{name} is missing")),
        Err(err) => Some(format!("{name} cannot be read ({err})")),
        Ok(meta) if !meta.is_file() => Some(format!("{name} is not a file")),
        Ok(meta) if meta.len() != FILE_BYTES => Some(format!(
            "{name} has {} bytes, expected {FILE_BYTES} ({RECORDS_PER_FILE} records of {RECORD_BYTES} bytes): \
             truncated or not CIFAR-10's binary version",
            meta.len()
        )),
        Ok(_) => None,
    })
}

/// What keeps `dir` from being read as a folder, when something does: it is missing (`Ok(false)`),
/// or an error naming the real cause (a file in its place, no permission, a symbolic-link loop),
/// whose remedy is not to fetch the data again.
pub fn folder_state(dir: &Path, flag: &str) -> Result<bool> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => match std::fs::read_dir(dir) {
            Ok(_) => Ok(true),
            Err(err) => bail!("{flag} {}: cannot read the folder ({err}); check its permissions", dir.display()),
        },
        Ok(_) => {
            bail!("{flag} {} is a file, not a folder; point {flag} at the folder of the binary layout", dir.display())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && dir.symlink_metadata().is_err() => Ok(false),
        Err(err) => bail!("{flag} {}: cannot reach the folder ({err}); check the path and its links", dir.display()),
    }
}

/// Checks that every file of the layout is present with its exact size.
pub fn check_layout(dir: &Path) -> Result<()> {
    ensure!(folder_state(dir, "--data-dir")?, "CIFAR-10 folder {} does not exist; {}", dir.display(), how_to_get(dir));
    if let Some(problem) = layout_problem(dir) {
        bail!("{}: {problem}; {}", dir.display(), how_to_get(dir));
    }
    Ok(())
}

/// The dataset held once on the training device: images as uint8 `[N, 3, 32, 32]`, labels int64.
pub struct Cifar {
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
    pub class_names: Vec<String>,
}

/// Loads the binary layout through `tch::vision::cifar::load_dir`, after checking it.
/// Labels outside 0..9 are an error naming the file and record.
pub fn load(dir: &Path) -> Result<Cifar> {
    check_layout(dir)?;
    let ds =
        tch::vision::cifar::load_dir(dir).with_context(|| format!("cannot read CIFAR-10 from {}", dir.display()))?;
    check_labels(dir, &ds.train_labels, &TRAIN_FILES)?;
    check_labels(dir, &ds.test_labels, &[TEST_FILE])?;
    // tch hands out float pixels scaled to [0, 1]; k/255 * 255 rounds back to k exactly.
    let to_u8 = |images: &Tensor| (images * 255.0).round().to_kind(Kind::Uint8);
    Ok(Cifar {
        train_images: to_u8(&ds.train_images),
        train_labels: ds.train_labels,
        test_images: to_u8(&ds.test_images),
        test_labels: ds.test_labels,
        class_names: read_class_names(dir),
    })
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
            how_to_get(dir)
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

impl Cifar {
    /// Keeps a seeded, class-balanced subset of each split (`None`: all of it).
    pub fn limit(&self, train: Option<usize>, test: Option<usize>, seed: u64) -> Result<Cifar> {
        let pick = |images: Tensor, labels: Tensor, limit: Option<usize>, flag: &str, salt: u64| {
            let Some(limit) = limit else { return Ok((images, labels)) };
            let all = Vec::<i64>::try_from(&labels)?;
            ensure!(
                limit >= 1 && limit <= all.len(),
                "{flag} {limit} is out of range: the split has {} images",
                all.len()
            );
            let index = Tensor::from_slice(&balanced_subset(&all, limit, seed ^ salt)?);
            Ok((images.index_select(0, &index), labels.index_select(0, &index)))
        };
        let (train_images, train_labels) =
            pick(self.train_images.shallow_clone(), self.train_labels.shallow_clone(), train, "--train-limit", 0x7472)?;
        let (test_images, test_labels) =
            pick(self.test_images.shallow_clone(), self.test_labels.shallow_clone(), test, "--test-limit", 0x7465)?;
        Ok(Cifar { train_images, train_labels, test_images, test_labels, class_names: self.class_names.clone() })
    }

    /// Moves the dataset to `device` once; batches are gathered there.
    pub fn to_device(self, device: Device) -> Cifar {
        Cifar {
            train_images: self.train_images.to_device(device),
            train_labels: self.train_labels.to_device(device),
            test_images: self.test_images.to_device(device),
            test_labels: self.test_labels.to_device(device),
            class_names: self.class_names,
        }
    }

    pub fn train_len(&self) -> usize {
        self.train_labels.size()[0] as usize
    }

    pub fn test_len(&self) -> usize {
        self.test_labels.size()[0] as usize
    }
}
