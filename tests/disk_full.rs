//! A full disk: downloads still reach clients when upstream is fine, nothing half-written is
//! kept, the log says why, and caching resumes when space returns. Runs on a small tmpfs
//! (the suite runs as root, which mounting needs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::FakeUpstream;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Files under `p`, without the proxy's own dot-files (markers, locks).
fn files_under(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// Bytes available on the filesystem of `p`.
fn free_bytes(p: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_does_not_stop_downloads_and_caching_resumes() {
    let up = FakeUpstream::start().await;
    let big = up.publish("big", "1.0.0", 3 << 20); // 3 MiB
    let small = up.publish("small", "1.0.0", 200_000);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("crates");
    let _fs = Tmpfs::mount(&cache, "2m");
    let mut server = common::spawn_server(&[
        ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
        ("CRATERE_CACHE", cache.display().to_string()),
        (
            "CRATERE_INDEX",
            dir.path().join("index").display().to_string(),
        ),
    ]);
    let url = |c: &str| format!("http://{}/api/v1/crates/{c}/1.0.0/download", server.addr);

    // Bigger than the whole disk: the write fails part-way.
    let r = reqwest::get(url("big")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap(),
        big,
        "the client gets the whole crate"
    );
    assert!(
        files_under(&cache).is_empty(),
        "nothing half-written is kept: {:?}",
        files_under(&cache)
    );

    // The failed download's partial file is unlinked but stays allocated until the server
    // closes it, a moment after the client got its last byte: wait for that, or the filler
    // below would not fill the disk.
    common::wait_until(
        || free_bytes(&cache) > 1_900_000,
        "the space of the failed download to be freed",
    )
    .await;

    // Fill the disk, then a crate that fits nowhere.
    let filler = cache.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 2 << 20]);
    let r = reqwest::get(url("small")).await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), small);
    assert!(!cache.join("sm/al/small/small-1.0.0.crate").exists());

    // Space returns: the next request caches it.
    std::fs::remove_file(&filler).unwrap();
    let r = reqwest::get(url("small")).await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), small);
    assert_eq!(
        std::fs::read(cache.join("sm/al/small/small-1.0.0.crate")).unwrap(),
        small
    );
    assert_eq!(up.crate_hits("small", "1.0.0"), 2);

    server.kill_hard();
    let log = server.log.lock().unwrap().join("\n");
    assert!(
        log.contains("cannot write to the cache") && log.contains("No space left on device"),
        "the log says why:\n{log}"
    );
}
