//! A list of image files decoded once, on every core, into one uint8 `[N, 3, H, W]` block, and kept
//! in a cache on disk so that the next run, model or seed reads the block instead of decoding.
//!
//! The stored size: when every image has the same size and none is larger than the run's `size`, the
//! images are kept as decoded and the per-batch transform enlarges them on the device (Pillow's
//! result either way, see [`super::transform::resize`]); otherwise each is resized here to `size` x
//! `size` as Pillow does ([`super::resample`]). CIFAR-sized folders so stay 32 px in memory at 224.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use super::decode::decode;
use super::resample::resize_rgb;
use crate::files::{write_atomic, Staging};
use tch::{Kind, Tensor};

/// An uninitialised uint8 CPU tensor of `shape`, to fill through [`bytes_mut`].
fn uint8_block(shape: [usize; 4]) -> Tensor {
    Tensor::empty(shape.map(|d| d as i64), (Kind::Uint8, tch::Device::Cpu))
}

/// The bytes of a contiguous uint8 CPU tensor.
fn bytes(block: &Tensor) -> &[u8] {
    assert!(block.kind() == Kind::Uint8 && block.is_contiguous() && block.device() == tch::Device::Cpu);
    // SAFETY: a contiguous uint8 CPU tensor of `numel` elements, borrowed for the slice's life.
    unsafe { std::slice::from_raw_parts(block.data_ptr() as *const u8, block.numel()) }
}

/// The bytes of a contiguous uint8 CPU tensor, to fill in place.
fn bytes_mut(block: &mut Tensor) -> &mut [u8] {
    assert!(block.kind() == Kind::Uint8 && block.is_contiguous() && block.device() == tch::Device::Cpu);
    let len = block.numel();
    // SAFETY: a contiguous uint8 CPU tensor of `len` elements, borrowed mutably for the slice's life.
    unsafe { std::slice::from_raw_parts_mut(block.data_ptr() as *mut u8, len) }
}

/// What decoding a list of files gave: the block, and how it was obtained.
pub struct Decoded {
    /// uint8 `[N, 3, height, width]`; decoded (or read from the cache) straight into the tensor's
    /// memory, so a set costs its own size in host memory and no more.
    pub images: Tensor,
    pub labels: Vec<i64>,
    pub height: usize,
    pub width: usize,
    /// Files left out under `--skip-bad-images`, each with why.
    pub skipped: Vec<(PathBuf, String)>,
    /// Read from the cache (no file decoded).
    pub cache_hit: bool,
    pub seconds: f64,
}

/// How a list of files is decoded; every field is part of the cache key.
#[derive(Clone, Debug)]
pub struct DecodeSettings {
    /// The run's input size.
    pub size: usize,
    /// Leave out files that cannot be read or decoded (listed in the log and the report) instead of failing.
    pub skip_bad: bool,
    /// Where caches live; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
}

/// Bumped whenever decoding or resizing could give other pixels: old caches are then not read.
const CACHE_VERSION: &str = "csp-tch image cache 1 (libjpeg-turbo via mozjpeg 0.10, Pillow bilinear)";
const PIXELS_FILE: &str = "pixels.u8";
const META_FILE: &str = "meta.json";

#[derive(Serialize, Deserialize)]
struct CacheMeta {
    version: String,
    height: usize,
    width: usize,
    labels: Vec<i64>,
    skipped: Vec<(PathBuf, String)>,
}

/// The cache key of `files` under `settings`: their paths, sizes, modification times and labels.
fn cache_key(files: &[(PathBuf, i64)], settings: &DecodeSettings) -> String {
    let mut digest = md5::Context::new();
    digest.consume(format!("{CACHE_VERSION}\nsize {} skip {}\n", settings.size, settings.skip_bad));
    for (path, label) in files {
        // A file that cannot be read still enters the key by name: the decode reports it.
        let (len, modified) = std::fs::metadata(path)
            .map(|m| (m.len(), m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())))
            .unwrap_or((u64::MAX, None));
        digest.consume(path.as_os_str().as_bytes());
        digest.consume(format!("\0{len} {} {label}\n", modified.map_or(0, |d| d.as_nanos())));
    }
    format!("{:x}", digest.finalize())
}

