//! Files and folders a run writes: atomic replacement of a file, a staging folder renamed into place
//! when complete, the leftovers of a killed process, and the lock that keeps two runs out of one folder.

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Writes `path` through a temporary file in the same folder and a rename, so a reader never sees
/// a half-written file and an interrupted run leaves the previous version intact.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
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
        let path = parent.join(format!(".{name}{PARTIAL_MARK}{}", std::process::id()));
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
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
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
            file.set_len(0).and_then(|()| file.rewind()).with_context(|| unusable("cannot write in it"))?;
            write!(file, "{}\n{command}\n", std::process::id())
                .and_then(|()| file.sync_all())
                .with_context(|| unusable("cannot write in it"))?;
            return Ok(OutputLock { path, _file: file });
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so the next run finds a fresh file (see `acquire`).
        let _ = std::fs::remove_file(&self.path);
    }
}
