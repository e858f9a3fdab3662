//! Transaction coordination in the manner of Kafka's KIP-98, with the
//! KIP-890 defences from the start, as plain types: no I/O, no clock —
//! time is passed in (`now_ms`), so every rule is tested on a virtual
//! clock. The broker that leads a transactional id's partition of
//! `__transaction_state` feeds it the producer's requests, persists what it
//! decides (one [`Transaction`] record per change, keyed by the id) before
//! answering, writes the commit or abort markers it asks for, and tells it
//! when they are written.
//!
//! A transactional id maps to a producer id and an epoch. `init` bumps the
//! epoch, which fences every older instance of the producer: their writes,
//! their partition additions and their end-transaction requests are refused
//! as [`TxnError::ProducerFenced`]. The epoch is bumped again at every
//! transaction end (KIP-890), and the markers carry the bumped epoch, so a
//! late write or a late end from a finished transaction can never join or
//! end the next one.
//!
//! States: `Empty` → (first partition) `Ongoing` → `PrepareCommit` /
//! `PrepareAbort` (markers being written) → `CompleteCommit` /
//! `CompleteAbort` → (next partition) `Ongoing` ... An `Ongoing`
//! transaction past its timeout is aborted by the coordinator; a
//! coordinator that takes over finishes the `Prepare*` ones it finds
//! ([`Coordinator::pending`]).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub mod partition;

/// (topic, partition)
pub type TopicPartition = (String, u32);

/// Partitions of `__transaction_state` (Kafka's
/// `transaction.state.log.num.partitions`).
pub const STATE_PARTITIONS: u32 = 50;

/// The largest epoch a producer uses; the markers that end a transaction
/// carry one more, so past it the coordinator hands out a new producer id
/// at epoch 0.
pub const EPOCH_MAX: i16 = i16::MAX - 1;

/// The partition of `__transaction_state` that holds `transactional_id`:
/// Java's `String.hashCode` modulo `partitions`, as Kafka places it.
pub fn state_partition(transactional_id: &str, partitions: u32) -> u32 {
    let hash = transactional_id.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)));
    hash.unsigned_abs() % partitions.max(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    /// Initialised, no transaction begun (or none since the last end).
    Empty,
    /// A transaction has partitions (or offsets) in it.
    Ongoing,
    /// Commit decided; markers are being written.
    PrepareCommit,
    /// Abort decided (asked, timed out, or a new instance): markers are
    /// being written.
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnState {
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "empty",
            TxnState::Ongoing => "ongoing",
            TxnState::PrepareCommit => "prepare-commit",
            TxnState::PrepareAbort => "prepare-abort",
            TxnState::CompleteCommit => "complete-commit",
            TxnState::CompleteAbort => "complete-abort",
        }
    }

    fn preparing(self) -> bool {
        matches!(self, TxnState::PrepareCommit | TxnState::PrepareAbort)
    }

    fn idle(self) -> bool {
        matches!(self, TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort)
    }
}

/// Everything the coordinator knows of one transactional id: what one
/// record of `__transaction_state` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub transactional_id: String,
    pub producer_id: i64,
    /// The epoch the producer uses now.
    pub producer_epoch: i16,
    /// The producer id and epoch the current (or last) transaction was
    /// written with, before its end bumped them: its markers carry
    /// `last_epoch + 1`, and a retried end from them is recognised.
    pub last_producer_id: i64,
    pub last_epoch: i16,
    /// The last end was the coordinator's (a timeout, or a new instance's
    /// init), not the producer's: a request from `last_epoch` is fenced,
    /// not a retry.
    #[serde(default)]
    pub ended_by_coordinator: bool,
    pub timeout_ms: u64,
    pub state: TxnState,
    /// Partitions written in the transaction (cleared when a new one
    /// begins; kept through `Prepare*` and `Complete*` for the markers and
    /// for describing).
    pub partitions: BTreeSet<TopicPartition>,
    /// Consumer groups whose offsets are committed in the transaction.
    pub groups: BTreeSet<String>,
    /// When the current transaction began (its first partition or group).
    pub started_ms: u64,
    pub updated_ms: u64,
}

