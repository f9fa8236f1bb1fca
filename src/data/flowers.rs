//! Oxford Flowers-102 in its published layout: `102flowers.tgz` (holding `jpg/image_NNNNN.jpg`),
//! `imagelabels.mat` (`labels`, 1..102 per image) and `setid.mat` (`trnid`, `valid`, `tstid`: the
//! 1-based image numbers of each split), as torchvision's `Flowers102` and Paddle's `Flowers` read it.
//!
//! The split names `train`, `val`, `test` map to the published lists as the framework chosen by
//! `--flowers-split` does: Paddle's (the tutorial's framework) trains on `tstid` (6,149 images)
//! and tests on `trnid` (1,020), its `valid` being `valid`; torchvision's trains on `trnid`,
//! validates on `valid`, tests on `tstid`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use super::download::{extract, fetch_file};
use super::Layout;
use crate::config::FlowersSplit;
use crate::files::Staging;

pub const IMAGES_ARCHIVE: &str = "102flowers.tgz";
pub const LABELS_FILE: &str = "imagelabels.mat";
pub const SETID_FILE: &str = "setid.mat";
pub const IMAGE_FOLDER: &str = "jpg";
pub const CLASSES: usize = 102;
/// torchvision's download prefix for the three files.
pub const DEFAULT_URL: &str = "https://thor.robots.ox.ac.uk/datasets/flowers-102/";
/// The three files' MD5s, in the order of [`FILES`].
pub const DEFAULT_MD5: &str =
    "52808999861908f626f3c1f4e79d11fa,e0620be6f572b9609742df49c70aed4d,a5357ecc9cb78c4bef273ce3793fc85c";
pub const FILES: [&str; 3] = [IMAGES_ARCHIVE, LABELS_FILE, SETID_FILE];

/// The published list a split name stands for under `split`.
fn setid_list(split: FlowersSplit, name: &str) -> Result<&'static str> {
    Ok(match (split, name) {
        (FlowersSplit::Paddle, "train") | (FlowersSplit::Torchvision, "test") => "tstid",
        (FlowersSplit::Paddle, "test") | (FlowersSplit::Torchvision, "train") => "trnid",
        (_, "val" | "valid") => "valid",
        _ => {
            bail!("Flowers-102 has the splits train, val and test; --train-split / --val-split {name} is none of them")
        }
    })
}

pub const LAYOUT: Layout = Layout {
    what: "Flowers-102",
    download_flags: "--dataset flowers102 ",
    marker: IMAGE_FOLDER,
    problem: layout_problem,
    by_hand: "put 102flowers.tgz's jpg/ folder, imagelabels.mat and setid.mat",
};

fn layout_problem(dir: &Path) -> Option<String> {
    [IMAGE_FOLDER, LABELS_FILE, SETID_FILE]
        .into_iter()
        .find(|name| !dir.join(name).exists())
        .map(|name| format!("{name} is missing"))
}

/// A numeric MATLAB array as integers (the published files hold doubles or small integers).
fn mat_array(file: &Path, name: &str) -> Result<Vec<i64>> {
    let reader = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mat = matfile::MatFile::parse(reader)
        .map_err(|err| anyhow::anyhow!("{}: not a MATLAB v5 file ({err:?})", file.display()))?;
    let array = mat.find_by_name(name).with_context(|| format!("{} has no array {name}", file.display()))?;
    use matfile::NumericData as D;
    let values: Vec<f64> = match array.data() {
        D::Double { real, .. } => real.clone(),
        D::Single { real, .. } => real.iter().map(|&v| f64::from(v)).collect(),
        D::UInt8 { real, .. } => real.iter().map(|&v| f64::from(v)).collect(),
        D::UInt16 { real, .. } => real.iter().map(|&v| f64::from(v)).collect(),
        D::Int16 { real, .. } => real.iter().map(|&v| f64::from(v)).collect(),
        D::UInt32 { real, .. } => real.iter().map(|&v| f64::from(v)).collect(),
        D::Int32 { real, .. } => real.iter().map(|&v| f64::from(v)).collect(),
        other => bail!("{}: {name} holds {other:?}, expected numbers", file.display()),
    };
    values
        .into_iter()
        .map(|v| {
            if v.fract() == 0.0 && v >= 1.0 {
                Ok(v as i64)
            } else {
                bail!("{}: {name} holds {v}, expected positive whole numbers", file.display())
            }
        })
        .collect()
}

/// The image files of split `name` with their labels 0..101 (published 1..102), in the list's order.
pub fn files(dir: &Path, split: FlowersSplit, name: &str) -> Result<Vec<(PathBuf, i64)>> {
    LAYOUT.check(dir)?;
    let labels = mat_array(&dir.join(LABELS_FILE), "labels")?;
    let list = setid_list(split, name)?;
    let ids = mat_array(&dir.join(SETID_FILE), list)?;
    ids.into_iter()
        .map(|id| {
            let label = *labels.get(id as usize - 1).with_context(|| {
                format!("{}: {list} names image {id}, but {LABELS_FILE} has {} labels", dir.display(), labels.len())
            })?;
            if !(1..=CLASSES as i64).contains(&label) {
                bail!("{}: image {id} has label {label}, expected 1..{CLASSES}", dir.join(LABELS_FILE).display());
            }
            Ok((dir.join(IMAGE_FOLDER).join(format!("image_{id:05}.jpg")), label - 1))
        })
        .collect()
}

pub fn class_names() -> Vec<String> {
    (1..=CLASSES).map(|c| c.to_string()).collect()
}

/// Downloads the three published files from `base` (a URL prefix ending in `/`), checks their MD5s
/// (`md5s` comma-separated in [`FILES`]' order) and lays them out in `dir`, which must not exist yet.
pub fn download(dir: &Path, base: &str, md5s: &str) -> Result<()> {
    let md5s: Vec<&str> = md5s.split(',').map(str::trim).collect();
    if md5s.len() != FILES.len() {
        bail!("--data-md5 for Flowers-102 takes three MD5s, of {}, comma-separated", FILES.join(", "));
    }
    let staging = Staging::new(dir)?;
    let by_hand = LAYOUT.how_to_get(dir);
    let base = if base.ends_with('/') { base.to_string() } else { format!("{base}/") };
    for (name, md5) in FILES.iter().zip(&md5s) {
        fetch_file(&format!("{base}{name}"), md5, &staging.path.join(name), &by_hand)?;
    }
    let archive = staging.path.join(IMAGES_ARCHIVE);
    extract(&archive, &staging.path, &format!("{base}{IMAGES_ARCHIVE}"))?;
    std::fs::remove_file(&archive)?;
    if !staging.path.join(IMAGE_FOLDER).is_dir() {
        bail!("{base}{IMAGES_ARCHIVE} holds no jpg/ folder: not Flowers-102's image archive; nothing was written");
    }
    staging.commit(dir)?;
    eprintln!("Flowers-102 is in {}", dir.display());
    Ok(())
}
