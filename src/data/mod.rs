//! The data a run trains and evaluates on (`--dataset`): CIFAR-10 and CIFAR-100 in their binary
//! layouts, Flowers-102 in its published one, image folders as torchvision's `ImageFolder` reads
//! them; fetched when missing, checked, held as uint8 images, subset, and transformed per batch.
//!
//! Binary layouts are read as they are (32 px); image files are decoded once on every core into a
//! uint8 block kept in a cache on disk ([`images`]). Either way the per-batch transform
//! ([`transform`]) gathers, resizes and normalises on the training device.

pub mod augment;
pub mod bench;
pub mod cifar10;
pub mod cifar100;
pub mod decode;
pub mod download;
pub mod flowers;
pub mod folder;
pub mod generator;
pub mod images;
pub mod resample;
pub mod synth;
pub mod transform;

pub use cifar10::{check_layout, CLASSES, DEFAULT_MD5, DEFAULT_URL};
pub use generator::{balanced_subset, epoch_permutation, SplitMix64};
pub use synth::write_synthetic;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

use crate::config::{DatasetName, DatasetSpec};

/// Where a missing dataset comes from (`--data-url`, `--data-md5`; the dataset's published ones
/// when unset) and where decoded image files are cached (`--cache-dir`).
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub url: Option<String>,
    pub md5: Option<String>,
    pub cache_dir: Option<PathBuf>,
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
            bail!("{flag} {} is a file, not a folder; point {flag} at the dataset's folder", dir.display())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && dir.symlink_metadata().is_err() => Ok(false),
        Err(err) => bail!("{flag} {}: cannot reach the folder ({err}); check the path and its links", dir.display()),
    }
}

/// A dataset whose folder holds fixed files: what it is, how to get it, and what is wrong with a
/// folder that should hold it.
pub struct Layout {
    /// `CIFAR-10 (binary version)`.
    pub what: &'static str,
    /// The `data download` flags that fetch it, before `--data-dir` (`--dataset cifar100 `).
    pub download_flags: &'static str,
    /// A file the layout's folder holds, to find that folder in a published archive.
    pub marker: &'static str,
    /// What is wrong with a folder's layout, naming the file; `None` when it is complete.
    pub problem: fn(&Path) -> Option<String>,
    /// What to put into the folder by hand, without network.
    pub by_hand: &'static str,
}

impl Layout {
    /// `by_hand` into `dir`.
    pub fn by_hand_into(&self, dir: &Path) -> String {
        format!("{} into {}", self.by_hand, dir.display())
    }

    /// What to tell a user whose data folder is missing or broken (`download` wants a folder that
    /// does not exist yet, so a broken one has to go first).
    pub fn how_to_get(&self, dir: &Path) -> String {
        let remove = if dir.exists() { format!("remove {} and ", dir.display()) } else { String::new() };
        format!(
            "{remove}get {} with `csp-tch data download {}--data-dir {}`, or {}",
            self.what,
            self.download_flags,
            dir.display(),
            self.by_hand_into(dir)
        )
    }

    /// Checks that `dir` is a folder holding the whole layout.
    pub fn check(&self, dir: &Path) -> Result<()> {
        ensure!(
            folder_state(dir, "--data-dir")?,
            "{} folder {} does not exist; {}",
            self.what,
            dir.display(),
            self.how_to_get(dir)
        );
        if let Some(problem) = (self.problem)(dir) {
            bail!("{}: {problem}; {}", dir.display(), self.how_to_get(dir));
        }
        Ok(())
    }
}

/// What is wrong with `dir/name` as a file of `records` records of `record_bytes` bytes of
/// `what`'s binary version; `None` when it has exactly that size.
pub(crate) fn records_file_problem(
    dir: &Path,
    name: &str,
    records: usize,
    record_bytes: usize,
    what: &str,
) -> Option<String> {
    let expected = (records * record_bytes) as u64;
    match std::fs::metadata(dir.join(name)) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some(format!("{name} is missing")),
        Err(err) => Some(format!("{name} cannot be read ({err})")),
        Ok(meta) if !meta.is_file() => Some(format!("{name} is not a file")),
        Ok(meta) if meta.len() != expected => Some(format!(
            "{name} has {} bytes, expected {expected} ({records} records of {record_bytes} bytes): \
             truncated or not {what}'s binary version",
            meta.len()
        )),
        Ok(_) => None,
    }
}

