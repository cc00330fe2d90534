//! Streaming a cached file to a client without a thread hop per read.
//!
//! A file that was served recently is in the page cache. Reading it costs a memory copy, and
//! handing that read to the blocking thread pool costs two context switches, which on a busy
//! proxy cost more than the copy. So each chunk is first read on the async worker with
//! `preadv2(…, RWF_NOWAIT)`, which the kernel only completes from the page cache and answers
//! with `EAGAIN` when it would have to wait for the disk; only then does the read go to the
//! blocking pool. The runtime never waits on a disk, and a hot file streams with no hops.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;

/// Largest chunk read at once. Every HTTP/2 stream of a hit holds one while it is sent, so
/// this bounds memory with many streams in flight (64 KiB cost no measurable throughput
/// against 128 KiB in bench/, and halved the peak RSS).
pub const READ_CHUNK: usize = 64 * 1024;
/// Reads smaller than this go to a buffer of their own size instead of a pooled one.
const SMALL: usize = 16 * 1024;
/// Most idle buffers kept for reuse (4 MiB).
const POOL_MAX: usize = 64;

/// Read buffers of [`READ_CHUNK`] bytes' capacity, reused once the client has been sent their
/// bytes. Buffers are never zeroed: the kernel writes into their spare capacity (zeroing a
/// fresh 128 KiB buffer was 5 % of an HTTP/2 crate hit's CPU when every buffer was in flight).
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A pooled buffer holding the bytes read; goes back to the pool when dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        if let Ok(mut pool) = POOL.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(buf);
        }
    }
}

/// Reads up to `want` (at most [`READ_CHUNK`]) bytes with `read`, which is given the spare
/// capacity to fill and answers how many bytes it wrote there (`None`: it could not read
/// now). Into a pooled buffer, or a small one of its own.
fn read_into(
    want: usize,
    read: impl FnOnce(&mut [std::mem::MaybeUninit<u8>]) -> Option<io::Result<usize>>,
) -> Option<io::Result<Bytes>> {
    let want = want.min(READ_CHUNK);
    let fill = |mut buf: Vec<u8>| -> Option<io::Result<Vec<u8>>> {
        let n = match read(&mut buf.spare_capacity_mut()[..want])? {
            Ok(n) => n.min(want),
            Err(e) => return Some(Err(e)),
        };
        // SAFETY: `read` wrote `n` bytes at the start of the spare capacity.
        unsafe { buf.set_len(n) };
        Some(Ok(buf))
    };
    if want < SMALL {
        return fill(Vec::with_capacity(want)).map(|r| r.map(Bytes::from));
    }
    let buf = POOL
        .lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK));
    fill(buf).map(|r| r.map(|buf| Bytes::from_owner(Pooled(buf))))
}

/// `pread(2)` into `buf`, which the kernel only writes to. `flags`: `preadv2` flags.
fn pread_uninit(
    file: &std::fs::File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    pos: u64,
    flags: i32,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let offset =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: one iovec over `buf`, valid for writes of its length; the kernel writes at
        // most that many bytes and reads none.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Up to `want` bytes of `file` at `pos`, read on the calling thread (which may block).
pub fn read_at_blocking(file: &std::fs::File, pos: u64, want: usize) -> io::Result<Bytes> {
    read_into(want, |buf| Some(pread_uninit(file, buf, pos, 0))).expect("always reads")
}

/// The bytes of `file` from `pos` to `len` (its length when opened), in chunks of at most
/// [`READ_CHUNK`]. A file that ends early (truncated behind our back) is an error, never a
/// short body that looks complete.
pub fn stream_from(
    file: Arc<std::fs::File>,
    pos: u64,
    len: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = (file, pos);
    futures_util::stream::try_unfold(state, move |(file, pos)| async move {
        if pos >= len {
            return Ok(None);
        }
        let want = (len - pos).min(READ_CHUNK as u64) as usize;
        let chunk = match read_into(want, |buf| read_cached(&file, buf, pos)) {
            Some(read) => read?,
            None => {
                let f = file.clone();
                tokio::task::spawn_blocking(move || read_at_blocking(&f, pos, want))
                    .await
                    .map_err(io::Error::other)??
            }
        };
        if chunk.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "cached file is shorter than when it was opened",
            ));
        }
        let next = pos + chunk.len() as u64;
        Ok(Some((chunk, (file, next))))
    })
}

/// Reads at `pos` only if the kernel can answer from the page cache: `None` when it would
/// have to wait for the disk (or cannot tell on this system or file system).
pub fn read_cached(
    file: &std::fs::File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    pos: u64,
) -> Option<io::Result<usize>> {
    match pread_uninit(file, buf, pos, libc::RWF_NOWAIT) {
        Ok(n) => Some(Ok(n)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
            ) =>
        {
            None
        }
        Err(e) => Some(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;
    use std::io::Write;

    #[tokio::test(flavor = "multi_thread")]
    async fn streams_the_rest_of_a_file_in_chunks() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(READ_CHUNK * 2 + 123)).map(|i| i as u8).collect();
        f.write_all(&data).unwrap();
        let len = data.len() as u64;
        let chunks: Vec<Bytes> = stream_from(Arc::new(f.reopen().unwrap()), 7, len)
            .try_collect()
            .await
            .unwrap();
        assert!(chunks.iter().all(|c| c.len() <= READ_CHUNK));
        assert_eq!(chunks.concat(), data[7..]);
    }

    #[tokio::test]
    async fn a_file_truncated_behind_our_back_is_an_error() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1u8; 1000]).unwrap();
        let reader = f.reopen().unwrap();
        f.as_file().set_len(500).unwrap();
        let got: io::Result<Vec<Bytes>> =
            stream_from(Arc::new(reader), 0, 1000).try_collect().await;
        assert_eq!(got.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pooled_reads_hold_only_what_was_read() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; READ_CHUNK]).unwrap();
        let a = read_at_blocking(f.as_file(), 0, READ_CHUNK).unwrap();
        assert_eq!(a.len(), READ_CHUNK);
        drop(a);
        let b = read_at_blocking(f.as_file(), READ_CHUNK as u64 - 20_000, 50_000).unwrap();
        assert_eq!(b.len(), 20_000, "a short read is a short chunk");
        assert!(b.iter().all(|&x| x == 7));
        let small = read_at_blocking(f.as_file(), 0, 10).unwrap();
        assert_eq!(&small[..], &[7u8; 10]);
    }

    #[test]
    fn a_page_cached_file_is_read_without_waiting() {
        // In the package directory (the file system the cache would be on; not a tmpfs).
        let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        f.write_all(b"hello").unwrap();
        // Just written, so in the page cache.
        let got = read_into(5, |buf| read_cached(f.as_file(), buf, 0))
            .expect("RWF_NOWAIT is supported")
            .unwrap();
        assert_eq!(&got[..], b"hello");
    }
}
