//! Long polls: a request that waits for appends to the partitions it
//! reads (a consumer's fetch, a follower's fetch, an `acks=all` write
//! waiting for its high watermark), woken by each append and high
//! watermark move, and by `wake_all` (topics moved, shutdown).

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::partition::Partition;

impl Broker {
    /// A long poll's wait: what the request asks, within the broker's cap.
    pub(crate) fn fetch_wait(&self, wanted: Duration) -> Duration {
        wanted.min(Duration::from_millis(u64::from(self.config.fetch_wait_ms_max)))
    }

    /// The replicas held here of these partitions (for a long poll to wait
    /// on; the request's answer reports the others).
    pub(crate) fn held_partitions<'a>(&self, wanted: impl Iterator<Item = (&'a str, u32)>) -> Vec<Arc<Partition>> {
        let mut held: Vec<Arc<Partition>> = Vec::new();
        for (topic, partition) in wanted {
            if let Some(p) = self.topic(topic).and_then(|t| t.held(partition))
                && !held.iter().any(|h| Arc::ptr_eq(h, &p))
            {
                held.push(p);
            }
        }
        held
    }

    /// Runs `poll` now and again after every change (append, high-watermark
    /// move, role change) of `partitions` and every `wake_all`, until it
    /// answers, and a last time (`last = true`, where it must answer) once
    /// `wait` has passed.
    pub(crate) async fn poll_appends<T, P: std::ops::Deref<Target = Partition>>(
        &self,
        wait: Duration,
        partitions: &[P],
        mut poll: impl FnMut(bool) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + wait;
        let mut wake_all = self.wake_all.subscribe();
        let waiter = Arc::new(tokio::sync::Notify::new());
        loop {
            wake_all.borrow_and_update();
            for p in partitions {
                p.waiters.register(&waiter);
            }
            let last = tokio::time::Instant::now() >= deadline;
            if let Some(answer) = poll(last) {
                return answer;
            }
            if last {
                break;
            }
            tokio::select! {
                () = waiter.notified() => {}
                _ = wake_all.changed() => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        poll(true).expect("a long poll answers at its deadline")
    }
}