impl Transaction {
    /// The record value (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a transaction serialises")
    }

    pub fn decode(value: &[u8]) -> Result<Transaction, String> {
        serde_json::from_slice(value).map_err(|e| format!("a transaction record: {e}"))
    }

    fn commit_kind(&self) -> Option<bool> {
        match self.state {
            TxnState::PrepareCommit | TxnState::CompleteCommit => Some(true),
            TxnState::PrepareAbort | TxnState::CompleteAbort => Some(false),
            _ => None,
        }
    }
}

/// Why a request was refused. [`TxnError::is_fatal`] says which end the
/// producer (it must close) and which it may retry or abort past.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    #[error(
        "producer fenced: epoch {epoch} of producer {producer_id} is older than {current} (another instance initialised the transactional id, or the transaction timed out)"
    )]
    ProducerFenced { producer_id: i64, epoch: i16, current: i16 },
    #[error("transactional id '{0}' is not initialised (or expired): call init_transactions")]
    Unknown(String),
    #[error("transactional id '{id}' belongs to producer {owner}, not {producer_id}")]
    WrongProducer { id: String, producer_id: i64, owner: i64 },
    #[error("a transaction of '{0}' is ending (markers being written); retry")]
    Concurrent(String),
    #[error("cannot {operation} in state {state}", state = state.name())]
    InvalidState { state: TxnState, operation: &'static str },
    #[error("transaction timeout {asked} ms is out of range (1..={max} ms, transaction_max_timeout_ms)")]
    InvalidTimeout { asked: u64, max: u64 },
}

impl TxnError {
    /// A fenced producer must close: nothing it sends can succeed again.
    pub fn is_fatal(&self) -> bool {
        matches!(self, TxnError::ProducerFenced { .. } | TxnError::WrongProducer { .. } | TxnError::Unknown(_))
    }

    /// Worth sending again unchanged, after a moment.
    pub fn is_retriable(&self) -> bool {
        matches!(self, TxnError::Concurrent(_))
    }
}

/// Markers to write to end a transaction: on every partition in it (and
/// the offsets of every group in it), with the bumped epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markers {
    pub transactional_id: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub commit: bool,
    pub partitions: Vec<TopicPartition>,
    pub groups: Vec<String>,
}

/// What `init` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    /// Persist it, then answer its producer id and epoch.
    Ready(Transaction),
    /// An earlier instance's transaction was open: it is aborted first.
    /// Persist, write the markers, [`Coordinator::complete`]; answer
    /// [`TxnError::Concurrent`] meanwhile (the producer retries its init).
    AbortFirst(Transaction, Markers),
}

/// What `end` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Persist, write the markers, then [`Coordinator::complete`] and
    /// answer with the transaction's new producer id and epoch.
    Prepare(Transaction, Markers),
    /// Nothing was written in the transaction: persist and answer; no
    /// markers.
    Empty(Transaction),
    /// A retry of an end already complete: answer success again.
    AlreadyDone { producer_id: i64, producer_epoch: i16 },
}

/// Limits of transactions (broker configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnConfig {
    /// The largest `transaction.timeout.ms` a producer may ask for
    /// (Kafka's `transaction.max.timeout.ms`, 15 minutes).
    pub timeout_max_ms: u64,
    /// An idle transactional id is forgotten after this long (Kafka's
    /// `transactional.id.expiration.ms`, 7 days).
    pub id_expiration_ms: u64,
}

impl Default for TxnConfig {
    fn default() -> Self {
        TxnConfig { timeout_max_ms: 15 * 60_000, id_expiration_ms: 7 * 24 * 3_600_000 }
    }
}

