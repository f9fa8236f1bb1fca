//! CIFAR-10 in its binary layout: check, fetch, load (through tch's loader), subset, synthesise.
//!
//! The layout is fixed: `data_batch_1..5.bin` and `test_batch.bin`, each 10,000 records of
//! 3,073 bytes (label byte, then 1024 R, 1024 G, 1024 B bytes, row-major), plus an optional
//! `batches.meta.txt` with the class names. tch's `vision::cifar::load_dir` reads exactly that,
//! so synthetic sets are written in the same full-size layout (see [`write_synthetic`]).

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use crate::files::Staging;
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
fn layout_problem(dir: &Path) -> Option<String> {
    all_files().find_map(|name| match std::fs::metadata(dir.join(name)) {
        Err(_) => Some(format!("{name} is missing")),
        Ok(meta) if meta.len() != FILE_BYTES => Some(format!(
            "{name} has {} bytes, expected {FILE_BYTES} ({RECORDS_PER_FILE} records of {RECORD_BYTES} bytes): \
             truncated or not CIFAR-10's binary version",
            meta.len()
        )),
        Ok(_) => None,
    })
}

/// Checks that every file of the layout is present with its exact size.
pub fn check_layout(dir: &Path) -> Result<()> {
    ensure!(dir.is_dir(), "CIFAR-10 folder {} does not exist; {}", dir.display(), how_to_get(dir));
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
    pub fn limit(self, train: Option<usize>, test: Option<usize>, seed: u64) -> Result<Cifar> {
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
        let (train_images, train_labels) = pick(self.train_images, self.train_labels, train, "--train-limit", 0x7472)?;
        let (test_images, test_labels) = pick(self.test_images, self.test_labels, test, "--test-limit", 0x7465)?;
        Ok(Cifar { train_images, train_labels, test_images, test_labels, class_names: self.class_names })
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

/// Indices of a class-balanced subset of `limit` records: `limit / 10` per class, the remainder
/// spread one each over the first classes, each class's records drawn at random; sorted.
pub fn balanced_subset(labels: &[i64], limit: usize, seed: u64) -> Result<Vec<i64>> {
    let mut rng = SplitMix64::new(seed);
    let mut by_class: Vec<Vec<i64>> = vec![Vec::new(); CLASSES as usize];
    for (i, &label) in labels.iter().enumerate() {
        by_class[label as usize].push(i as i64);
    }
    let mut picked = Vec::with_capacity(limit);
    for (class, members) in by_class.iter_mut().enumerate() {
        let want = limit / CLASSES as usize + usize::from(class < limit % CLASSES as usize);
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

/// Where the CIFAR-10 archive comes from, and its expected checksum.
#[derive(Clone, Debug)]
pub struct Source {
    pub url: String,
    pub md5: String,
}

impl Default for Source {
    fn default() -> Self {
        Source { url: DEFAULT_URL.into(), md5: DEFAULT_MD5.into() }
    }
}

/// Opens `url` (`http(s)://` or `file://`) as a byte stream with its length when known.
fn open_url(url: &str) -> Result<(Box<dyn Read>, Option<u64>)> {
    if let Some(path) = url.strip_prefix("file://") {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
        let len = file.metadata().ok().map(|m| m.len());
        return Ok((Box::new(file), len));
    }
    let response = ureq::get(url).call()?;
    let len = response.body().content_length();
    Ok((Box::new(response.into_body().into_reader()), len))
}

/// A byte-count bar on a terminal; silent otherwise (the caller logs the start and the end).
fn download_bar(len: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = len.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
    bar.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} ETA {eta}")
            .expect("valid template"),
    );
    bar
}

/// Downloads the archive, verifies its MD5 and extracts the binary layout into `dir`, which must
/// not exist yet. Nothing is left behind on failure.
pub fn download(dir: &Path, source: &Source) -> Result<()> {
    let staging = Staging::new(dir)?;
    let archive = staging.path.join("archive.tar.gz");
    eprintln!("downloading {} ...", source.url);
    let no_network = || {
        format!(
            "cannot download {}; without network, put data_batch_1..5.bin and test_batch.bin \
             (CIFAR-10 binary version) into {}, or pass --data-url file:///path/to/cifar-10-binary.tar.gz",
            source.url,
            dir.display()
        )
    };
    let (mut reader, len) = open_url(&source.url).with_context(no_network)?;
    let bar = download_bar(len);
    let mut out = std::fs::File::create(&archive)?;
    let mut digest = md5::Context::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).with_context(no_network)?;
        if n == 0 {
            break;
        }
        digest.consume(&buf[..n]);
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let md5 = format!("{:x}", digest.finalize());
    ensure!(
        md5.eq_ignore_ascii_case(&source.md5),
        "{} has MD5 {md5}, expected {} (pass --data-md5 for another archive); nothing was written",
        source.url,
        source.md5
    );
    let extracted = staging.path.join("extracted");
    tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&archive)?))
        .unpack(&extracted)
        // tar's own message names the temporary folder, which is gone by the time anyone reads it.
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot extract {}: not a .tar.gz archive, or a damaged one; nothing was written",
                source.url
            )
        })?;
    let root = find_layout_root(&extracted)
        .with_context(|| format!("{} holds no data_batch_1.bin: not the CIFAR-10 binary version", source.url))?;
    // The staging folder is gone once this returns: name the archive, not where it was unpacked.
    if let Some(problem) = layout_problem(&root) {
        bail!("the archive from {} is incomplete: {problem}; nothing was written", source.url);
    }
    std::fs::rename(&root, dir).with_context(|| format!("cannot move the data into {}", dir.display()))?;
    eprintln!("CIFAR-10 is in {}", dir.display());
    Ok(())
}

/// The folder of an extracted archive that holds `data_batch_1.bin` (the archive's own
/// `cifar-10-batches-bin/`, or the top level).
fn find_layout_root(extracted: &Path) -> Option<PathBuf> {
    if extracted.join(TRAIN_FILES[0]).exists() {
        return Some(extracted.to_path_buf());
    }
    std::fs::read_dir(extracted).ok()?.flatten().map(|e| e.path()).find(|p| p.join(TRAIN_FILES[0]).exists())
}

/// Makes sure `dir` holds the layout: downloads it when the folder is missing, checks it otherwise.
pub fn ensure(dir: &Path, source: &Source) -> Result<()> {
    if !dir.exists() {
        download(dir, source)?;
    }
    check_layout(dir)
}
