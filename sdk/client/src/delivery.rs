//! Delivery futures. A batch's records share one [`Outcome`]: the producer
//! settles it once when the broker answers, and each record's
//! [`DeliveryFuture`] reads its own result from it (its index in the batch
//! and its timestamp are all it keeps). So a record costs no channel and no
//! allocation of its own, and completing a batch is one store and one wake
//! per waiting task, whatever its size.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use quiver_protocol::messages::RecordPlacement;

use crate::producer::{ProduceError, RecordMetadata};

/// What the broker said about a batch it appended.
pub(crate) enum Acked {
    /// Its records got consecutive offsets from this one (-1: acks=none).
    Base(i64),
    /// `PARTITION_ANY`: where each record went, in batch order.
    Placed(Vec<RecordPlacement>),
}

/// How a batch ended.
enum Settled {
    /// Record `i` is at `base + i` of the batch's partition (-1: acks=none).
    Base(i64),
    /// Each record on its own: placed by the broker, or split here.
    Each(Vec<RecordResult>),
    Failed(ProduceError),
}

/// One record's result: where it was written, or why not.
type RecordResult = Result<RecordPlacement, ProduceError>;

/// The shared end of one batch.
struct Outcome {
    topic: Arc<str>,
    partition: u32,
    settled: OnceLock<Settled>,
    /// When a request carrying the batch was first written to a broker.
    sent: OnceLock<Instant>,
    /// Tasks waiting for it. A future keeps the index of its waker here, so
    /// polling it again replaces its waker instead of adding one.
    wakers: Mutex<Vec<Waker>>,
    /// A batch split into one batch per partition: each record's result as
    /// its part reports it, and how many parts have not reported yet.
    parts: Mutex<(Vec<Option<RecordResult>>, usize)>,
}

impl Outcome {
    fn settle(&self, settled: Settled) {
        if self.settled.set(settled).is_ok() {
            // Taken after the value is set: a future that registers later
            // sees the value under this lock (see `DeliveryFuture::poll`).
            let wakers = std::mem::take(&mut *self.wakers.lock().expect("delivery wakers"));
            for w in wakers {
                w.wake();
            }
        }
    }
}

/// Resolves when the broker acknowledged (or refused) the record.
pub struct DeliveryFuture {
    outcome: Arc<Outcome>,
    index: u32,
    timestamp_ms: i64,
    /// Where this future's waker is in `outcome.wakers`.
    registered: Option<usize>,
}

impl DeliveryFuture {
    /// Whether the answer is in: awaiting the future then returns at once.
    pub fn is_done(&self) -> bool {
        self.outcome.settled.get().is_some()
    }

    /// When the record's batch first went out to a broker, if it has: the
    /// time before it is what the record waited in the producer (linger,
    /// a full pipeline), the time after it the broker's answer.
    pub fn sent_at(&self) -> Option<Instant> {
        self.outcome.sent.get().copied()
    }