/// Decodes `files` (each with its label) as `settings` say, through the cache when there is one.
/// `what` names the set in messages (`train split of /data/flowers`).
pub fn load(files: &[(PathBuf, i64)], settings: &DecodeSettings, what: &str) -> Result<Decoded> {
    let started = Instant::now();
    let Some(cache_dir) = &settings.cache_dir else { return decode_all(files, settings, what, started) };
    let folder = cache_dir.join(format!("images-{}", cache_key(files, settings)));
    match read_cache(&folder) {
        Ok(Some(mut hit)) => {
            hit.seconds = started.elapsed().as_secs_f64();
            eprintln!("{what}: {} images from the cache {}", hit.labels.len(), folder.display());
            return Ok(hit);
        }
        Ok(None) => {}
        Err(err) => eprintln!("{what}: {err:#}; decoding again"),
    }
    let decoded = decode_all(files, settings, what, started)?;
    // A damaged copy under this key is replaced; a cache that cannot be written costs the next
    // run a decode, not this run its result.
    let _ = std::fs::remove_dir_all(&folder);
    if let Err(err) = write_cache(&folder, &decoded) {
        eprintln!("warning: cannot write the image cache {} ({err:#}); --cache-dir moves it", folder.display());
    }
    Ok(decoded)
}

/// The cached block in `folder`: `None` when there is none; an error when it is damaged.
fn read_cache(folder: &Path) -> Result<Option<Decoded>> {
    let Ok(text) = std::fs::read_to_string(folder.join(META_FILE)) else { return Ok(None) };
    let meta = match serde_json::from_str::<CacheMeta>(&text) {
        Ok(meta) if meta.version == CACHE_VERSION => meta,
        _ => bail!("the image cache {} is damaged (its meta.json)", folder.display()),
    };
    let damaged = || format!("the image cache {} is damaged", folder.display());
    let path = folder.join(PIXELS_FILE);
    let shape = [meta.labels.len(), 3, meta.height, meta.width];
    let numel: usize = shape.iter().product();
    if std::fs::metadata(&path).with_context(damaged)?.len() != numel as u64 {
        bail!("{} (its size is wrong)", damaged());
    }
    let images = map_pixels(&path, shape).with_context(damaged)?;
    Ok(Some(Decoded {
        images,
        labels: meta.labels,
        height: meta.height,
        width: meta.width,
        skipped: meta.skipped,
        cache_hit: true,
        seconds: 0.0,
    }))
}

/// The cached pixels of `shape`, memory-mapped privately (libtorch's `from_file`, copy-on-write, the
/// file opened read-only): pages are read when a batch first touches them and can be dropped again
/// by the kernel, so a set kept in host memory (`--data-on host`) costs page cache, not resident
/// memory of its own; a later run that replaces the cache leaves this mapping on the old file.
fn map_pixels(path: &Path, shape: [usize; 4]) -> Result<Tensor> {
    let name = path.to_str().with_context(|| format!("{} is not a UTF-8 path", path.display()))?;
    let numel = shape.iter().product::<usize>() as i64;
    let flat = Tensor::f_from_file(name, false, Some(numel), (Kind::Uint8, tch::Device::Cpu))?;
    Ok(flat.view(shape.map(|d| d as i64)))
}

fn write_cache(folder: &Path, decoded: &Decoded) -> Result<()> {
    let staging = Staging::new(folder)?;
    std::fs::write(staging.path.join(PIXELS_FILE), bytes(&decoded.images))?;
    let meta = CacheMeta {
        version: CACHE_VERSION.into(),
        height: decoded.height,
        width: decoded.width,
        labels: decoded.labels.clone(),
        skipped: decoded.skipped.clone(),
    };
    write_atomic(&staging.path.join(META_FILE), serde_json::to_string(&meta)?.as_bytes())?;
    match staging.commit(folder) {
        // Another process cached the same files meanwhile: its copy is as good.
        Err(_) if folder.join(META_FILE).exists() => Ok(()),
        other => other,
    }
}

