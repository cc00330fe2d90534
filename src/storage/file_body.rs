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

/// Largest chunk read at once.
pub const READ_CHUNK: usize = 128 * 1024;
/// Reads smaller than this go to a buffer of their own size instead of a pooled one.
const SMALL: usize = 16 * 1024;
/// Most idle buffers kept for reuse (8 MiB).
const POOL_MAX: usize = 64;

/// Read buffers of [`READ_CHUNK`] bytes, reused once the client has been sent their bytes, so
/// a hit costs no allocation and no zeroing.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A pooled buffer holding `len` read bytes; goes back to the pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut pool) = POOL.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(buf);
        }
    }
}

/// Reads up to `want` (at most [`READ_CHUNK`]) bytes at `pos` with `read`, into a pooled
/// buffer (or a small one of its own).
fn read_into(
    want: usize,
    read: impl FnOnce(&mut [u8]) -> Option<io::Result<usize>>,
) -> Option<io::Result<Bytes>> {
    let want = want.min(READ_CHUNK);
    if want < SMALL {
        let mut buf = vec![0u8; want];
        return read(&mut buf).map(|n| {
            n.map(|n| {
                buf.truncate(n);
                Bytes::from(buf)
            })
        });
    }
    let buf = POOL
        .lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_else(|| vec![0u8; READ_CHUNK]);
    let mut pooled = Pooled { buf, len: 0 };
    let n = read(&mut pooled.buf[..want])?;
    Some(n.map(|n| {
        pooled.len = n;
        Bytes::from_owner(pooled)
    }))
}

/// Up to `want` bytes of `file` at `pos`, read on the calling thread (which may block).
pub fn read_at_blocking(file: &std::fs::File, pos: u64, want: usize) -> io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    read_into(want, |buf| Some(file.read_at(buf, pos))).expect("always reads")
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
#[cfg(target_os = "linux")]
pub fn read_cached(file: &std::fs::File, buf: &mut [u8], pos: u64) -> Option<io::Result<usize>> {
    use rustix::io::{Errno, ReadWriteFlags, preadv2};
    match preadv2(
        file,
        &mut [io::IoSliceMut::new(buf)],
        pos,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(n) => Some(Ok(n)),
        Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => None,
        Err(e) => Some(Err(e.into())),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn read_cached(_: &std::fs::File, _: &mut [u8], _: u64) -> Option<io::Result<usize>> {
    None
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
        let mut buf = [0u8; 5];
        // Just written, so in the page cache.
        let n = read_cached(f.as_file(), &mut buf, 0).expect("RWF_NOWAIT is supported");
        assert_eq!(n.unwrap(), 5);
        assert_eq!(&buf, b"hello");
    }
}
