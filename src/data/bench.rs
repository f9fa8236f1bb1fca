//! `csp-tch data bench`: how fast an image folder is decoded and resized (no cache, every core), and
//! how long an epoch's batches take to gather once the set is held in memory, which is all the
//! loader does per epoch after the first read. `scripts/bench_imagefolder.py` measures torchvision's
//! `ImageFolder` + `DataLoader` on the same files; `scripts/bench.sh --data-folder` sets them side by side.

use anyhow::Result;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Tensor};

use super::{epoch_permutation, folder, images};

#[derive(Clone, Debug, Serialize)]
pub struct DataBench {
    pub implementation: &'static str,
    pub kind: &'static str,
    pub folder: String,
    pub images: usize,
    pub image_size: usize,
    pub threads: usize,
    /// JPEGs decoded through libjpeg-turbo's SIMD kernels ([`super::decode::jpeg_simd`]).
    pub jpeg_simd: bool,
    /// Decoding and resizing every image, from reading the file to the stored uint8 block.
    pub decode_seconds: f64,
    pub decode_images_per_s: f64,
    /// The size images were stored at (width x height): the run's size, or as decoded when smaller.
    pub stored_size: [usize; 2],
    pub batch_size: usize,
    /// One epoch's batches gathered from the stored set (the shuffled index, images and labels),
    /// median over `epochs` epochs.
    pub epoch_gather_ms: f64,
    pub epochs: usize,
}

/// Decodes the first `limit` files of `root` (an `ImageFolder` split) at `size` px, then gathers
/// `epochs` epochs of `batch_size` batches from the result on `device`.
pub fn run(
    root: &Path,
    size: usize,
    limit: Option<usize>,
    batch_size: usize,
    epochs: usize,
    device: Device,
) -> Result<DataBench> {
    if !root.is_dir() {
        anyhow::bail!(
            "{} is not a folder: `data bench` reads <data-dir>/<split>/<class>/<image files> (--data-dir, --split)",
            root.display()
        );
    }
    let mut files = folder::scan(root, None)?.files;
    files.truncate(limit.unwrap_or(usize::MAX));
    let settings = images::DecodeSettings { size, skip_bad: false, cache_dir: None };
    let started = Instant::now();
    let decoded = images::load(&files, &settings, &root.display().to_string())?;
    let decode_seconds = started.elapsed().as_secs_f64();
    let n = decoded.labels.len();
    let stored = decoded.images.to_device(device);
    let labels = Tensor::from_slice(&decoded.labels).to_device(device);
    let mut times = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        let started = Instant::now();
        let order = Tensor::from_slice(&epoch_permutation(n, 0, epoch)).to_device(device);
        let mut last = Tensor::zeros([1], (tch::Kind::Int64, device));
        for start in (0..n).step_by(batch_size) {
            let index = order.narrow(0, start as i64, batch_size.min(n - start) as i64);
            let _images = stored.index_select(0, &index);
            last = labels.index_select(0, &index);
        }
        // Reading a value waits for the device to finish the epoch's gathers.
        let _ = last.sum(tch::Kind::Int64).int64_value(&[]);
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(DataBench {
        implementation: "csp-tch",
        kind: "data",
        folder: root.display().to_string(),
        images: n,
        image_size: size,
        threads: rayon::current_num_threads(),
        jpeg_simd: super::decode::jpeg_simd(),
        decode_seconds,
        decode_images_per_s: n as f64 / decode_seconds,
        stored_size: [decoded.width, decoded.height],
        batch_size,
        epoch_gather_ms: times[times.len() / 2],
        epochs,
    })
}
