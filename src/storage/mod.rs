//! Where bytes live: on disk, a directory of files addressed by relative keys that only typed
//! names produce, written through temp files and atomic renames ([`FsStore`]); crate files
//! either there or in an S3-compatible bucket ([`CrateStore`]).
//!
//! Every write goes to `<root>/.tmp/` first and is renamed into place when complete, so a reader
//! (or a crash at any moment) sees either nothing or a whole file. Leftover temp files from a
//! crash are removed when the store is opened.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tempfile::NamedTempFile;

pub mod crates;
pub mod file_body;
pub mod local_cache;
pub mod s3;

pub use crates::{CrateInfo, CrateStore, StoredCrate};

/// Directory (inside the root) holding files being written.
const TMP_DIR: &str = ".tmp";

#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// Opens (creating if needed) a store rooted at `root` and clears temp files left by a
    /// previous run.
    pub fn open(root: &Path) -> io::Result<FsStore> {
        let tmp = root.join(TMP_DIR);
        std::fs::create_dir_all(&tmp).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display()))
        })?;
        let root = root.canonicalize()?;
        let store = FsStore { root };
        store.remove_leftover_temp_files()?;
        Ok(store)
    }

    /// Removes temp files nobody is writing. Writers hold an exclusive lock on their temp file
    /// for as long as it is open, so a file whose lock can be taken was left by a process that
    /// died; files of a live process sharing the directory (another server, `cratere warm`)
    /// are left alone.
    fn remove_leftover_temp_files(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(self.root.join(TMP_DIR))? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let Ok(file) = std::fs::File::open(entry.path()) else {
                continue;
            };
            if file.try_lock().is_ok() {
                tracing::info!(path = %entry.path().display(), "removing leftover temp file");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Absolute path of a key. Keys come from [`crate::names`] types, never from raw input.
    pub fn path(&self, key: &str) -> PathBuf {
        debug_assert!(
            !key.split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        );
        self.root.join(key)
    }

    /// A new temp file in the store's temp directory (same filesystem as the final place, so
    /// the rename is atomic). Dropped without [`FsStore::persist`], it is deleted.
    pub fn temp_file(&self) -> io::Result<NamedTempFile> {
        use std::os::unix::fs::PermissionsExt;
        // Cached files are public data: readable by other local users and tools (backups,
        // a web server pointed at the cache), like the files cargo itself writes.
        let tmp = tempfile::Builder::new()
            .prefix("w-")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(self.root.join(TMP_DIR))?;
        tmp.as_file().lock()?;
        Ok(tmp)
    }

    /// Atomically moves a finished temp file to `key`, replacing any previous file.
    pub fn persist(&self, tmp: NamedTempFile, key: &str) -> io::Result<()> {
        let dest = self.path(key);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        tmp.persist(&dest).map_err(|e| e.error)?;
        Ok(())
    }

    /// Removes `key` if present.
    pub fn remove(&self, key: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether a file can be created in the store (for readiness).
    pub fn check_writable(&self) -> io::Result<()> {
        use std::io::Write;
        let mut f = self.temp_file()?;
        f.write_all(b"ready")?;
        f.as_file().sync_data()
    }

    /// Every stored file (not the temp files being written), in no particular order.
    pub fn list(&self) -> io::Result<Vec<StoredFile>> {
        list_files(&self.root)
    }

    /// Opens `key` and reads its first `chunk` bytes in one blocking call: `None` when absent;
    /// else the file, its length and the bytes read (maybe fewer than asked). A file
    /// that fits in one chunk is then served without further reads. With `map`, a file wholly
    /// in the page cache comes back whole as a mapping for [`crate::sendfile`] instead.
    pub async fn open_with_head(
        &self,
        key: &str,
        chunk: usize,
        map: bool,
    ) -> io::Result<Option<(std::fs::File, u64, bytes::Bytes)>> {
        let path = self.path(key);
        tokio::task::spawn_blocking(move || {
            let f = match open_noatime(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let len = f.metadata()?.len();
            if map && let Some(mapped) = crate::sendfile::map_if_resident(&f, len) {
                crate::sendfile::remember(path.clone(), &mapped);
                // Removed or replaced since the open: this request still gets the bytes it
                // opened, later ones must not.
                if !same_file(&f, &path) {
                    crate::sendfile::forget(&path);
                }
                return Ok(Some((f, len, mapped.bytes())));
            }
            let want = len.min(chunk as u64) as usize;
            // May be short (then the caller reads the rest from where it ends).
            let head = file_body::read_at_blocking(&f, 0, want)?;
            Ok(Some((f, len, head)))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Opens `key` for reading, `None` when absent.
    pub async fn open_read(&self, key: &str) -> io::Result<Option<(tokio::fs::File, u64)>> {
        match tokio::fs::File::open(self.path(key)).await {
            Ok(f) => {
                let len = f.metadata().await?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Opens a cached file for reading without updating its access time: usage flushes move
/// mtimes past atimes, so under `relatime` every hot hit would otherwise write an inode
/// (a journal transaction that can wait for the disk) on an async worker's `sendfile` or
/// `RWF_NOWAIT` read. `O_NOATIME` needs the file's owner; others get a plain open.
fn open_noatime(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    #[cfg(target_os = "linux")]
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        other => return other,
    }
    std::fs::File::open(path)
}

/// Whether `path` still names the file `f` has open.
fn same_file(f: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A file found by [`list_files`].
#[derive(Debug, Clone)]
pub struct StoredFile {
    /// Path relative to the listed root, `/`-separated.
    pub rel: String,
    pub len: u64,
    pub modified: SystemTime,
}

/// Lists the regular files under `root`, skipping every entry whose name starts with `.`
/// (the `.tmp/` directory of files being written, marker and lock files). Files or directories
/// that vanish during the walk (another process removing them) are skipped, not errors; a
/// missing `root` has no files.
pub fn list_files(root: &Path) -> io::Result<Vec<StoredFile>> {
    let mut out = Vec::new();
    let mut dirs = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                dirs.push((entry.path(), rel));
            } else if meta.is_file() {
                out.push(StoredFile {
                    rel,
                    len: meta.len(),
                    modified: meta.modified()?,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn writes_are_invisible_until_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let mut tmp = store.temp_file().unwrap();
        tmp.write_all(b"hello").unwrap();
        assert!(!store.path("se/rd/serde/x.crate").exists());
        store.persist(tmp, "se/rd/serde/x.crate").unwrap();
        assert_eq!(
            std::fs::read(store.path("se/rd/serde/x.crate")).unwrap(),
            b"hello"
        );
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1, "temp dir is not listed: {listed:?}");
        assert_eq!(
            (listed[0].rel.as_str(), listed[0].len),
            ("se/rd/serde/x.crate", 5)
        );
        store.remove("se/rd/serde/x.crate").unwrap();
        store.remove("se/rd/serde/x.crate").unwrap();
        assert!(!store.path("se/rd/serde/x.crate").exists());
    }

    #[test]
    fn leftover_temp_files_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let live = store.temp_file().unwrap();
        let (file, dead) = store.temp_file().unwrap().keep().unwrap();
        drop(file); // the writer died: its lock is gone
        FsStore::open(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(live.path().exists(), "a file being written is kept");
    }
}
