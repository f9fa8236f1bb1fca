//! Files and folders a run writes: atomic replacement of a file, a staging folder renamed into place
//! when complete, the leftovers of a killed process, and the lock that keeps two runs out of one folder.

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Writes `path` through a temporary file in the same folder and a rename, so a reader never sees
/// a half-written file and an interrupted run leaves the previous version intact.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?.to_string_lossy();
    let tmp = dir.join(hidden_name(&name, TMP_MARK));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// A temporary sibling folder that becomes `dest` by a rename only when complete, and is removed
/// when dropped before that, so a failed download or write never leaves a half-filled data folder.
pub struct Staging {
    pub path: PathBuf,
}

impl Staging {
    pub fn new(dest: &Path) -> Result<Staging> {
        ensure!(!dest.exists(), "{} already exists; remove it first or choose another folder", dest.display());
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let name = dest.file_name().context("data folder has no name")?.to_string_lossy();
        remove_leftovers(parent)?;
        let path = parent.join(hidden_name(&name, PARTIAL_MARK));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Staging { path })
    }

    pub fn commit(self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest)
            .with_context(|| format!("cannot move {} to {}", self.path.display(), dest.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // After a successful commit the path no longer exists and this is a no-op.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `.NAME{mark}PID`, this process's hidden sibling of `name`; a long name is cut (at a character
/// boundary) so that the result stays within the 255 bytes a file name may have.
fn hidden_name(name: &str, mark: &str) -> String {
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}{mark}{}", &name[..end], std::process::id())
}

/// What [`write_atomic`] and [`Staging`] put between a name and the writer's process id.
const TMP_MARK: &str = ".tmp-";
const PARTIAL_MARK: &str = ".partial-";

/// Removes the temporary files and staging folders in `dir` that a process killed mid-write left
/// (`.NAME.tmp-PID`, `.NAME.partial-PID`), unless that process is still alive. A missing `dir` is fine.
pub fn remove_leftovers(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = [TMP_MARK, PARTIAL_MARK]
            .iter()
            .find_map(|mark| name.starts_with('.').then(|| name.rsplit_once(mark)).flatten())
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.with_context(|| format!("cannot remove {}, left by an interrupted write", path.display()))?;
    }
    Ok(())
}

/// An exclusive lock on a run's output folder while it lives: `.csp-tch.lock` there, holding the
/// holder's process id and command line. Acquiring it also proves the folder can be written.
pub struct OutputLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    pub const FILE: &'static str = ".csp-tch.lock";

    /// Creates `out` if needed and locks it; another live run's lock is an error naming that run.
    pub fn acquire(out: &Path) -> Result<OutputLock> {
        let unusable = |what: &str| format!("--out {}: {what}; choose a folder this user can write to", out.display());
        if out.exists() && !out.is_dir() {
            bail!(unusable("it exists and is not a folder"));
        }
        std::fs::create_dir_all(out).with_context(|| unusable("cannot create it"))?;
        let path = out.join(Self::FILE);
        loop {
            if path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(
                    "--out {}: {} is a symbolic link, which csp-tch will not follow and write through; \
                     remove it",
                    out.display(),
                    path.display()
                );
            }
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .with_context(|| unusable("cannot create a file in it"))?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "unknown".into() } else { holder.replace('\n', ": ") };
                bail!(
                    "--out {} is in use by another csp-tch run (pid {holder}); wait for it to end, or \
                     choose another --out",
                    out.display()
                );
            }
            // A holder that was just ending may have removed the file we opened: lock the one at the path.
            let same = std::fs::metadata(&path).is_ok_and(|m| m.ino() == file.metadata().map_or(0, |f| f.ino()));
            if !same {
                continue;
            }
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let written = file
                .set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| write!(file, "{}\n{command}\n", std::process::id()))
                .and_then(|()| file.sync_all());
            let lock = OutputLock { path, _file: file };
            // On an error (a full disk, say) the lock is dropped, which removes the empty file.
            written.with_context(|| unusable("cannot write in it (is the disk full?)"))?;
            return Ok(lock);
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so the next run finds a fresh file (see `acquire`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A run's output folder (`--out`): every name csp-tch writes there, and the rules around them.
///
/// ```text
/// <model>.csv  comparison.json  comparison.md  curves.svg  seeds.csv  checkpoints/<model>.safetensors
/// seed-<s>/ (a run folder each, with --seeds)  .csp-tch.lock (while a run writes)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutDir {
    root: PathBuf,
}

impl OutDir {
    const JSON: &'static str = "comparison.json";
    const MARKDOWN: &'static str = "comparison.md";
    const SVG: &'static str = "curves.svg";
    const SEEDS_CSV: &'static str = "seeds.csv";
    const CHECKPOINTS: &'static str = "checkpoints";
    const SEED_PREFIX: &'static str = "seed-";

