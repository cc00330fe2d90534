//! Zero-copy crate hits on plain HTTP: the kernel sends a cached file's pages straight from the
//! page cache with `sendfile(2)`, as nginx does, instead of copying them into the proxy and
//! back into the socket.
//!
//! hyper writes response bodies from memory and has no way to pass a file through. So a hit is
//! made of memory that *is* the file: a read-only `mmap` of it ([`map_if_resident`]), recorded
//! in a registry of live mappings. The connection's I/O object ([`SendfileStream`]) looks at
//! every buffer hyper asks it to write; a buffer inside a registered mapping is sent with
//! `sendfile` from the same offset of the same file (the same bytes, from the same page cache)
//! and its memory is never touched. Anything else is written normally. Should a mapped buffer
//! ever be written the ordinary way (another I/O object, a copy made somewhere), the bytes are
//! still right: they are the file's.
//!
//! A file is mapped only when it is wholly in the page cache (checked with `mincore(2)`), so
//! `sendfile` on the async worker never waits for the disk. Cached files never change in place
//! (they are written elsewhere and renamed; cleanup unlinks them, which leaves an open mapping
//! intact), so a mapping cannot shrink under a reader.
//!
//! The mappings of recently sent files are kept ([`cached`], at most [`HOT_FILES`] for
//! [`HOT_TTL`]), so a hot crate costs no open, map or unmap, and no trip to the blocking pool:
//! only the `mincore` check and the `sendfile`. The proxy forgets a mapping when it removes or
//! replaces the file (before and after the unlink, and a mapping made while the file went away
//! is forgotten right after it is kept); a file removed by another process (`cratere cleanup`)
//! may still be sent from its old mapping, with its right bytes, for up to [`HOT_TTL`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::os::unix::fs::MetadataExt;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Marks an HTTP/1.1 request that came on a [`SendfileStream`]: a crate hit for it may be a
/// mapping. (Not HTTP/2: h2 copies the first bytes of each DATA frame into its own buffer,
/// which would read the mapping; the proxy's own code never does.)
#[derive(Debug, Clone, Copy)]
pub struct Plain;

/// Files smaller than this are read instead (an empty file cannot be mapped).
pub const MIN_LEN: u64 = 1;
/// How often a kept mapping is checked to be still wholly in the page cache.
const RECHECK: Duration = Duration::from_secs(1);

/// Live mappings by start address: end address and the file.
static REGIONS: Mutex<BTreeMap<usize, (usize, Arc<File>)>> = Mutex::new(BTreeMap::new());
/// How many mappings are live, so that writes skip the lookup when there are none.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Bytes sent with `sendfile` by this process (`cratere_sendfile_bytes_total`).
pub static BYTES_SENT: LazyLock<prometheus_client::metrics::counter::Counter> =
    LazyLock::new(Default::default);

/// A registered mapping; unregistered before it is unmapped.
struct Mapping {
    /// Always `Some` until dropped.
    map: Option<memmap2::Mmap>,
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        let entry = REGIONS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(map.as_ptr() as usize));
        LIVE.fetch_sub(1, Ordering::Relaxed);
        // The last reference to a file that was removed meanwhile frees its blocks, which
        // may wait for the disk: then let the blocking pool unmap and close it.
        let unlinked = entry
            .as_ref()
            .is_some_and(|(_, f)| f.metadata().is_ok_and(|m| m.nlink() == 0));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if unlinked => {
                rt.spawn_blocking(move || drop((map, entry)));
            }
            _ => drop((map, entry)),
        }
    }
}

/// Most mappings kept for reuse (each holds a file descriptor and address space, no memory).
pub const HOT_FILES: u64 = 1024;
/// How long a kept mapping is reused.
pub const HOT_TTL: Duration = Duration::from_secs(30);

static HOT: LazyLock<moka::sync::Cache<PathBuf, Mapped>> = LazyLock::new(|| {
    moka::sync::Cache::builder()
        .max_capacity(HOT_FILES)
        .time_to_live(HOT_TTL)
        .build()
});

/// A whole file mapped for [`SendfileStream`], with the file itself (for connections that
/// read it instead: HTTP/2 and TLS).
#[derive(Clone)]
pub struct Mapped(Bytes, Arc<std::sync::atomic::AtomicU64>, Arc<File>);

/// Milliseconds since the first call, for cheap "checked recently" stamps.
fn now_ms() -> u64 {
    static START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    START.elapsed().as_millis() as u64 + 1
}

impl Mapped {
    /// The file's bytes (the mapping itself, not a copy).
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// The open file, and its length.
    pub fn file(&self) -> (Arc<File>, u64) {
        (self.2.clone(), self.0.len() as u64)
    }