/// The transactions of the `__transaction_state` partitions a broker leads.
/// Decisions are computed from `&self`; the caller persists what they
/// return and [`apply`](Coordinator::apply)s it, so nothing is answered
/// that is not stored.
#[derive(Debug, Default)]
pub struct Coordinator {
    config: TxnConfig,
    txns: BTreeMap<String, Transaction>,
}

impl Coordinator {
    pub fn new(config: TxnConfig) -> Self {
        Coordinator { config, txns: BTreeMap::new() }
    }

    /// A persisted record, read back (or a decision, once stored).
    pub fn apply(&mut self, t: Transaction) {
        self.txns.insert(t.transactional_id.clone(), t);
    }

    /// A tombstone: the id expired.
    pub fn remove(&mut self, transactional_id: &str) {
        self.txns.remove(transactional_id);
    }

    pub fn get(&self, transactional_id: &str) -> Option<&Transaction> {
        self.txns.get(transactional_id)
    }

    pub fn transactions(&self) -> impl Iterator<Item = &Transaction> {
        self.txns.values()
    }

    /// `init_transactions`: a producer id and a new epoch for the id, which
    /// fences every earlier instance. `fresh_id` hands out an unused
    /// producer id (for a new id, or when the epoch is exhausted).
    pub fn init(
        &self,
        transactional_id: &str,
        timeout_ms: u64,
        now_ms: u64,
        fresh_id: &mut dyn FnMut() -> i64,
    ) -> Result<Init, TxnError> {
        if timeout_ms == 0 || timeout_ms > self.config.timeout_max_ms {
            return Err(TxnError::InvalidTimeout { asked: timeout_ms, max: self.config.timeout_max_ms });
        }
        let Some(current) = self.txns.get(transactional_id) else {
            let producer_id = fresh_id();
            return Ok(Init::Ready(Transaction {
                transactional_id: transactional_id.to_owned(),
                producer_id,
                producer_epoch: 0,
                last_producer_id: producer_id,
                last_epoch: -1,
                ended_by_coordinator: false,
                timeout_ms,
                state: TxnState::Empty,
                partitions: BTreeSet::new(),
                groups: BTreeSet::new(),
                started_ms: now_ms,
                updated_ms: now_ms,
            }));
        };
        match current.state {
            s if s.preparing() => Err(TxnError::Concurrent(transactional_id.to_owned())),
            TxnState::Ongoing => {
                let (t, markers) = prepare(current, false, true, now_ms, fresh_id);
                Ok(Init::AbortFirst(t, markers))
            }
            _ => {
                let mut t = current.clone();
                bump(&mut t, fresh_id);
                t.state = TxnState::Empty;
                t.timeout_ms = timeout_ms;
                t.partitions.clear();
                t.groups.clear();
                t.updated_ms = now_ms;
                Ok(Init::Ready(t))
            }
        }
    }

    /// Checks that `producer_id` at `epoch` owns the id now.
    fn owned(&self, transactional_id: &str, producer_id: i64, epoch: i16) -> Result<&Transaction, TxnError> {
        let t = self.txns.get(transactional_id).ok_or_else(|| TxnError::Unknown(transactional_id.to_owned()))?;
        if t.producer_id != producer_id {
            return Err(TxnError::WrongProducer { id: transactional_id.to_owned(), producer_id, owner: t.producer_id });
        }
        if epoch != t.producer_epoch {
            return Err(TxnError::ProducerFenced { producer_id, epoch, current: t.producer_epoch });
        }
        Ok(t)
    }

    /// Partitions (and groups' offsets) join the transaction; the first
    /// begins it. `None`: they were all in it already (nothing to store).
    pub fn add(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[TopicPartition],
        groups: &[String],
        now_ms: u64,
    ) -> Result<Option<Transaction>, TxnError> {
        let current = self.owned(transactional_id, producer_id, epoch)?;
        if current.state.preparing() {
            return Err(TxnError::Concurrent(transactional_id.to_owned()));
        }
        let mut t = current.clone();
        if t.state.idle() {
            t.state = TxnState::Ongoing;
            t.partitions.clear();
            t.groups.clear();
            t.started_ms = now_ms;
        }
        t.partitions.extend(partitions.iter().cloned());
        t.groups.extend(groups.iter().cloned());
        if t == *current {
            return Ok(None);
        }
        t.updated_ms = now_ms;
        Ok(Some(t))
    }

