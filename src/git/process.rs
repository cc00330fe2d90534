//! git child processes: each in its own process group, killed with the whole group when
//! dropped before it exited (a cancelled sync, a client that hung up), so neither `git fetch`'s
//! helpers nor `git http-backend`'s `upload-pack`/`pack-objects` outlive their request. On
//! Linux each git also gets SIGKILL if the proxy itself dies (`PR_SET_PDEATHSIG`), so a
//! `kill -9` of the proxy leaves no orphaned git (a `git prune` of a dead sync racing the next
//! one); its helpers then see their pipes close and exit.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// A running git process. Dropping it before [`GitChild::wait`] returned kills its process
/// group with SIGKILL; tokio reaps the leader, the leader's own children are reparented and
/// reaped by init (`git http-backend` normally waits for its children itself).
#[derive(Debug)]
pub struct GitChild {
    child: Child,
    pid: Option<u32>,
}

impl GitChild {
    /// Spawns `cmd` as the leader of a new process group.
    ///
    /// Must be called from a thread that lives as long as the child should (a runtime worker,
    /// not a blocking-pool thread): the parent-death signal follows the forking thread.
    pub fn spawn(cmd: &mut Command) -> io::Result<GitChild> {
        cmd.process_group(0).kill_on_drop(true);
        #[cfg(target_os = "linux")]
        {
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: the closure runs in the forked child before exec and only makes
            // async-signal-safe calls (prctl, getppid); it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The proxy died between the fork and the prctl: no signal will come.
                    if libc::getppid() != parent {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok(GitChild { child, pid })
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Process id (also the process group id) while it has not been reaped.
    pub fn id(&self) -> Option<u32> {
        self.pid
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.pid = None;
        Ok(status)
    }
}

impl Drop for GitChild {
    fn drop(&mut self) {
        let Some(pid) = self.pid else { return };
        // Still running (not reaped), so its pid, which is its group's id, cannot have been
        // reused: killing the group is safe.
        if matches!(self.child.try_wait(), Ok(None)) {
            let pgid = pid as libc::pid_t;
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Output of a finished git command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_trimmed(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }

    /// The last lines of stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let s = String::from_utf8_lossy(&self.stderr);
        let s = s.trim();
        let start = s.len().saturating_sub(2000);
        let start = (start..=s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len());
        s[start..].to_string()
    }
}

fn os_args<I, S>(args: I) -> Vec<std::ffi::OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect()
}

/// Runs git in `dir` with `envs`, feeding `input` to stdin; collects stdout and stderr.
/// Dropping the future kills the process group.
pub async fn run<I, S>(
    dir: &Path,
    args: I,
    envs: &[(String, String)],
    input: Option<&[u8]>,
) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = os_args(args);
    let mut cmd = Command::new("git");
    cmd.args(&args)
        .current_dir(dir)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = || {
        format!(
            "git {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default()
        )
    };
    let mut child = GitChild::spawn(&mut cmd).with_context(|| format!("starting {}", what()))?;
    let stdin = child.child_mut().stdin.take();
    let mut stdout = child.child_mut().stdout.take().expect("piped");
    let mut stderr = child.child_mut().stderr.take().expect("piped");
    let feed = async move {
        if let (Some(mut w), Some(input)) = (stdin, input) {
            // A child that exits without reading everything is reported by its status.
            let _ = w.write_all(input).await;
            let _ = w.shutdown().await;
        }
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (_, r1, r2) = tokio::join!(
        feed,
        stdout.read_to_end(&mut out),
        stderr.read_to_end(&mut err)
    );
    r1.with_context(|| format!("reading the output of {}", what()))?;
    r2.with_context(|| format!("reading the output of {}", what()))?;
    let status = child.wait().await?;
    Ok(Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// Like [`run`], but a non-zero exit is an error carrying git's stderr.
pub async fn run_ok<I, S>(
    dir: &Path,
    args: I,
    envs: &[(String, String)],
    input: Option<&[u8]>,
) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = os_args(args);
    let out = run(dir, &args, envs, input).await?;
    if !out.status.success() {
        let cmd: Vec<_> = args.iter().take(3).map(|a| a.to_string_lossy()).collect();
        anyhow::bail!(
            "git {} failed ({}): {}",
            cmd.join(" "),
            out.status,
            out.stderr_tail()
        );
    }
    Ok(out)
}

/// `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`: configuration given to one git
/// process, so the settings the mirror relies on live in code rather than in a config file
/// an operator (or an old version) may have changed.
pub fn config_env(settings: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![("GIT_CONFIG_COUNT".to_string(), settings.len().to_string())];
    for (i, (k, v)) in settings.iter().enumerate() {
        env.push((format!("GIT_CONFIG_KEY_{i}"), k.to_string()));
        env.push((format!("GIT_CONFIG_VALUE_{i}"), v.to_string()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_git_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let out = run_ok(dir.path(), ["--version"], &[], None).await.unwrap();
        assert!(out.stdout_trimmed().starts_with("git version"));
        let env = config_env(&[("cratere.test", "yes")]);
        let out = run_ok(dir.path(), ["config", "cratere.test"], &env, None)
            .await
            .unwrap();
        assert_eq!(out.stdout_trimmed(), "yes");
        let err = run_ok(dir.path(), ["no-such-command"], &[], None)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("no-such-command"), "{err:#}");
        let out = run_ok(
            dir.path(),
            ["hash-object", "--stdin"],
            &[],
            Some(b"hello\n"),
        )
        .await
        .unwrap();
        assert_eq!(
            out.stdout_trimmed(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[tokio::test]
    async fn dropping_a_child_kills_its_process_group() {
        // `sh` stands in for git: it starts a grandchild and waits.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 600 & wait"]);
        let child = GitChild::spawn(&mut cmd).unwrap();
        let pgid = child.id().unwrap();
        let members = || -> usize {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
                .filter(|stat| {
                    // Fields after the command name: state, ppid, pgrp.
                    let rest = &stat[stat.rfind(')').unwrap() + 2..];
                    let f: Vec<&str> = rest.split(' ').collect();
                    f[0] != "Z" && f[2] == pgid.to_string()
                })
                .count()
        };
        for _ in 0..400 {
            if members() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(members(), 2, "sh and sleep are running");
        drop(child);
        for _ in 0..400 {
            if members() == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("process group {pgid} still has live members");
    }
}