    /// Whether every page is in the page cache, checked at most every [`RECHECK`] (a page
    /// evicted in between costs one `sendfile` a wait for the disk). Never waits for the disk.
    fn recently_resident(&self) -> bool {
        let now = now_ms();
        let checked = self.1.load(Ordering::Relaxed);
        if checked != 0 && now.saturating_sub(checked) < RECHECK.as_millis() as u64 {
            return true;
        }
        let ok = self.resident();
        self.1.store(if ok { now } else { 0 }, Ordering::Relaxed);
        ok
    }

    /// Whether every page is in the page cache. Never waits for the disk.
    fn resident(&self) -> bool {
        let page = rustix::param::page_size();
        let pages = self.0.len().div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `self.0` is a whole live mapping (it is only built by `map_if_resident`):
        // it starts at a page boundary and spans `len` bytes; `vec` has one byte per page of
        // it, as mincore(2) requires.
        let rc = unsafe {
            libc::mincore(
                self.0.as_ptr() as *mut libc::c_void,
                self.0.len(),
                vec.as_mut_ptr(),
            )
        };
        rc == 0 && vec.iter().all(|b| b & 1 == 1)
    }
}

/// The kept mapping of the file at `path`, if there is one and it is still wholly in the
/// page cache. Never blocks.
pub fn cached(path: &Path) -> Option<Mapped> {
    let mapped = HOT.get(path)?;
    if mapped.recently_resident() {
        Some(mapped)
    } else {
        HOT.invalidate(path);
        None
    }
}

/// Keeps `mapped` as the mapping of `path` for [`cached`].
pub fn remember(path: PathBuf, mapped: &Mapped) {
    HOT.insert(path, mapped.clone());
}

/// Forgets the mapping of `path` (the file is being removed or replaced).
pub fn forget(path: &Path) {
    HOT.invalidate(path);
}

/// The whole of `file` (`len` bytes) as memory that [`SendfileStream`] sends with `sendfile`,
/// if every page of it is in the page cache; `None` otherwise (or if it cannot be mapped).
/// Blocking: call it on the blocking pool.
pub fn map_if_resident(file: &File, len: u64) -> Option<Mapped> {
    if len < MIN_LEN {
        return None;
    }
    // SAFETY: cached files are immutable once renamed into place (see the module docs), so
    // the mapping's contents cannot change or shrink while it lives.
    let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(file) }.ok()?;
    if map.len() as u64 != len || !mincore_tells_the_truth(file) {
        return None;
    }
    let file = Arc::new(file.try_clone().ok()?);
    let start = map.as_ptr() as usize;
    REGIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(start, (start + map.len(), file.clone()));
    LIVE.fetch_add(1, Ordering::Relaxed);
    let mapped = Mapped(
        Bytes::from_owner(Mapping { map: Some(map) }),
        Default::default(),
        file,
    );
    mapped.recently_resident().then_some(mapped)
}

/// Whether `mincore` reports the page cache truthfully for `file`: Linux answers "all cached"
/// for a file the caller neither owns nor may write (so as not to leak what other users
/// read), and trusting that would let `sendfile` wait for the disk on an async worker.
fn mincore_tells_the_truth(file: &File) -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    euid == 0 || file.metadata().is_ok_and(|m| m.uid() == euid)
}

/// Drops kept mappings whose time is up. The cache only does that when it is used, so an idle
/// proxy calls this now and then: a crate removed by another process then stops holding its
/// disk space. Blocking (closing a removed file frees its blocks).
pub fn expire_kept() {
    HOT.run_pending_tasks();
}

/// Hands memory the allocator holds but no longer uses back to the kernel. glibc's malloc
/// keeps freed chunks in its per-thread arenas: in the soak (bench/soak) the anonymous RSS
/// was ~15 MiB for a live heap of ~3 MB (heaptrack), and ~9 MiB with this every 10 s.
/// Blocking (it walks the arenas): call it on the blocking pool.
pub fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Kept mappings whose time is up are dropped even when the proxy is idle, and the allocator's
/// free memory is returned: every 10 s.
pub fn spawn_expiry(
    jobs: &tokio_util::task::TaskTracker,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    use crate::jobs::{FirstRun, spawn_scheduled};
    spawn_scheduled(
        jobs,
        shutdown.clone(),
        "sendfile-expiry",
        "*/10 * * * * *".parse().expect("valid schedule"),
        FirstRun::OnSchedule,
        || async {
            tokio::task::spawn_blocking(|| {
                expire_kept();
                trim_allocator();
            })
            .await?;
            Ok(())
        },
    );
}