/// Downloads `spec`'s dataset into `dir`, which must not exist yet.
pub fn download(spec: &DatasetSpec, dir: &Path, access: &Access) -> Result<()> {
    let url = |default: &str| access.url.clone().unwrap_or_else(|| default.to_string());
    let md5 = |default: &str| access.md5.clone().unwrap_or_else(|| default.to_string());
    match spec.name {
        DatasetName::Cifar10 => download::download_archive(dir, &url(DEFAULT_URL), &md5(DEFAULT_MD5), &cifar10::LAYOUT),
        DatasetName::Cifar100 => {
            download::download_archive(dir, &url(cifar100::DEFAULT_URL), &md5(cifar100::DEFAULT_MD5), &cifar100::LAYOUT)
        }
        DatasetName::Flowers102 => flowers::download(dir, &url(flowers::DEFAULT_URL), &md5(flowers::DEFAULT_MD5)),
        DatasetName::Folder => {
            bail!("--dataset folder has nothing to download: point --data-dir at <split>/<class>/<image files>")
        }
    }
}

/// Makes sure `dir` holds `spec`'s dataset: downloads it when the folder is missing (an image
/// folder is never downloaded), checks its layout otherwise.
pub fn ensure(spec: &DatasetSpec, dir: &Path, access: &Access) -> Result<()> {
    if spec.name != DatasetName::Folder && !folder_state(dir, "--data-dir")? {
        download(spec, dir, access)?;
    }
    match spec.name {
        DatasetName::Cifar10 => cifar10::LAYOUT.check(dir),
        DatasetName::Cifar100 => cifar100::LAYOUT.check(dir),
        DatasetName::Flowers102 => flowers::LAYOUT.check(dir),
        DatasetName::Folder => folder::split_roots(dir, &spec.train_split, spec.val_split.as_deref()).map(|_| ()),
    }
}

/// The number of classes of `spec`'s dataset in `dir`, known before it loads (an image folder's
/// class folders are listed).
pub fn class_count(spec: &DatasetSpec, dir: &Path) -> Result<i64> {
    Ok(match spec.name {
        DatasetName::Cifar10 => CLASSES,
        DatasetName::Cifar100 => match spec.cifar100_labels {
            crate::config::Cifar100Labels::Fine => 100,
            crate::config::Cifar100Labels::Coarse => 20,
        },
        DatasetName::Flowers102 => flowers::CLASSES as i64,
        DatasetName::Folder => {
            let (train, _) = folder::split_roots(dir, &spec.train_split, spec.val_split.as_deref())?;
            folder::class_names(&train)?.len() as i64
        }
    })
}

/// One split held as uint8 images `[N, 3, H, W]` and int64 labels.
pub struct Split {
    pub images: Tensor,
    pub labels: Tensor,
}

/// What a run read, for its report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    pub dataset: DatasetName,
    pub train_split: String,
    pub test_split: String,
    pub classes: usize,
    /// Images per split as read (before `--train-limit` / `--test-limit`).
    pub train_images: usize,
    pub test_images: usize,
    /// The stored image size (height, width): the size read, or the run's size for resized files.
    pub stored_size: [usize; 2],
    /// For image files: whether the decoded images came from the cache, and how long reading took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_seconds: Option<f64>,
    /// Files left out under `--skip-bad-images`, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<(PathBuf, String)>,
}

/// A dataset held once on the training device.
pub struct Dataset {
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
    pub class_names: Vec<String>,
    pub info: DataInfo,
    /// Whether the images stay in host memory while training (`--data-on host`): each batch is then
    /// gathered there and copied to the device, where the labels are.
    pub images_on_host: bool,
}

/// Decodes image files into a split, through the cache.
fn decoded_split(
    files: &[(PathBuf, i64)],
    settings: &images::DecodeSettings,
    what: &str,
) -> Result<(Split, images::Decoded)> {
    let decoded = images::load(files, settings, what)?;
    let split = Split { images: decoded.images.shallow_clone(), labels: Tensor::from_slice(&decoded.labels) };
    Ok((split, decoded))
}