    fn result(&self, settled: &Settled) -> Result<RecordMetadata, ProduceError> {
        let metadata = |partition, offset| RecordMetadata {
            topic: self.outcome.topic.clone(),
            partition,
            offset,
            timestamp_ms: self.timestamp_ms,
        };
        match settled {
            Settled::Base(base) => {
                Ok(metadata(self.outcome.partition, if *base < 0 { -1 } else { base + i64::from(self.index) }))
            }
            Settled::Each(each) => match &each[self.index as usize] {
                Ok(p) => Ok(metadata(p.partition, p.offset)),
                Err(e) => Err(e.clone()),
            },
            Settled::Failed(e) => Err(e.clone()),
        }
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ProduceError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(settled) = this.outcome.settled.get() {
            return Poll::Ready(this.result(settled));
        }
        let mut wakers = this.outcome.wakers.lock().expect("delivery wakers");
        if let Some(settled) = this.outcome.settled.get() {
            return Poll::Ready(this.result(settled));
        }
        match this.registered {
            Some(i) if i < wakers.len() => {
                if !wakers[i].will_wake(cx.waker()) {
                    wakers[i] = cx.waker().clone();
                }
            }
            _ => {
                this.registered = Some(wakers.len());
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

/// The producer's end of a batch's outcome: settled once, by
/// [`Completer::finish`]; dropped unsettled (the producer was dropped),
/// its records fail with [`ProduceError::Closed`].
pub(crate) struct Completer {
    outcome: Arc<Outcome>,
    /// References to `outcome` made ahead for the next futures (see
    /// [`Completer::future`]); the unused ones go with the completer.
    ahead: Vec<Arc<Outcome>>,
    /// For one part of a split batch: the indices of its records in the
    /// batch the futures were given for.
    part: Option<Vec<u32>>,
    finished: bool,
}

impl Completer {
    pub(crate) fn new(topic: Arc<str>, partition: u32) -> Self {
        let outcome = Arc::new(Outcome {
            topic,
            partition,
            settled: OnceLock::new(),
            sent: OnceLock::new(),
            wakers: Mutex::new(Vec::new()),
            parts: Mutex::new((Vec::new(), 0)),
        });
        Completer::of(outcome, None)
    }

    fn of(outcome: Arc<Outcome>, part: Option<Vec<u32>>) -> Self {
        Completer { outcome, ahead: Vec::new(), part, finished: false }
    }

    /// The future of the batch's record number `index`.
    ///
    /// Futures are often awaited (and dropped) on another thread while the
    /// batch still takes records: the reference count then moves between
    /// two cores' caches. Taking one reference per record cost a cache miss
    /// per record; taking them in runs costs one per run.
    pub(crate) fn future(&mut self, index: u32, timestamp_ms: i64) -> DeliveryFuture {
        const RUN: usize = 32;
        if self.ahead.is_empty() {
            self.ahead.extend(std::iter::repeat_with(|| self.outcome.clone()).take(RUN));
        }
        let outcome = self.ahead.pop().unwrap_or_else(|| self.outcome.clone());
        DeliveryFuture { outcome, index, timestamp_ms, registered: None }
    }

    /// Splits a batch of `count` records into parts, each with the indices
    /// of its records; every record must be in exactly one part. The
    /// futures resolve once every part has finished.
    #[cfg(feature = "plugins")]
    pub(crate) fn split(mut self, count: usize, parts: Vec<Vec<u32>>) -> Vec<Completer> {
        self.finished = true;
        *self.outcome.parts.lock().expect("delivery parts") = ((0..count).map(|_| None).collect(), parts.len());
        let outcome = self.outcome.clone();
        parts.into_iter().map(|p| Completer::of(outcome.clone(), Some(p))).collect()
    }

    /// Notes that a request carrying the batch is being written (the first
    /// time counts: retries keep it).
    pub(crate) fn sent(&self, at: Instant) {
        let _ = self.outcome.sent.set(at);
    }

    /// Settles the batch (or this part of it): records of `partition`.
    pub(crate) fn finish(mut self, partition: u32, result: Result<Acked, ProduceError>) {
        self.finished = true;
        let Some(indices) = self.part.take() else {
            self.outcome.settle(match result {
                Ok(Acked::Base(base)) => Settled::Base(base),
                Ok(Acked::Placed(placements)) => Settled::Each(placements.into_iter().map(Ok).collect()),
                Err(e) => Settled::Failed(e),
            });
            return;
        };
        let mut parts = self.outcome.parts.lock().expect("delivery parts");
        let (results, left) = &mut *parts;
        for (k, &i) in indices.iter().enumerate() {
            results[i as usize] = Some(match &result {
                Ok(Acked::Base(base)) => {
                    Ok(RecordPlacement { partition, offset: if *base < 0 { -1 } else { base + k as i64 } })
                }
                Ok(Acked::Placed(placements)) => Ok(placements[k].clone()),
                Err(e) => Err(e.clone()),
            });
        }
        *left -= 1;
        if *left == 0 {
            let each = std::mem::take(results).into_iter().map(|r| r.unwrap_or(Err(ProduceError::Closed))).collect();
            drop(parts);
            self.outcome.settle(Settled::Each(each));
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if !self.finished {
            let partition = self.outcome.partition;
            let unfinished = Completer::of(self.outcome.clone(), self.part.take());
            self.finished = true;
            unfinished.finish(partition, Err(ProduceError::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(f: &mut DeliveryFuture) -> Option<Result<RecordMetadata, ProduceError>> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(f).poll(&mut cx) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    #[test]
    fn records_of_a_batch_get_consecutive_offsets() {
        let mut completer = Completer::new(Arc::from("t"), 3);
        let mut futures: Vec<_> = (0..3).map(|i| completer.future(i, 100 + i64::from(i))).collect();
        assert!(ready(&mut futures[0]).is_none(), "pending until the batch is answered");
        completer.finish(3, Ok(Acked::Base(40)));
        for (i, f) in futures.iter_mut().enumerate() {
            let m = ready(f).expect("settled").expect("acknowledged");
            assert_eq!((m.partition, m.offset, m.timestamp_ms), (3, 40 + i as i64, 100 + i as i64));
        }
    }

    #[test]
    fn a_dropped_batch_fails_its_records_as_closed() {
        let mut completer = Completer::new(Arc::from("t"), 0);
        let mut f = completer.future(0, 0);
        drop(completer);
        assert!(matches!(ready(&mut f), Some(Err(ProduceError::Closed))));
    }

    #[test]
    fn a_waiting_task_is_woken_once_per_poll_site() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut completer = Completer::new(Arc::from("t"), 0);
        let mut f = completer.future(0, 0);
        for _ in 0..5 {
            assert!(Pin::new(&mut f).poll(&mut Context::from_waker(&waker)).is_pending());
        }
        assert_eq!(completer.outcome.wakers.lock().unwrap().len(), 1, "polling again replaces the waker");
        completer.finish(0, Err(ProduceError::Closed));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[cfg(feature = "plugins")]
    #[test]
    fn a_split_batch_settles_when_every_part_has() {
        let mut completer = Completer::new(Arc::from("t"), quiver_protocol::messages::PARTITION_ANY);
        let mut futures: Vec<_> = (0..4).map(|i| completer.future(i, 0)).collect();
        let mut parts = completer.split(4, vec![vec![0, 2], vec![1, 3]]).into_iter();
        let (first, second) = (parts.next().unwrap(), parts.next().unwrap());
        first.finish(5, Ok(Acked::Base(10)));
        assert!(ready(&mut futures[0]).is_none(), "one part is still out");
        let refused =
            ProduceError::Rejected(quiver_protocol::WireError::new(quiver_protocol::ErrorCode::CorruptMessage, "no"));
        second.finish(7, Err(refused));
        let got: Vec<_> =
            futures.iter_mut().map(|f| ready(f).expect("settled").ok().map(|m| (m.partition, m.offset))).collect();
        assert_eq!(got, vec![Some((5, 10)), None, Some((5, 11)), None]);
    }
}
