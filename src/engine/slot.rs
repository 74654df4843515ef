//! Admission: a semaphore of live-plus-queued slots, queue positions, the registry of live
//! generations (for shutdown), and each generation's slot, which a client leaving the queue
//! frees at once, before the device loop ever sees the job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::doorbell::Doorbell;
use super::EngineError;
use crate::metrics::Metrics;

/// Why a generation was told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The client went away.
    ClientGone,
    /// The server is shutting down.
    Shutdown,
}

impl StopReason {
    /// The error a generation stopped for this reason ends with.
    pub fn error(self) -> EngineError {
        match self {
            StopReason::ClientGone => EngineError::Cancelled,
            StopReason::Shutdown => EngineError::Unavailable(
                "the server is shutting down; the generation was stopped".into(),
            ),
        }
    }
}

/// A stop flag shared by a session, its job and the engine's registry.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicU8>);

impl CancelFlag {
    /// Marks the job cancelled by its client (unless already stopped).
    pub fn cancel(&self) {
        let _ = self
            .0
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
    }
    /// Marks the job stopped by a server shutdown (unless already stopped).
    pub fn shutdown(&self) {
        let _ = self
            .0
            .compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst);
    }
    /// Why it was stopped, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopReason::ClientGone),
            2 => Some(StopReason::Shutdown),
            _ => None,
        }
    }
    /// Whether it was stopped for any reason.
    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }
}

/// Shared admission state of one device.
#[derive(Debug)]
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    max_sessions: usize,
    waiting: AtomicUsize,
    running: AtomicUsize,
    draining: AtomicBool,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, CancelFlag>>,
    metrics: Arc<Metrics>,
    doorbell: Arc<Doorbell>,
}

impl Admission {
    /// `max_sessions + max_queue` slots: up to `max_sessions` live on the device, the rest queued.
    pub(crate) fn new(
        max_sessions: usize,
        max_queue: usize,
        metrics: Arc<Metrics>,
        doorbell: Arc<Doorbell>,
    ) -> Arc<Admission> {
        let max_sessions = max_sessions.max(1);
        let capacity = max_sessions + max_queue;
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            max_sessions,
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            metrics,
            doorbell,
        })
    }

    /// Takes a slot or fails at once; returns it with its queue position: how many generations
    /// must start or leave before it can go live (0: it goes live at once).
    pub(crate) fn admit(self: &Arc<Self>) -> Result<(Arc<Slot>, usize), EngineError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(EngineError::Unavailable(
                "the server is shutting down and admits no new generations".into(),
            ));
        }
        let permit =
            self.slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| EngineError::QueueFull {
                    capacity: self.capacity,
                })?;
        let occupied =
            self.waiting.fetch_add(1, Ordering::SeqCst) + self.running.load(Ordering::SeqCst);
        // With room for S live sessions, the (S+1)-th occupant waits for one of them.
        let ahead = (occupied + 1).saturating_sub(self.max_sessions);
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancelFlag::default();
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, cancel.clone());
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::Queued(permit)),
            admission: self.clone(),
            id,
            cancel,
        });
        Ok((slot, ahead))
    }

    /// Stops admitting new generations.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Generations running or waiting.
    pub(crate) fn active(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Tells every live generation to stop because the server is going away.
    pub(crate) fn abort_all(&self) {
        for flag in self.live.lock().unwrap_or_else(|e| e.into_inner()).values() {
            flag.shutdown();
        }
        self.doorbell.ring();
    }

    /// Free slots right now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.slots.available_permits()
    }

    fn left_queue(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum SlotState {
    Queued(OwnedSemaphorePermit),
    /// Holds the permit until the worker is done.
    Running(#[allow(dead_code)] OwnedSemaphorePermit),
    Released,
}

/// One admitted generation's place: queued, running, or released.
#[derive(Debug)]
pub struct Slot {
    state: Mutex<SlotState>,
    admission: Arc<Admission>,
    id: u64,
    cancel: CancelFlag,
}

impl Slot {
    /// The generation's stop flag.
    pub fn cancel_flag(&self) -> &CancelFlag {
        &self.cancel
    }

    /// The client left: stop the generation; a queued one gives its slot back at once. Rings
    /// the device loop so that a live session's rows leave at the next tick, and a queued one
    /// is answered (its stream ends CANCELLED) without waiting for its turn.
    pub fn leave(&self) {
        self.cancel.cancel();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            SlotState::Queued(_) => {
                *state = SlotState::Released;
                self.admission.left_queue();
                self.admission.doorbell.ring();
            }
            SlotState::Running(_) => self.admission.doorbell.ring(),
            SlotState::Released => {}
        }
    }

    /// The device loop takes the job live: false when it was released (or stopped) while queued.
    pub(crate) fn start(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *state, SlotState::Released) {
            SlotState::Queued(permit) => {
                self.admission.left_queue();
                if self.cancel.is_cancelled() {
                    return false;
                }
                self.admission.running.fetch_add(1, Ordering::SeqCst);
                *state = SlotState::Running(permit);
                true
            }
            other => {
                *state = other;
                false
            }
        }
    }

    /// The device is done with the job: its slot is free again.
    pub(crate) fn finish(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let SlotState::Running(_) = std::mem::replace(&mut *state, SlotState::Released) {
            self.admission.running.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.leave();
        self.finish();
        self.admission
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_client_that_leaves_frees_its_slot_at_once() {
        let a = Admission::new(1, 1, Metrics::new(), Default::default());
        let (first, ahead) = a.admit().unwrap();
        assert_eq!(ahead, 0);
        assert!(first.start());
        let (second, ahead) = a.admit().unwrap();
        assert_eq!(ahead, 1);
        assert!(matches!(
            a.admit(),
            Err(EngineError::QueueFull { capacity: 2 })
        ));
        second.leave();
        assert_eq!(
            a.free(),
            1,
            "the queued slot is free before the worker sees it"
        );
        assert!(!second.start(), "the worker skips it");
        first.finish();
        assert_eq!(a.free(), 2);
        drop((first, second));
        assert_eq!(a.active(), 0);
    }

    #[test]
    fn queue_positions_count_from_the_last_live_place() {
        let a = Admission::new(2, 2, Metrics::new(), Default::default());
        let (first, ahead) = a.admit().unwrap();
        assert_eq!(ahead, 0);
        assert!(first.start());
        let (second, ahead) = a.admit().unwrap();
        assert_eq!(ahead, 0, "a second live place is free");
        let (third, ahead) = a.admit().unwrap();
        assert_eq!(ahead, 1, "waits for one of the two live sessions");
        let (_fourth, ahead) = a.admit().unwrap();
        assert_eq!(ahead, 2);
        assert!(matches!(
            a.admit(),
            Err(EngineError::QueueFull { capacity: 4 })
        ));
        assert!(second.start() && third.start());
    }

    #[test]
    fn draining_refuses_new_work_and_abort_stops_live_work() {
        let a = Admission::new(1, 4, Metrics::new(), Default::default());
        let (slot, _) = a.admit().unwrap();
        a.begin_drain();
        assert!(matches!(a.admit(), Err(EngineError::Unavailable(_))));
        a.abort_all();
        assert_eq!(slot.cancel_flag().reason(), Some(StopReason::Shutdown));
        // A client leaving after a shutdown keeps the shutdown reason.
        slot.leave();
        assert_eq!(slot.cancel_flag().reason(), Some(StopReason::Shutdown));
    }
}