    /// Whether `producer_id` at `epoch` may write to `partition` in its
    /// transaction now (a partition leader's check before a transactional
    /// append, KIP-890 part 1): the partition was added and the
    /// transaction is still open.
    pub fn verify(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        partition: &TopicPartition,
    ) -> Result<(), TxnError> {
        let t = self.owned(transactional_id, producer_id, epoch)?;
        match t.state {
            TxnState::Ongoing if t.partitions.contains(partition) => Ok(()),
            state => Err(TxnError::InvalidState { state, operation: "write a partition not added to the transaction" }),
        }
    }

    /// `commit` or abort. The epoch is bumped: the markers and every later
    /// transaction use the new one.
    pub fn end(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        now_ms: u64,
        fresh_id: &mut dyn FnMut() -> i64,
    ) -> Result<End, TxnError> {
        let t = self.txns.get(transactional_id).ok_or_else(|| TxnError::Unknown(transactional_id.to_owned()))?;
        // A retry of the end that bumped the epoch (its answer was lost):
        // the same end again is answered as it was, another is refused.
        let retried = (producer_id, epoch) == (t.last_producer_id, t.last_epoch)
            && (producer_id, epoch) != (t.producer_id, t.producer_epoch)
            && !t.ended_by_coordinator;
        if retried && t.commit_kind().is_some() {
            if t.commit_kind() != Some(commit) {
                return Err(TxnError::InvalidState {
                    state: t.state,
                    operation: if commit { "commit" } else { "abort" },
                });
            }
            if t.state.preparing() {
                return Err(TxnError::Concurrent(transactional_id.to_owned()));
            }
            return Ok(End::AlreadyDone { producer_id: t.producer_id, producer_epoch: t.producer_epoch });
        }
        let t = self.owned(transactional_id, producer_id, epoch)?;
        match t.state {
            TxnState::Ongoing => {
                let (t, markers) = prepare(t, commit, false, now_ms, fresh_id);
                Ok(End::Prepare(t, markers))
            }
            s if s.preparing() => Err(TxnError::Concurrent(transactional_id.to_owned())),
            _ => {
                // Nothing written since the last end: no markers, but the
                // epoch moves on all the same.
                let mut t = t.clone();
                bump(&mut t, fresh_id);
                t.ended_by_coordinator = false;
                t.state = if commit { TxnState::CompleteCommit } else { TxnState::CompleteAbort };
                t.partitions.clear();
                t.groups.clear();
                t.updated_ms = now_ms;
                Ok(End::Empty(t))
            }
        }
    }

    /// The markers of a `Prepare*` transaction are written: it is complete.
    /// `None` if it is not (or no longer) preparing.
    pub fn complete(&self, transactional_id: &str, now_ms: u64) -> Option<Transaction> {
        let t = self.txns.get(transactional_id)?;
        let state = match t.state {
            TxnState::PrepareCommit => TxnState::CompleteCommit,
            TxnState::PrepareAbort => TxnState::CompleteAbort,
            _ => return None,
        };
        Some(Transaction { state, updated_ms: now_ms, ..t.clone() })
    }

    /// Open transactions past their timeout, each aborted (epoch bumped:
    /// the producer that abandoned it is fenced).
    pub fn timed_out(&self, now_ms: u64, fresh_id: &mut dyn FnMut() -> i64) -> Vec<(Transaction, Markers)> {
        self.txns
            .values()
            .filter(|t| t.state == TxnState::Ongoing && now_ms.saturating_sub(t.started_ms) > t.timeout_ms)
            .map(|t| prepare(t, false, true, now_ms, fresh_id))
            .collect()
    }

