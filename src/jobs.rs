//! Scheduled background jobs: a typed cron schedule and one helper that runs a job on it
//! until shutdown. Jobs are plain async functions (`run_once`-style) so tests call them
//! directly; this module only decides *when* they run.

use std::future::Future;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A cron schedule: standard 5-field (`min hour dom mon dow`) or 6-field with leading
/// seconds (`sec min hour dom mon dow`), evaluated in UTC.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    text: String,
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Schedule, String> {
        let fields = s.split_whitespace().count();
        if !(fields == 5 || fields == 6 || s.trim_start().starts_with('@')) {
            return Err(format!(
                "expected 5 cron fields (min hour dom mon dow) or 6 with leading seconds, got {fields}"
            ));
        }
        let cron =
            croner::Cron::from_str(s).map_err(|e| format!("invalid cron expression: {e}"))?;
        Ok(Schedule {
            cron,
            text: s.to_string(),
        })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Schedule {
    /// The first time strictly after `t` that the schedule fires.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }
}

/// When a scheduled job first runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRun {
    /// At once, then on the schedule (e.g. the first index sync).
    Immediately,
    /// Only on the schedule.
    OnSchedule,
}

/// Runs `job` on `schedule` in a task of `tracker` until `shutdown` is cancelled. Runs never
/// overlap: the next time is computed after a run ends, and fire times missed while a run was
/// going on are skipped. A failed run is logged; the schedule goes on.
pub fn spawn_scheduled<F, Fut>(
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    name: &'static str,
    schedule: Schedule,
    first: FirstRun,
    mut job: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tracker.spawn(async move {
        let mut run_now = first == FirstRun::Immediately;
        loop {
            if !run_now {
                let Some(next) = schedule.next_after(Utc::now()) else {
                    tracing::warn!(job = name, %schedule, "schedule never fires again");
                    return;
                };
                let wait = (next - Utc::now()).to_std().unwrap_or_default();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            run_now = false;
            if shutdown.is_cancelled() {
                return;
            }
            tracing::debug!(job = name, "job starting");
            match job().await {
                Ok(()) => tracing::debug!(job = name, "job finished"),
                Err(e) => tracing::warn!(job = name, error = format!("{e:#}"), "job failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_and_six_field_schedules() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 30).unwrap();
        let s: Schedule = "*/5 * * * *".parse().unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 1, 10, 5, 0).unwrap()
        );
        let s: Schedule = "*/10 * * * * *".parse().unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 40).unwrap()
        );
        let s: Schedule = "0 3 * * *".parse().unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 2, 3, 0, 0).unwrap()
        );
    }

    #[test]
    fn bad_schedules_are_refused() {
        for bad in [
            "",
            "* * *",
            "61 * * * *",
            "* * * * * * * *",
            "every minute",
            "*/0 * * * *",
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scheduled_jobs_run_and_stop_on_shutdown() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        spawn_scheduled(
            &tracker,
            token.clone(),
            "test",
            "0 0 1 1 *".parse().unwrap(), // yearly: only the immediate run happens here
            FirstRun::Immediately,
            move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        );
        tracker.close();
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        token.cancel();
        tracker.wait().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
