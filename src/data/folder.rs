//! Image folders as torchvision's `ImageFolder` reads them: `<root>/<class>/**/<file>`, classes the
//! sorted subfolder names, files in `sorted(os.walk(class_dir, followlinks=True))` order (folders
//! by path, the files in each sorted by name), kept when their extension is one of
//! [`EXTENSIONS`](super::decode::EXTENSIONS) in any case. Unlike torchvision, hidden files and folders
//! (names starting with `.`) are ignored, and a symbolic-link loop is refused instead of walked until
//! the path is too long.

use anyhow::{bail, Context, Result};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::decode::EXTENSIONS;

/// One split of an image folder: its classes and its files with their labels, in torchvision's order.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderSplit {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub files: Vec<(PathBuf, i64)>,
}

fn hidden(name: &std::ffi::OsStr) -> bool {
    name.as_bytes().starts_with(b".")
}

fn is_image(name: &std::ffi::OsStr) -> bool {
    let lower = name.to_string_lossy().to_lowercase();
    EXTENSIONS.iter().any(|ext| lower.ends_with(&format!(".{ext}")))
}

/// The class folders of `root`, sorted (symbolic links to folders count, as `DirEntry.is_dir()` follows them).
pub fn class_names(root: &Path) -> Result<Vec<String>> {
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("cannot read the folder {}", root.display()))? {
        let entry = entry.with_context(|| format!("cannot read the folder {}", root.display()))?;
        if hidden(&entry.file_name()) || !entry.path().is_dir() {
            continue;
        }
        let name = entry.file_name().into_string().map_err(|name| {
            anyhow::anyhow!("{}: a class folder's name is not UTF-8 ({name:?}); rename it", root.display())
        })?;
        classes.push(name);
    }
    classes.sort();
    if classes.is_empty() {
        bail!("{} holds no class folders: an image folder is <split>/<class>/<image files>", root.display());
    }
    Ok(classes)
}

/// Reads one split folder (`<data-dir>/<split>`), whose classes must be `expected` when given
/// (the training split's, so that labels mean the same in both).
pub fn scan(root: &Path, expected: Option<&[String]>) -> Result<FolderSplit> {
    let classes = class_names(root)?;
    if let Some(expected) = expected {
        let missing: Vec<&String> = expected.iter().filter(|c| !classes.contains(c)).collect();
        let extra: Vec<&String> = classes.iter().filter(|c| !expected.contains(c)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            bail!(
                "{} has other classes than the training split: missing {missing:?}, not in training {extra:?}; \
                 both splits need the same class folders",
                root.display()
            );
        }
    }
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let class_dir = root.join(class);
        let before = files.len();
        let mut folders = Vec::new();
        walk(&class_dir, &mut Vec::new(), &mut folders)?;
        // sorted(os.walk(...)): by folder path, then each folder's sorted file names.
        folders.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
        for (_, names) in folders {
            files.extend(names.into_iter().map(|path| (path, label as i64)));
        }
        if files.len() == before {
            bail!(
                "class folder {} holds no image files ({}); remove it or add images",
                class_dir.display(),
                EXTENSIONS.map(|e| format!(".{e}")).join(" ")
            );
        }
    }
    Ok(FolderSplit { root: root.to_path_buf(), classes, files })
}

/// Collects `dir` and every folder below it (links followed) with their image files, sorted by
/// name; `ancestors` holds the real paths above, to refuse a loop.
fn walk(dir: &Path, ancestors: &mut Vec<PathBuf>, out: &mut Vec<(PathBuf, Vec<PathBuf>)>) -> Result<()> {
    let real = dir.canonicalize().with_context(|| format!("cannot reach {}", dir.display()))?;
    if ancestors.contains(&real) {
        bail!("{} links back to a folder above it (a symbolic-link loop); remove the link", dir.display());
    }
    let mut names = Vec::new();
    let mut subfolders = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read the folder {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot read the folder {}", dir.display()))?;
        let (name, path) = (entry.file_name(), entry.path());
        if hidden(&name) {
            continue;
        }
        if path.is_dir() {
            subfolders.push(path);
        } else if is_image(&name) {
            names.push(path);
        }
    }
    names.sort_by(|a, b| a.file_name().map(OsStrExt::as_bytes).cmp(&b.file_name().map(OsStrExt::as_bytes)));
    out.push((dir.to_path_buf(), names));
    ancestors.push(real);
    for sub in subfolders {
        walk(&sub, ancestors, out)?;
    }
    ancestors.pop();
    Ok(())
}

/// The split folders a run reads: `<dir>/<train>` and `<dir>/<val>`, where an unset `val` is `val`,
/// else `test`, as timm's `--val-split` reads.
pub fn split_roots(dir: &Path, train: &str, val: Option<&str>) -> Result<(PathBuf, PathBuf)> {
    if !super::folder_state(dir, "--data-dir")? {
        bail!("image folder {} does not exist; point --data-dir at <split>/<class>/<image files>", dir.display());
    }
    let train_root = dir.join(train);
    if !train_root.is_dir() {
        bail!(
            "{} has no training split {train}/ (--train-split): an image folder is <split>/<class>/<image files>",
            dir.display()
        );
    }
    let val_root = match val {
        Some(val) => dir.join(val),
        None => ["val", "test"].iter().map(|s| dir.join(s)).find(|p| p.is_dir()).unwrap_or_else(|| dir.join("val")),
    };
    if !val_root.is_dir() {
        let name = val.map_or("val/ or test/".to_string(), |v| format!("{v}/"));
        bail!("{} has no evaluation split {name}; name it with --val-split", dir.display());
    }
    Ok((train_root, val_root))
}