    /// An operator's abort of a hanging transaction: an open one is aborted
    /// as at its timeout (its producer fenced); one already ending gives
    /// the markers still to write.
    pub fn force_abort(
        &self,
        transactional_id: &str,
        now_ms: u64,
        fresh_id: &mut dyn FnMut() -> i64,
    ) -> Result<(Option<Transaction>, Markers), TxnError> {
        let t = self.txns.get(transactional_id).ok_or_else(|| TxnError::Unknown(transactional_id.to_owned()))?;
        match t.state {
            TxnState::Ongoing => {
                let (t, m) = prepare(t, false, true, now_ms, fresh_id);
                Ok((Some(t), m))
            }
            s if s.preparing() => Ok((None, markers(t))),
            state => Err(TxnError::InvalidState { state, operation: "abort: no transaction is open" }),
        }
    }

    /// Markers still to write: every transaction `Prepare*` for at least
    /// `min_age_ms` at `now_ms` (after a coordinator takes over, the ones
    /// its predecessor left half done; a fresh one is its end's to finish).
    pub fn pending(&self, now_ms: u64, min_age_ms: u64) -> Vec<Markers> {
        let stuck = |t: &&Transaction| t.state.preparing() && now_ms.saturating_sub(t.updated_ms) >= min_age_ms;
        self.txns.values().filter(stuck).map(markers).collect()
    }

    /// Whether `markers` are still to be written: their transaction is
    /// still `Prepare*` in their epoch. Markers taken earlier (a takeover's
    /// list, a retry) must not be written once it completed: the
    /// producer's next transaction, of the same epoch, may have data in
    /// their partitions by then, and a late marker would end it.
    pub fn awaits_markers(&self, m: &Markers) -> bool {
        self.txns.get(&m.transactional_id).is_some_and(|t| t.state.preparing() && markers(t) == *m)
    }

    /// Idle ids not used for `id_expiration_ms`: tombstone them.
    pub fn expired_ids(&self, now_ms: u64) -> Vec<String> {
        self.txns
            .values()
            .filter(|t| t.state.idle() && now_ms.saturating_sub(t.updated_ms) > self.config.id_expiration_ms)
            .map(|t| t.transactional_id.clone())
            .collect()
    }
}

/// Moves `t` to the next epoch (a new producer id at epoch 0 once the
/// epochs are used up), remembering the one it leaves.
fn bump(t: &mut Transaction, fresh_id: &mut dyn FnMut() -> i64) {
    (t.last_producer_id, t.last_epoch) = (t.producer_id, t.producer_epoch);
    if t.producer_epoch >= EPOCH_MAX {
        t.producer_id = fresh_id();
        t.producer_epoch = 0;
    } else {
        t.producer_epoch += 1;
    }
}

/// An open transaction decided: `Prepare*`, epoch bumped, its markers.
fn prepare(
    current: &Transaction,
    commit: bool,
    by_coordinator: bool,
    now_ms: u64,
    fresh_id: &mut dyn FnMut() -> i64,
) -> (Transaction, Markers) {
    let mut t = current.clone();
    bump(&mut t, fresh_id);
    t.ended_by_coordinator = by_coordinator;
    t.state = if commit { TxnState::PrepareCommit } else { TxnState::PrepareAbort };
    t.updated_ms = now_ms;
    let m = markers(&t);
    (t, m)
}

/// The markers of a decided transaction: with the producer id it was
/// written with and one epoch more (fencing every write of that epoch).
fn markers(t: &Transaction) -> Markers {
    Markers {
        transactional_id: t.transactional_id.clone(),
        producer_id: t.last_producer_id,
        producer_epoch: t.last_epoch + 1,
        commit: matches!(t.state, TxnState::PrepareCommit | TxnState::CompleteCommit),
        partitions: t.partitions.iter().cloned().collect(),
        groups: t.groups.iter().cloned().collect(),
    }
}
