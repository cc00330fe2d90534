//! The wall clock, injected: usage records and cleanup decisions read time through a
//! [`Clock`] so tests can move days ahead without sleeping.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (for tests). Starts at the real time of its creation,
/// so files written by the real filesystem in a test are not in its future.
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<SystemTime>,
}

impl Default for FakeClock {
    fn default() -> Self {
        FakeClock::new()
    }
}

impl FakeClock {
    pub fn new() -> FakeClock {
        FakeClock {
            now: Mutex::new(SystemTime::now()),
        }
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().expect("lock poisoned") += by;
    }

    pub fn set(&self, to: SystemTime) {
        *self.now.lock().expect("lock poisoned") = to;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().expect("lock poisoned")
    }
}

/// `days` as a duration (for readable tests and messages).
pub fn days(days: f64) -> Duration {
    Duration::from_secs_f64(days * 86_400.0)
}