/// Loads `spec`'s dataset from `dir` for a run at `size` px (image files are stored at most that
/// large). Checks the layout first; the binary layouts are read as they are.
pub fn load(spec: &DatasetSpec, dir: &Path, access: &Access, size: i64) -> Result<Dataset> {
    let (train_split, test_split) = match spec.name {
        DatasetName::Cifar10 | DatasetName::Cifar100 => ("train".to_string(), "test".to_string()),
        DatasetName::Flowers102 => (spec.train_split.clone(), spec.val_split.clone().unwrap_or_else(|| "test".into())),
        DatasetName::Folder => {
            let (train, val) = folder::split_roots(dir, &spec.train_split, spec.val_split.as_deref())?;
            let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (name(&train), name(&val))
        }
    };
    let settings = images::DecodeSettings {
        size: size as usize,
        skip_bad: spec.skip_bad_images,
        cache_dir: access.cache_dir.clone(),
    };
    let mut decoded = Vec::new();
    let (train, test, class_names) = match spec.name {
        DatasetName::Cifar10 => cifar10::load(dir)?,
        DatasetName::Cifar100 => cifar100::load(dir, spec.cifar100_labels)?,
        DatasetName::Flowers102 => {
            let mut split = |name: &str| {
                let files = flowers::files(dir, spec.flowers_split, name)?;
                let what = format!("Flowers-102 {name} split ({:?})", spec.flowers_split).to_lowercase();
                let (split, info) = decoded_split(&files, &settings, &what)?;
                decoded.push(info);
                Ok::<Split, anyhow::Error>(split)
            };
            (split(&train_split)?, split(&test_split)?, flowers::class_names())
        }
        DatasetName::Folder => {
            let train = folder::scan(&dir.join(&train_split), None)?;
            let test = folder::scan(&dir.join(&test_split), Some(&train.classes))?;
            let mut split = |scanned: &folder::FolderSplit| {
                let what = scanned.root.display().to_string();
                let (split, info) = decoded_split(&scanned.files, &settings, &what)?;
                decoded.push(info);
                Ok::<Split, anyhow::Error>(split)
            };
            (split(&train)?, split(&test)?, train.classes.clone())
        }
    };
    let [.., h, w] = train.images.size()[..] else { unreachable!("NCHW images") };
    let info = DataInfo {
        dataset: spec.name,
        train_split,
        test_split,
        classes: class_names.len(),
        train_images: train.labels.size()[0] as usize,
        test_images: test.labels.size()[0] as usize,
        stored_size: [h as usize, w as usize],
        cache_hit: (!decoded.is_empty()).then(|| decoded.iter().all(|d| d.cache_hit)),
        decode_seconds: (!decoded.is_empty()).then(|| decoded.iter().map(|d| d.seconds).sum()),
        skipped: decoded.iter_mut().flat_map(|d| std::mem::take(&mut d.skipped)).collect(),
    };
    Ok(Dataset {
        train_images: train.images,
        train_labels: train.labels,
        test_images: test.images,
        test_labels: test.labels,
        class_names,
        info,
        images_on_host: false,
    })
}

impl Dataset {
    pub fn classes(&self) -> i64 {
        self.class_names.len() as i64
    }

    /// Keeps a seeded, class-balanced subset of each split (`None`: all of it).
    pub fn limit(&self, train: Option<usize>, test: Option<usize>, seed: u64) -> Result<Dataset> {
        let classes = self.classes() as usize;
        let pick = |images: &Tensor, labels: &Tensor, limit: Option<usize>, flag: &str, salt: u64| {
            let Some(limit) = limit else { return Ok((images.shallow_clone(), labels.shallow_clone())) };
            let all = Vec::<i64>::try_from(labels)?;
            ensure!(
                limit >= 1 && limit <= all.len(),
                "{flag} {limit} is out of range: the split has {} images",
                all.len()
            );
            let index = Tensor::from_slice(&balanced_subset(&all, classes, limit, seed ^ salt)?);
            Ok((images.index_select(0, &index), labels.index_select(0, &index)))
        };
        let (train_images, train_labels) =
            pick(&self.train_images, &self.train_labels, train, "--train-limit", 0x7472)?;
        let (test_images, test_labels) = pick(&self.test_images, &self.test_labels, test, "--test-limit", 0x7465)?;
        Ok(Dataset {
            train_images,
            train_labels,
            test_images,
            test_labels,
            class_names: self.class_names.clone(),
            info: self.info.clone(),
            images_on_host: self.images_on_host,
        })
    }

    /// Moves the dataset to `device` once, where batches are gathered; with `images_on_host`, the
    /// images stay where they are in host memory (a read cache stays memory-mapped) and only the
    /// labels move: each batch is then gathered on the host and copied over through a pinned buffer
    /// (`crate::train`'s staging).
    pub fn to_device(self, device: Device, images_on_host: bool) -> Dataset {
        let images = |t: Tensor| if images_on_host { t } else { t.to_device(device) };
        Dataset {
            train_images: images(self.train_images),
            train_labels: self.train_labels.to_device(device),
            test_images: images(self.test_images),
            test_labels: self.test_labels.to_device(device),
            class_names: self.class_names,
            info: self.info,
            images_on_host,
        }
    }

    /// The bytes of both splits' images.
    pub fn image_bytes(&self) -> usize {
        (self.train_images.numel() + self.test_images.numel()) * self.train_images.kind().elt_size_in_bytes()
    }

    pub fn train_len(&self) -> usize {
        self.train_labels.size()[0] as usize
    }

    pub fn test_len(&self) -> usize {
        self.test_labels.size()[0] as usize
    }
}
