//! The disk backend: [`FsStore`], a directory of files addressed by relative keys that only
//! typed names produce, written through temp files and atomic renames; the crate-store
//! operations on such a directory (`CRATERE_CACHE` with `CRATERE_STORAGE=fs`), where a crate
//! file's mtime is its last use; the one directory walker ([`list_files`]) and the one
//! `flock` helper ([`LockFile`]).
//!
//! Every write goes to `<root>/.tmp/` first and is renamed into place when complete, so a reader
//! (or a crash at any moment) sees either nothing or a whole file. Leftover temp files from a
//! crash are removed when the store is opened.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tempfile::NamedTempFile;

use super::file_body::{self, READ_CHUNK};
use super::{CrateInfo, StoredCrate};
use crate::names::CrateKey;

/// In the crate cache: present once every crate file's mtime is a last-use time.
pub const TRACKED_MARKER: &str = ".usage-tracked";

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
    /// that fits in one chunk is then served without further reads. A file wholly in the page
    /// cache is kept open and mapped for the next hits ([`crate::sendfile::cached`]); with
    /// `map`, it comes back whole as that mapping, for `sendfile`, instead of a first chunk.
    pub async fn open_with_head(
        &self,
        key: &str,
        chunk: usize,
        map: bool,
    ) -> io::Result<Option<(Arc<std::fs::File>, u64, bytes::Bytes)>> {
        let path = self.path(key);
        tokio::task::spawn_blocking(move || {
            let f = match open_noatime(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let len = f.metadata()?.len();
            if let Some(mapped) = crate::sendfile::map_if_resident(&f, len) {
                crate::sendfile::remember(path.clone(), &mapped);
                // Removed or replaced since the open: this request still gets the bytes it
                // opened, later ones must not.
                if !same_file(&f, &path) {
                    crate::sendfile::forget(&path);
                }
                if map {
                    return Ok(Some((mapped.file().0, len, mapped.bytes())));
                }
            }
            let want = len.min(chunk as u64) as usize;
            // May be short (then the caller reads the rest from where it ends).
            let head = file_body::read_at_blocking(&f, 0, want)?;
            Ok(Some((Arc::new(f), len, head)))
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

/// The crate-store operations of a directory ([`super::CrateStore::Fs`]).
impl FsStore {
    pub(super) async fn open_crate(
        &self,
        key: &CrateKey,
        zero_copy: bool,
    ) -> io::Result<Option<StoredCrate>> {
        let rel = key.as_relative();
        // A hot crate: its mapping for `sendfile`, or else its open file, read on this thread
        // from the page cache (no open, no trip to the blocking pool).
        if let Some(hot) = crate::sendfile::cached(&self.path(&rel)) {
            return Ok(Some(if zero_copy {
                StoredCrate::from_head(hot.bytes(), None)
            } else {
                StoredCrate::from_head(bytes::Bytes::new(), Some(hot.file()))
            }));
        }
        Ok(self
            .open_with_head(&rel, READ_CHUNK, zero_copy)
            .await?
            .map(|(f, len, head)| {
                let rest = (head.len() as u64) < len;
                StoredCrate::from_head(head, rest.then_some((f, len)))
            }))
    }

    pub(super) async fn crate_len(&self, key: &CrateKey) -> io::Result<Option<u64>> {
        Ok(self.crate_meta(key).await?.map(|m| m.len()))
    }

    pub(super) async fn crate_last_use(&self, key: &CrateKey) -> io::Result<Option<SystemTime>> {
        self.crate_meta(key)
            .await?
            .map(|m| m.modified())
            .transpose()
    }

    async fn crate_meta(&self, key: &CrateKey) -> io::Result<Option<std::fs::Metadata>> {
        match tokio::fs::metadata(self.path(&key.as_relative())).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn store_crate(&self, tmp: NamedTempFile, key: &CrateKey) -> io::Result<()> {
        let (fs, rel) = (self.clone(), key.as_relative());
        tokio::task::spawn_blocking(move || {
            tmp.as_file().sync_data()?;
            fs.persist(tmp, &rel)?;
            crate::sendfile::forget(&fs.path(&rel));
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    pub(super) async fn list_crates(&self) -> io::Result<Vec<CrateInfo>> {
        let root = self.root.clone();
        let files = tokio::task::spawn_blocking(move || crate_files(&root))
            .await
            .map_err(io::Error::other)??;
        Ok(files
            .into_iter()
            .map(|(key, f)| CrateInfo {
                key,
                len: f.len,
                last_use: f.modified,
            })
            .collect())
    }

    pub(super) async fn remove_crate(&self, key: &CrateKey) -> io::Result<bool> {
        let path = self.path(&key.as_relative());
        crate::sendfile::forget(&path);
        let removed = tokio::fs::remove_file(&path).await;
        // A hit that opened the file just before the unlink may have kept a mapping.
        crate::sendfile::forget(&path);
        match removed {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A use is the crate file's mtime, moved forward (never back, never creating a file).
    pub(super) async fn record_crate_uses(&self, uses: Vec<(CrateKey, SystemTime)>) -> usize {
        let root = self.root.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut written = 0;
            for (key, when) in uses {
                let rel = key.as_relative();
                match set_mtime(&root.join(&rel), when, false) {
                    Ok(true) => written += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(file = %rel, error = %e, "cannot record a use"),
                }
            }
            written
        })
        .await;
        res.unwrap_or_else(|e| {
            tracing::error!(error = %e, "usage flush task failed");
            0
        })
    }

    /// Whether crate mtimes are last-use times (the marker exists).
    pub(super) fn is_tracked(&self) -> bool {
        self.root.join(TRACKED_MARKER).exists()
    }

    /// On a cache whose crate files have no usage record yet (from before usage tracking, or
    /// from another tool; their mtime only says when they were downloaded), records a use of
    /// each of them at `now` and writes the marker. A crash halfway leaves no marker, so the
    /// next start does it again. Blocking.
    pub(super) fn adopt_untracked(&self, now: SystemTime) -> io::Result<Option<usize>> {
        if self.is_tracked() {
            return Ok(None);
        }
        let mut n = 0;
        for (key, _) in crate_files(&self.root)? {
            if set_mtime(&self.path(&key.as_relative()), now, false)? {
                n += 1;
            }
        }
        std::fs::write(
            self.root.join(TRACKED_MARKER),
            "The mtime of each .crate file in this directory is its last use by cratere.\n",
        )?;
        Ok(Some(n))
    }
}

/// The crate files under `root` (anything else there, temp files, markers, stray files, is
/// not a crate: only what parses as a [`CrateKey`] is). Blocking.
pub fn crate_files(root: &Path) -> io::Result<Vec<(CrateKey, StoredFile)>> {
    Ok(list_files(root)?
        .into_iter()
        .filter_map(|f| Some((f.rel.parse().ok()?, f)))
        .collect())
}

/// Sets `path`'s mtime to `when` unless it is already later (a use never makes a file look
/// older, e.g. when two processes record uses of it). Returns false when the file does not
/// exist and `create` is false (a crate removed meanwhile is not re-created as an empty file).
pub fn set_mtime(path: &Path, when: SystemTime, create: bool) -> io::Result<bool> {
    let open = || {
        std::fs::File::options()
            .read(!create)
            .write(create)
            .create(create)
            .truncate(false)
            .open(path)
    };
    let file = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            open()?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.modified()? < when {
        file.set_modified(when)?;
    }
    Ok(true)
}

/// A lock file, opened once and kept open by its owner; each exclusive section takes an
/// `flock` on it and unlocks it explicitly. (Closing a freshly opened file instead would not
/// release the lock while a child process forked meanwhile, and not yet exec'd, still shares
/// the open file description.) Other processes on the same directory see it held.
pub struct LockFile {
    path: PathBuf,
    file: std::fs::File,
}

impl LockFile {
    /// Opens (creating) the lock file at `path`.
    pub fn open(path: &Path) -> io::Result<LockFile> {
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })?;
        Ok(LockFile {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock, `None` when another holder (in another process) has it.
    pub fn try_lock(&self) -> io::Result<Option<FileLock<'_>>> {
        match self.file.try_lock() {
            Ok(()) => Ok(Some(FileLock(&self.file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io::Error::new(
                e.kind(),
                format!("cannot lock {}: {e}", self.path.display()),
            )),
        }
    }
}

/// An `flock` held on a [`LockFile`], released when dropped (and when the process dies).
pub struct FileLock<'a>(&'a std::fs::File);

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
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
    fn a_lock_file_is_held_across_opens_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let (a, b) = (
            LockFile::open(&path).unwrap(),
            LockFile::open(&path).unwrap(),
        );
        let held = a.try_lock().unwrap().expect("free");
        assert!(b.try_lock().unwrap().is_none(), "held by another open");
        drop(held);
        assert!(b.try_lock().unwrap().is_some(), "released");
    }

    #[test]
    fn only_crate_keys_are_crate_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        for rel in [
            "se/rd/serde/serde-1.0.0.crate",
            "se/rd/serde/serde-1.0.0.crate.bak",
            "se/rd/serde/notes.txt",
            "3/r/ryu/ryu-1.0.0.crate",
        ] {
            let p = store.path(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let mut keys: Vec<_> = crate_files(dir.path())
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.as_relative())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            ["3/r/ryu/ryu-1.0.0.crate", "se/rd/serde/serde-1.0.0.crate"]
        );
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