/// The file and offset that the memory at `ptr` maps, if it lies in a live mapping.
fn lookup(ptr: *const u8) -> Option<(Arc<File>, u64)> {
    if LIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let p = ptr as usize;
    let regions = REGIONS.lock().unwrap_or_else(|p| p.into_inner());
    let (&start, (end, file)) = regions.range(..=p).next_back()?;
    (p < *end).then(|| (file.clone(), (p - start) as u64))
}

/// A plain TCP connection that sends registered file mappings with `sendfile`.
pub struct SendfileStream {
    inner: TcpStream,
}

impl SendfileStream {
    pub fn new(inner: TcpStream) -> Self {
        SendfileStream { inner }
    }

    /// Sends `len` bytes of `file` from `offset`.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let mut off = offset;
            match self.inner.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.inner, file, Some(&mut off), len)
                    .map_err(io::Error::from)
            }) {
                Ok(0) if len > 0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cached file is shorter than its mapping",
                    )));
                }
                Ok(n) => {
                    BYTES_SENT.inc_by(n as u64);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `bufs` (none of them mapped) with `MSG_MORE`: a file's pages follow at once, so
    /// the response head goes out in the same segment as the start of the body.
    fn poll_send_more(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        use rustix::net::{SendAncillaryBuffer, SendFlags, sendmsg};
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            match self.inner.try_io(Interest::WRITABLE, || {
                sendmsg(
                    &self.inner,
                    bufs,
                    &mut SendAncillaryBuffer::default(),
                    SendFlags::MORE | SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let skip = bufs.iter().take_while(|b| b.is_empty()).count();
        let bufs = &bufs[skip..];
        let mapped = bufs
            .iter()
            .enumerate()
            .find_map(|(i, b)| (!b.is_empty()).then(|| lookup(b.as_ptr()).map(|m| (i, m)))?);
        match mapped {
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            Some((0, (file, offset))) => self.poll_sendfile(cx, &file, offset, bufs[0].len()),
            Some((i, _)) => self.poll_send_more(cx, &bufs[..i]),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn file_of(data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn empty_files_are_not_mapped_and_mappings_unregister() {
        let empty = file_of(&[]);
        assert!(map_if_resident(empty.as_file(), 0).is_none());
        let data = vec![9u8; 100_000];
        let f = file_of(&data);
        let bytes = map_if_resident(f.as_file(), data.len() as u64)
            .expect("just written")
            .bytes();
        assert_eq!(&bytes[..], &data[..]);
        let (_, offset) = lookup(bytes[500..].as_ptr()).expect("registered");
        assert_eq!(offset, 500);
        let ptr = bytes.as_ptr();
        drop(bytes);
        assert!(lookup(ptr).is_none());
    }

    /// A file truncated in place under its mapping: sending stops with an error; nothing reads
    /// the vanished pages (which would be SIGBUS).
    #[tokio::test]
    async fn a_file_truncated_under_its_mapping_is_an_error_not_a_crash() {
        let f = file_of(&vec![5u8; 200_000]);
        let body = map_if_resident(f.as_file(), 200_000).unwrap().bytes();
        f.as_file().set_len(10_000).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            got.len()
        });
        let (sock, _) = listener.accept().await.unwrap();
        let mut out = SendfileStream::new(sock);
        let mut rest = body.clone();
        let err = loop {
            match out.write(&rest).await {
                Ok(n) => {
                    let _ = rest.split_to(n);
                }
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        drop(out);
        assert_eq!(reader.await.unwrap(), 10_000);
    }

    /// Head, mapped body and a trailing buffer in one vectored write, with a reader slower than
    /// the writer (so `sendfile` meets a full socket and must wait): the bytes arrive intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mapped_buffers_are_sent_from_the_file() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let f = file_of(&data);
        let body = map_if_resident(f.as_file(), data.len() as u64)
            .unwrap()
            .bytes();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&buf[..n]);
            }
        });
        let (sock, _) = listener.accept().await.unwrap();
        let mut out = SendfileStream::new(sock);
        let (head, tail) = (b"HEAD".to_vec(), b"TAIL".to_vec());
        let mut parts = [Bytes::from(head), body.clone(), Bytes::from(tail)];
        // hyper's way: write what it can, advance past what was written, repeat.
        loop {
            let slices: Vec<IoSlice<'_>> = parts.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = out.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            for p in parts.iter_mut() {
                let k = n.min(p.len());
                let _ = p.split_to(k);
                n -= k;
            }
            if parts.iter().all(|p| p.is_empty()) {
                break;
            }
        }
        out.shutdown().await.unwrap();
        drop(out);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), data.len() + 8);
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..4 + data.len()] == data[..], "body bytes differ");
        assert_eq!(&got[4 + data.len()..], b"TAIL");
    }
}
