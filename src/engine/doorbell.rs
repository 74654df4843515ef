//! The device loop's doorbell: async code rings it (a reply came, a client left or read an
//! event, a job was queued, the server is stopping) and the loop, when it has nothing ready to
//! compute, sleeps on it until a ring or its next deadline. Ringing never blocks on the loop.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// A wake-up flag with a condition variable; see the module docs.
#[derive(Debug, Default)]
pub struct Doorbell {
    rung: Mutex<bool>,
    wake: Condvar,
}

impl Doorbell {
    /// Wakes the loop (or makes its next sleep return at once). Holds the lock only to set a flag.
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_one();
    }

    /// Sleeps until a ring (one that came since the last sleep counts) or `until`; clears the ring.
    pub(crate) fn wait(&self, until: Option<Instant>) {
        let mut rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        while !*rung {
            match until {
                None => rung = self.wake.wait(rung).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let now = Instant::now();
                    if now >= at {
                        break;
                    }
                    rung = self
                        .wake
                        .wait_timeout(rung, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        *rung = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_ring_before_the_sleep_is_not_lost() {
        let bell = Doorbell::default();
        bell.ring();
        // Returns at once although the deadline is far away.
        bell.wait(Some(Instant::now() + Duration::from_secs(3600)));
    }

    #[test]
    fn a_ring_from_another_thread_wakes_the_sleeper() {
        let bell = Arc::new(Doorbell::default());
        let ringer = bell.clone();
        let t = std::thread::spawn(move || ringer.ring());
        bell.wait(None);
        t.join().unwrap();
    }

    #[test]
    fn a_sleep_ends_at_its_deadline() {
        let bell = Doorbell::default();
        bell.wait(Some(Instant::now()));
    }
}
