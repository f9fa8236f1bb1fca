//! Fetching a dataset's published files: download with an MD5 check, extraction of an archive into
//! a staging folder that becomes the data folder only when complete.

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use super::Layout;
use crate::files::Staging;

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

/// Downloads `url` into `file`, checking its MD5 (`--data-md5` names another).
pub fn fetch_file(url: &str, md5: &str, file: &Path, by_hand: &str) -> Result<()> {
    eprintln!("downloading {url} ...");
    let no_network =
        || format!("cannot download {url}; without network, {by_hand}, or pass --data-url file:///path/to/it");
    let (mut reader, len) = open_url(url).with_context(no_network)?;
    let bar = download_bar(len);
    let mut out = std::fs::File::create(file)?;
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
    let got = format!("{:x}", digest.finalize());
    ensure!(
        got.eq_ignore_ascii_case(md5),
        "{url} has MD5 {got}, expected {md5} (pass --data-md5 for another file); nothing was written"
    );
    Ok(())
}

/// Extracts the .tar.gz `archive` (downloaded from `url`) into `into`.
pub fn extract(archive: &Path, into: &Path, url: &str) -> Result<()> {
    tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(archive)?))
        .unpack(into)
        // tar's own message names the temporary folder, which is gone by the time anyone reads it.
        .map_err(|err| {
            // tar's words, with the entry named as in the archive and the cause it wraps.
            let staged = into.display().to_string();
            let archive_relative =
                |text: String| text.replace(&format!(": {staged}"), "").replace(&format!("{staged}/"), "");
            let mut why = archive_relative(err.to_string());
            if let Some(cause) = std::error::Error::source(&err) {
                why += &format!(" ({})", archive_relative(cause.to_string()));
            }
            anyhow::anyhow!(
                "cannot extract {url}: {why}; it is not a .tar.gz archive, a damaged one, or one whose entries \
                 point outside it, which is refused; nothing was written"
            )
        })
}

/// Downloads the archive at `url`, verifies its MD5 and extracts `layout` into `dir`, which must
/// not exist yet. Nothing is left behind on failure.
pub fn download_archive(dir: &Path, url: &str, md5: &str, layout: &Layout) -> Result<()> {
    let staging = Staging::new(dir)?;
    let archive = staging.path.join("archive.tar.gz");
    fetch_file(url, md5, &archive, &layout.by_hand_into(dir))?;
    let extracted = staging.path.join("extracted");
    extract(&archive, &extracted, url)?;
    let root = find_layout_root(&extracted, layout.marker)
        .with_context(|| format!("{url} holds no {}: not {}", layout.marker, layout.what))?;
    // The staging folder is gone once this returns: name the archive, not where it was unpacked.
    if let Some(problem) = (layout.problem)(&root) {
        bail!("the archive from {url} is incomplete: {problem}; nothing was written");
    }
    std::fs::rename(&root, dir).with_context(|| format!("cannot move the data into {}", dir.display()))?;
    eprintln!("{} is in {}", layout.what, dir.display());
    Ok(())
}

/// The folder of an extracted archive that holds `marker` (the archive's own top folder, such as
/// `cifar-10-batches-bin/`, or the top level).
fn find_layout_root(extracted: &Path, marker: &str) -> Option<PathBuf> {
    if extracted.join(marker).exists() {
        return Some(extracted.to_path_buf());
    }
    std::fs::read_dir(extracted).ok()?.flatten().map(|e| e.path()).find(|p| p.join(marker).exists())
}