    pub fn new(root: impl Into<PathBuf>) -> OutDir {
        OutDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `model`'s per-epoch metrics.
    pub fn csv(&self, model: &str) -> PathBuf {
        self.root.join(format!("{model}.csv"))
    }

    pub fn json(&self) -> PathBuf {
        self.root.join(Self::JSON)
    }

    pub fn markdown(&self) -> PathBuf {
        self.root.join(Self::MARKDOWN)
    }

    pub fn svg(&self) -> PathBuf {
        self.root.join(Self::SVG)
    }

    /// The aggregates of a multi-seed run, one per row.
    pub fn seeds_csv(&self) -> PathBuf {
        self.root.join(Self::SEEDS_CSV)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(Self::CHECKPOINTS)
    }

    /// `model`'s checkpoint.
    pub fn checkpoint(&self, model: &str) -> PathBuf {
        self.checkpoints().join(format!("{model}.safetensors"))
    }

    /// The name of seed `seed`'s folder in a multi-seed run.
    pub fn seed_name(seed: u64) -> String {
        format!("{}{seed}", Self::SEED_PREFIX)
    }

    /// Seed `seed`'s run folder in a multi-seed run.
    pub fn seed(&self, seed: u64) -> OutDir {
        OutDir::new(self.root.join(Self::seed_name(seed)))
    }

    /// The seed folders present (`seed-<s>` with a number), in seed order.
    pub fn seed_folders(&self) -> Vec<(u64, OutDir)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut found: Vec<(u64, OutDir)> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let seed = name.strip_prefix(Self::SEED_PREFIX)?.parse().ok()?;
                Some((seed, OutDir::new(e.path())))
            })
            .collect();
        found.sort_by_key(|(seed, _)| *seed);
        found
    }

    /// Locks the folder for this process (creating it); see [`OutputLock`].
    pub fn lock(&self) -> Result<OutputLock> {
        OutputLock::acquire(&self.root)
    }

    /// Removes what killed writers left here and in the checkpoint folder.
    pub fn remove_leftovers(&self) -> Result<()> {
        remove_leftovers(&self.root)?;
        remove_leftovers(&self.checkpoints())
    }

    /// The csp-tch files of an earlier run present here, for any of `models`: CSVs, checkpoints,
    /// reports, and the seed folders `seeds` (whole).
    fn previous(&self, models: &[&str], seeds: &[(u64, OutDir)]) -> Vec<PathBuf> {
        let per_model = models.iter().flat_map(|m| [self.csv(m), self.checkpoint(m)]);
        let reports = [self.json(), self.markdown(), self.svg(), self.seeds_csv()];
        let mut found: Vec<PathBuf> = per_model.chain(reports).filter(|p| p.symlink_metadata().is_ok()).collect();
        found.extend(seeds.iter().map(|(_, dir)| dir.root.clone()));
        found
    }

    /// Removes an earlier run's results (see `previous`), all or nothing: each is first moved
    /// into one hidden folder here, then that folder is removed; if a move fails, the ones moved
    /// so far are put back and nothing is lost. A seed folder that another live run holds locked
    /// stops the removal before anything moves.
    pub fn remove_previous(&self, models: &[&str], seed_folders: bool) -> Result<()> {
        let seeds = if seed_folders { self.seed_folders() } else { Vec::new() };
        // Held for the removal: another live run's seed folder stops it, and nobody writes there meanwhile.
        let _locks = seeds.iter().map(|(_, dir)| dir.lock()).collect::<Result<Vec<OutputLock>>>()?;
        let found = self.previous(models, &seeds);
        if found.is_empty() {
            return Ok(());
        }
        let aside = self.root.join(hidden_name("previous", PARTIAL_MARK));
        std::fs::create_dir(&aside).with_context(|| format!("cannot create {}", aside.display()))?;
        let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
        for (i, path) in found.iter().enumerate() {
            let to = aside.join(format!("{i}"));
            if let Err(err) = std::fs::rename(path, &to) {
                for (from, to) in moved.iter().rev() {
                    let _ = std::fs::rename(to, from);
                }
                let _ = std::fs::remove_dir(&aside);
                return Err(err).with_context(|| {
                    format!("cannot remove {} of an earlier run (nothing was removed)", path.display())
                });
            }
            moved.push((path.clone(), to));
        }
        let _ = std::fs::remove_dir(self.checkpoints());
        std::fs::remove_dir_all(&aside)
            .with_context(|| format!("cannot remove {}, the earlier run's results moved aside", aside.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_run_is_removed_whole_and_nothing_else_is() {
        let tmp = tempfile::tempdir().unwrap();
        let out = OutDir::new(tmp.path().join("out"));
        let _lock = out.lock().unwrap();
        let earlier = [out.csv("m"), out.checkpoint("m"), out.json(), out.markdown(), out.svg(), out.seeds_csv()];
        let seed = out.seed(3);
        let kept = [out.root().join("notes.txt"), out.csv("not-a-model"), out.root().join("seedling/x")];
        for path in earlier.iter().chain(&kept).chain([&seed.csv("m")]) {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        assert_eq!(out.seed_folders(), vec![(3, seed.clone())]);
        out.remove_previous(&["m"], true).unwrap();
        assert!(earlier.iter().all(|p| !p.exists()), "every result of the earlier run is gone");
        assert!(!seed.root().exists() && !out.checkpoints().exists());
        assert!(kept.iter().all(|p| p.exists()), "what csp-tch did not write stays");
        assert!(out.root().join(OutputLock::FILE).exists(), "this run's lock stays");
        let hidden: Vec<_> = std::fs::read_dir(out.root()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(!hidden.iter().any(|n| n.to_string_lossy().starts_with(".previous")), "{hidden:?}");
    }

    #[test]
    fn hidden_names_fit_in_a_file_name() {
        let long = "d".repeat(255);
        assert!(hidden_name(&long, PARTIAL_MARK).len() <= 255);
        let name = hidden_name("comparison.json", TMP_MARK);
        assert_eq!(name, format!(".comparison.json.tmp-{}", std::process::id()));
        assert!(hidden_name(&"é".repeat(150), TMP_MARK).starts_with(".é"), "cut at a character boundary");
    }
}
