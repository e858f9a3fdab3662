//! Long polls wait per partition. A fetch, a follower's fetch, an acks=all
//! write and a transform each register with the partitions they read; an
//! append, a high-watermark move or a role change there wakes those only,
//! not every long poll in the broker (Kafka's purgatory is keyed the same
//! way). Changes that concern every waiter (topics moved away, shutdown) go
//! through the broker's `wake_all` channel instead.

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

/// The waiters of one partition. Registration is one-shot: a wake empties
/// the list, and a waiter that wants the next change registers again
/// (before it looks, so that no change between its look and its wait is
/// missed: a wake before the wait leaves a permit in the `Notify`).
#[derive(Default)]
pub(crate) struct Waiters(Mutex<Vec<Weak<Notify>>>);

impl Waiters {
    pub(crate) fn register(&self, waiter: &Arc<Notify>) {
        let mut list = self.0.lock().expect("waiters lock poisoned");
        // Waiters that ended while this partition did not change.
        list.retain(|w| w.strong_count() > 0);
        if !list.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(waiter))) {
            list.push(Arc::downgrade(waiter));
        }
    }

    /// Wakes every registered waiter once.
    pub(crate) fn wake(&self) {
        let list = std::mem::take(&mut *self.0.lock().expect("waiters lock poisoned"));
        for waiter in list.iter().filter_map(Weak::upgrade) {
            waiter.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(waiter: &Arc<Notify>) -> bool {
        use std::future::Future;
        let mut notified = std::pin::pin!(waiter.notified());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        notified.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn a_wake_reaches_the_waiters_registered_before_it_once() {
        let (a, b) = (Waiters::default(), Waiters::default());
        let waiter = Arc::new(Notify::new());
        a.register(&waiter);
        a.register(&waiter);
        b.wake();
        assert!(!woken(&waiter), "a change elsewhere does not wake it");
        a.wake();
        assert!(woken(&waiter), "a wake before the wait is kept");
        assert!(!woken(&waiter), "one permit for two registrations");
        a.wake();
        assert!(!woken(&waiter), "registration is one-shot");
    }

    #[test]
    fn ended_waiters_are_dropped_at_the_next_registration() {
        let waiters = Waiters::default();
        for _ in 0..100 {
            waiters.register(&Arc::new(Notify::new()));
        }
        let kept = Arc::new(Notify::new());
        waiters.register(&kept);
        assert_eq!(waiters.0.lock().unwrap().len(), 1);
    }
}
