//! Outputs that appear whole or not at all.
//!
//! Every file and folder Ember writes goes to a temporary name beside its destination (same
//! file system) and is renamed over it only when complete, so a crash, a kill or a full disk
//! leaves the previous content in place. Temporary names carry the writer's process id
//! (`.NAME.tmp-PID`); ones left by a process that no longer runs are removed by the next
//! writer of the same destination.

use std::path::{Path, PathBuf};

use crate::error::{LoraError, Result};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoraError + '_ {
    move |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `target`'s folder (`.` for a bare name) and its file name.
fn split(target: &Path) -> (PathBuf, String) {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    (parent, name)
}

/// Whether process `pid` still runs (on Unix; elsewhere every process counts as running).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes `.NAME.tmp-PID` (and `.NAME.tmp-PID.old`) entries in `parent` whose process is
/// gone: what a killed writer of `parent/NAME` left behind. Errors are ignored (best effort).
pub fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.strip_suffix(".old").unwrap_or(rest);
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, flushed to disk, renamed
/// over `path`. On any error the temporary file is removed and `path` is untouched.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |file| std::io::Write::write_all(file, bytes))
}

/// Like [`write_file`], with the content produced by `fill` into the open temporary file.
pub fn write_file_with(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let (parent, name) = split(path);
    remove_stale(&parent, &name);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        fill(&mut file)?;
        file.sync_all()
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(LoraError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        LoraError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?;
    sync_dir(&parent);
    Ok(())
}

/// A fresh temporary folder beside `target` (same file system, so the final rename is atomic).
/// Stale ones of killed writers of `target` are removed first.
pub fn staging_dir(target: &Path) -> Result<PathBuf> {
    let (parent, name) = split(target);
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    remove_stale(&parent, &name);
    let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    Ok(staging)
}

/// Replaces `target` with the finished `staging` folder. An existing `target` is moved aside
/// first and removed only after the rename succeeded.
pub fn commit_dir(staging: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        let old = PathBuf::from(format!("{}.old", staging.display()));
        std::fs::rename(target, &old).map_err(io(target))?;
        if let Err(source) = std::fs::rename(staging, target) {
            // Put the previous content back: nothing that was there is lost.
            let _ = std::fs::rename(&old, target);
            return Err(LoraError::Io {
                path: target.to_path_buf(),
                source,
            });
        }
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(staging, target).map_err(io(target))?;
    }
    Ok(())
}

/// Flushes every file under `dir`, and `dir` itself, to disk: a rename that a power loss
/// keeps must not point at files whose data was still in the page cache.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Flushes a folder's entries (best effort: not every file system can sync a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Flushes the folder holding `target`, so that its rename is on disk.
fn sync_parent(target: &Path) {
    sync_dir(&split(target).0);
}

/// A staging folder that is removed when dropped unless it was committed: errors and panics
/// between [`staging_dir`] and [`commit_dir`] leave nothing behind.
pub struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    /// A fresh staging folder for `target` (see [`staging_dir`]).
    pub fn new(target: &Path) -> Result<Self> {
        Ok(Self {
            path: staging_dir(target)?,
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the folder to `target` (see [`commit_dir`]) once its files are on disk.
    pub fn commit(mut self, target: &Path) -> Result<()> {
        sync_tree(&self.path)?;
        commit_dir(&self.path, target)?;
        self.committed = true;
        sync_parent(target);
        Ok(())
    }

    /// Renames the folder to `target`, which must not exist: an output that appeared while
    /// this one was written (a second `ember merge --out` of the same folder) is kept, and
    /// this one is removed.
    pub fn commit_new(mut self, target: &Path) -> Result<()> {
        if target.exists() {
            return Err(LoraError::Io {
                path: target.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "appeared while this output was written (another process?); it is kept",
                ),
            });
        }
        // Not flushed file by file: merged and converted models are large, and like `cp` (and
        // transformers' save_pretrained) this leaves flushing to the kernel. A kill cannot
        // leave a partial folder; a power loss within seconds of the rename can.
        std::fs::rename(&self.path, target).map_err(io(target))?;
        self.committed = true;
        sync_parent(target);
        Ok(())
    }
}

/// An exclusive lock on a folder, held while the value lives (`flock` on `DIR/.ember.lock`;
/// released by the kernel when the process dies, so a killed run never leaves it held).
pub struct DirLock {
    _file: std::fs::File,
}

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = ".ember.lock";

impl DirLock {
    /// Takes the lock on `dir` (created if missing), or fails at once when another process
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                return Err(LoraError::Io {
                    path: dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "in use by another ember process (a run writing into the same output_dir)",
                    ),
                });
            }
        }
        Ok(Self { _file: file })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Whether `name` (from an index file) is a plain file name: no folder part, no `..`, not
/// absolute, so that joining it to a folder stays inside that folder.
pub fn is_plain_file_name(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty()
        && !name.contains(['/', '\\', '\0'])
        && name != "."
        && name != ".."
        && path.components().count() == 1
        && matches!(path.components().next(), Some(std::path::Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_file_names() {
        for good in ["model.safetensors", "model-00001-of-00002.safetensors", "a..b"] {
            assert!(is_plain_file_name(good), "{good}");
        }
        for bad in ["", ".", "..", "../x.safetensors", "/etc/passwd", "sub/x", "a\\b", "x\0"] {
            assert!(!is_plain_file_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn stale_staging_of_dead_processes_is_removed() {
        let dir = std::env::temp_dir().join(format!("ember-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A pid far above the kernel's pid_max cannot be running.
        let dead = dir.join(".out.tmp-2147483000");
        std::fs::create_dir_all(dead.join("inner")).unwrap();
        let dead_old = dir.join(".out.tmp-2147483000.old");
        std::fs::create_dir_all(&dead_old).unwrap();
        let other = dir.join(".other.tmp-2147483000");
        std::fs::create_dir_all(&other).unwrap();
        let staging = Staging::new(&dir.join("out")).unwrap();
        assert!(!dead.exists() && !dead_old.exists());
        assert!(other.exists(), "another destination's staging is not touched");
        std::fs::write(staging.path().join("f"), b"x").unwrap();
        let path = staging.path().to_path_buf();
        drop(staging);
        assert!(!path.exists(), "an uncommitted staging folder is removed on drop");

        // A committed folder replaces the old one; a failed write leaves the old file intact.
        let staging = Staging::new(&dir.join("out")).unwrap();
        std::fs::write(staging.path().join("f"), b"new").unwrap();
        staging.commit(&dir.join("out")).unwrap();
        assert_eq!(std::fs::read(dir.join("out/f")).unwrap(), b"new");
        write_file(&dir.join("r.json"), b"{}").unwrap();
        let err = write_file_with(&dir.join("r.json"), |_| Err(std::io::Error::other("disk full")));
        assert!(err.is_err());
        assert_eq!(std::fs::read(dir.join("r.json")).unwrap(), b"{}");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![other.file_name().unwrap().to_os_string()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
