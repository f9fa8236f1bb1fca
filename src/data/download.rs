//! Fetching CIFAR-10's binary archive: download, checksum, extraction into a staging folder.

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use super::{check_layout, layout_problem, DEFAULT_MD5, DEFAULT_URL, TRAIN_FILES};
use crate::files::Staging;

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
        .map_err(|err| {
            // tar's words, with the entry named as in the archive and the cause it wraps.
            let staged = extracted.display().to_string();
            let archive_relative =
                |text: String| text.replace(&format!(": {staged}"), "").replace(&format!("{staged}/"), "");
            let mut why = archive_relative(err.to_string());
            if let Some(cause) = std::error::Error::source(&err) {
                why += &format!(" ({})", archive_relative(cause.to_string()));
            }
            anyhow::anyhow!(
                "cannot extract {}: {why}; it is not a .tar.gz archive, a damaged one, or one whose entries \
                 point outside it, which is refused; nothing was written",
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
    if !super::folder_state(dir, "--data-dir")? {
        download(dir, source)?;
    }
    check_layout(dir)
}