/// Decodes one file into `slot`, CHW at `stored` (width, height): resized to it or, when not
/// `resize`, as decoded; `Ok(false)` when kept as decoded and its size is another.
fn decode_file(path: &Path, stored: (usize, usize), resize: bool, slot: &mut [u8]) -> Result<bool> {
    let bytes = std::fs::read(path).map_err(|err| anyhow::anyhow!("cannot read it ({err})"))?;
    let rgb = decode(&bytes).map_err(|err| anyhow::anyhow!("cannot decode it ({err:#})"))?;
    let hwc = if resize {
        resize_rgb(&rgb.pixels, rgb.width, rgb.height, stored.0, stored.1)
    } else if (rgb.width, rgb.height) == stored {
        rgb.pixels
    } else {
        return Ok(false);
    };
    let plane = stored.0 * stored.1;
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        (slot[i], slot[plane + i], slot[2 * plane + i]) = (px[0], px[1], px[2]);
    }
    Ok(true)
}

/// A bar on a terminal; on a pipe, the caller's start and end lines only.
fn decode_bar(len: usize, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("decoding {what}"));
    bar
}

fn decode_all(files: &[(PathBuf, i64)], settings: &DecodeSettings, what: &str, started: Instant) -> Result<Decoded> {
    eprintln!("{what}: decoding {} images on {} threads ...", files.len(), rayon::current_num_threads());
    // Kept as decoded when the first readable image is no larger than the run's size; the first
    // image of another size sends the whole set through the resize instead.
    let first = files.iter().find_map(|(path, _)| {
        let bytes = std::fs::read(path).ok()?;
        decode(&bytes).ok().map(|rgb| (rgb.width, rgb.height))
    });
    let size = settings.size;
    let mut plan = match first {
        Some((w, h)) if w <= size && h <= size => ((w, h), false),
        _ => ((size, size), true),
    };
    loop {
        let ((width, height), resize) = plan;
        let per_image = 3 * width * height;
        let mut images = uint8_block([files.len(), 3, height, width]);
        let bar = decode_bar(files.len(), what);
        let other_size = AtomicBool::new(false);
        let done = AtomicUsize::new(0);
        let results: Vec<Result<bool>> = bytes_mut(&mut images)
            .par_chunks_mut(per_image)
            .zip(files.par_iter())
            .map(|(slot, (path, _))| {
                if other_size.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                let one = decode_file(path, (width, height), resize, slot);
                if matches!(one, Ok(false)) {
                    other_size.store(true, Ordering::Relaxed);
                }
                bar.set_position(done.fetch_add(1, Ordering::Relaxed) as u64 + 1);
                one
            })
            .collect();
        bar.finish_and_clear();
        if other_size.load(Ordering::Relaxed) {
            plan = ((size, size), true);
            continue;
        }
        // Skipped files leave holes: the images after them move down, in order.
        let (mut labels, mut skipped) = (Vec::with_capacity(files.len()), Vec::new());
        let block = bytes_mut(&mut images);
        for (i, ((path, label), result)) in files.iter().zip(results).enumerate() {
            match result {
                Ok(true) => {
                    let kept = labels.len();
                    if kept != i {
                        block.copy_within(i * per_image..(i + 1) * per_image, kept * per_image);
                    }
                    labels.push(*label);
                }
                Ok(false) => unreachable!("a size mismatch restarts the decode"),
                Err(err) if settings.skip_bad => {
                    eprintln!("skipped {}: {err:#}", path.display());
                    skipped.push((path.clone(), format!("{err:#}")));
                }
                Err(err) => bail!(
                    "{}: {err:#}; fix or remove the file, or pass --skip-bad-images to leave such files out",
                    path.display()
                ),
            }
        }
        if labels.is_empty() {
            bail!("{what}: no image could be decoded");
        }
        let images = images.narrow(0, 0, labels.len() as i64);
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "{what}: {} images decoded in {seconds:.1} s ({:.0} images/s), stored at {width}x{height}{}",
            labels.len(),
            labels.len() as f64 / seconds,
            if skipped.is_empty() { String::new() } else { format!(", {} skipped", skipped.len()) }
        );
        return Ok(Decoded { images, labels, height, width, skipped, cache_hit: false, seconds });
    }
}
