//! The transactional producer: records sent between `begin` and `commit`
//! become visible to read_committed consumers all together, or (after
//! `abort`, a failure, or the transaction's timeout) never.
//!
//! `init` asks the transactional id's coordinator (the leader of its
//! partition of `__transaction_state`) for the id's producer id and a new
//! epoch, which fences every older instance of the producer: their writes
//! and commits fail with `producer_fenced`, and a transaction one of them
//! left open is aborted. A partition joins the transaction on its first
//! write (its leader checks with the coordinator). `commit` and `abort`
//! send every buffered record first, then end the transaction at the
//! coordinator, which stores the decision, gives the producer its next
//! epoch, and writes a commit or abort marker to each partition in it (the
//! next transaction's writes wait for them). A read_committed consumer sees
//! a committed transaction once its partition's marker is written.
//!
//! Errors say what the producer may do next ([`TransactionError`]):
//! fatal ones (fenced, another instance took over) mean close it; an
//! abortable one means abort the transaction and begin another.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use quiver_protocol::messages::{
    AbortTransactionRequest, AddPartitionsToTxnRequest, CoordinatorKind, DescribeTransactionRequest, EndTxnRequest,
    InitProducerIdRequest, ListTransactionsRequest, TransactionInfo, TxnOffsetCommitRequest,
};
use quiver_protocol::{ErrorCode, WireError};

use crate::connection::{CallError, Client};
use crate::delivery::DeliveryFuture;
use crate::producer::{ProduceError, Producer, ProducerConfig, ProducerRecord};

/// Pause before asking the coordinator again while a transaction ends.
const CONCURRENT_BACKOFF: Duration = Duration::from_millis(50);
/// How often [`TransactionalProducer::settled`] looks.
const SETTLE_POLL: Duration = Duration::from_millis(5);

/// Why a transactional operation failed, and what the producer may do.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    /// Another instance initialised the transactional id, or the
    /// transaction timed out and the coordinator aborted it: close this
    /// producer (nothing it sends can be written again).
    #[error("producer fenced: {0}")]
    Fenced(WireError),
    /// A record of the transaction failed, or a commit was refused: abort
    /// the transaction; a new one may begin after.
    #[error("the transaction must be aborted: {0}")]
    Abortable(String),
    /// Called out of order (e.g. `send` outside a transaction, `begin`
    /// twice, anything before `init`).
    #[error("{0}")]
    Usage(&'static str),
    /// The coordinator could not be reached or answered with an error
    /// that retrying did not clear.
    #[error("transaction coordinator: {0}")]
    Coordinator(CallError),
}

impl TransactionError {
    /// The producer can do nothing more: close it.
    pub fn is_fatal(&self) -> bool {
        match self {
            TransactionError::Fenced(_) => true,
            TransactionError::Coordinator(CallError::Broker(e)) => matches!(
                e.code,
                ErrorCode::ProducerFenced | ErrorCode::InvalidProducerIdMapping | ErrorCode::UnknownTransactionalId
            ),
            _ => false,
        }
    }
}

fn coordinator_error(e: CallError) -> TransactionError {
    match e {
        CallError::Broker(e) if e.code == ErrorCode::ProducerFenced => TransactionError::Fenced(e),
        e => TransactionError::Coordinator(e),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Before `init`, or after a fatal error.
    Uninitialised,
    Ready,
    InTransaction,
    /// Only `abort` (or closing) is possible.
    Abortable(String),
    Fenced(String),
}

/// A producer whose records are written in transactions. Not `Clone`: one
/// instance per transactional id.
pub struct TransactionalProducer {
    producer: Producer,
    client: Client,
    id: String,
    timeout: Duration,
    phase: Mutex<Phase>,
}

impl Client {
    /// A transactional producer for `transactional_id` (call
    /// [`TransactionalProducer::init`] before anything else). `config`'s
    /// acks are forced to all and idempotence on, as Kafka requires.
    pub fn transactional_producer(&self, transactional_id: &str, config: ProducerConfig) -> TransactionalProducer {
        let timeout = config.transaction_timeout;
        let config = ProducerConfig {
            acks: quiver_protocol::messages::Acks::All,
            idempotent: true,
            transactional_id: Some(transactional_id.to_owned()),
            ..config
        };
        TransactionalProducer {
            producer: Producer::new(self.clone(), config),
            client: self.clone(),
            id: transactional_id.to_owned(),
            timeout,
            phase: Mutex::new(Phase::Uninitialised),
        }
    }
}

impl TransactionalProducer {
    pub fn transactional_id(&self) -> &str {
        &self.id
    }

    /// The producer id and epoch the coordinator gave (`None` before
    /// `init`).
    pub fn producer_id_and_epoch(&self) -> Option<(i64, i16)> {
        *self.producer.shared().txn.as_ref()?.current.lock().expect("transactional identity")
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().expect("transaction phase")
    }

    /// Registers the transactional id with its coordinator: fences every
    /// older instance (aborting a transaction one left open) and takes the
    /// id's producer id and new epoch.
    pub async fn init(&self) -> Result<(), TransactionError> {
        let request = InitProducerIdRequest {
            transactional_id: Some(self.id.clone()),
            transaction_timeout_ms: self.timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        };
        let answer = self.coordinator_call(&request).await?;
        self.set_identity(answer.producer_id, answer.producer_epoch);
        *self.phase() = Phase::Ready;
        Ok(())
    }

    /// Begins a transaction: the records sent until `commit` or `abort`
    /// belong to it.
    pub fn begin(&self) -> Result<(), TransactionError> {
        let mut phase = self.phase();
        match &*phase {
            Phase::Ready => {
                *phase = Phase::InTransaction;
                Ok(())
            }
            Phase::InTransaction => Err(TransactionError::Usage("a transaction is open already")),
            Phase::Uninitialised => Err(TransactionError::Usage("call init before begin")),
            Phase::Abortable(e) => Err(TransactionError::Abortable(e.clone())),
            Phase::Fenced(e) => Err(TransactionError::Fenced(WireError::new(ErrorCode::ProducerFenced, e.clone()))),
        }
    }

    /// Queues a record in the open transaction; the returned future
    /// resolves when its partition's leader has it (still invisible to
    /// read_committed consumers until the commit).
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture, ProduceError> {
        if *self.phase() != Phase::InTransaction {
            return Err(ProduceError::Rejected(WireError::new(
                ErrorCode::InvalidTxnState,
                "send is for an open transaction: call begin first (and init before)",
            )));
        }
        self.producer.send(record).await
    }

    /// Commits a consumer group's offsets in the open transaction (Kafka's
    /// `sendOffsetsToTransaction`): they become the group's when the
    /// transaction commits, and are dropped if it aborts, so records read,
    /// processed and written in one transaction are processed once.
    /// `group` is the consumer's [`Consumer::group_metadata`](crate::Consumer::group_metadata)
    /// (group, member id, member epoch): a member fenced or rebalanced away
    /// from a partition cannot commit it. `offsets` are (topic, partition,
    /// next offset to read).
    pub async fn send_offsets(
        &self,
        offsets: &[(String, u32, i64)],
        (group, member_id, member_epoch): &(String, String, i32),
    ) -> Result<(), TransactionError> {
        if *self.phase() != Phase::InTransaction {
            return Err(TransactionError::Usage("send_offsets is for an open transaction: call begin first"));
        }
        let Some((producer_id, producer_epoch)) = self.producer_id_and_epoch() else {
            return Err(TransactionError::Usage("call init first"));
        };
        let add = AddPartitionsToTxnRequest {
            transactional_id: self.id.clone(),
            producer_id,
            producer_epoch,
            partitions: Vec::new(),
            groups: vec![group.clone()],
        };
        self.coordinator_call(&add).await.inspect_err(|e| self.failed_with(e))?;
        let commit = TxnOffsetCommitRequest {
            transactional_id: self.id.clone(),
            producer_id,
            producer_epoch,
            group: group.clone(),
            member_id: member_id.clone(),
            member_epoch: *member_epoch,
            offsets: crate::groups::to_commit(offsets.iter().cloned()),
        };
        let committed = self.client.group_call(group, &commit).await.map(drop).map_err(coordinator_error);
        committed.inspect_err(|e| self.failed_with(e))
    }

    /// A failed step of the open transaction: only an abort (or, fenced,
    /// closing) remains.
    fn failed_with(&self, e: &TransactionError) {
        *self.phase() = match e.is_fatal() {
            true => Phase::Fenced(e.to_string()),
            false => Phase::Abortable(e.to_string()),
        };
    }

    /// Sends every buffered record of the transaction, then commits it: its
    /// records become visible to read_committed consumers together. If a
    /// record failed, nothing is committed and the transaction must be
    /// aborted.
    pub async fn commit(&self) -> Result<(), TransactionError> {
        match &*self.phase() {
            Phase::InTransaction => {}
            Phase::Abortable(e) => return Err(TransactionError::Abortable(e.clone())),
            Phase::Fenced(e) => {
                return Err(TransactionError::Fenced(WireError::new(ErrorCode::ProducerFenced, e.clone())));
            }
            _ => return Err(TransactionError::Usage("no transaction is open")),
        }
        self.producer.flush().await;
        if let Some(failed) = self.take_failure() {
            let fenced = failed.contains(ErrorCode::ProducerFenced.name());
            *self.phase() = if fenced { Phase::Fenced(failed.clone()) } else { Phase::Abortable(failed.clone()) };
            return Err(match fenced {
                true => TransactionError::Fenced(WireError::new(ErrorCode::ProducerFenced, failed)),
                false => TransactionError::Abortable(failed),
            });
        }
        self.end(true).await
    }

    /// Sends what is buffered (so nothing of it is written later), then
    /// aborts the transaction: none of its records will ever be visible to
    /// read_committed consumers.
    pub async fn abort(&self) -> Result<(), TransactionError> {
        match &*self.phase() {
            Phase::InTransaction | Phase::Abortable(_) => {}
            Phase::Fenced(e) => {
                return Err(TransactionError::Fenced(WireError::new(ErrorCode::ProducerFenced, e.clone())));
            }
            _ => return Err(TransactionError::Usage("no transaction is open")),
        }
        self.producer.flush().await;
        self.take_failure();
        self.end(false).await
    }

    async fn end(&self, commit: bool) -> Result<(), TransactionError> {
        let Some((producer_id, producer_epoch)) = self.producer_id_and_epoch() else {
            return Err(TransactionError::Usage("call init first"));
        };
        let request = EndTxnRequest { transactional_id: self.id.clone(), producer_id, producer_epoch, commit };
        match self.coordinator_call(&request).await {
            Ok(answer) => {
                self.set_identity(answer.producer_id, answer.producer_epoch);
                *self.phase() = Phase::Ready;
                Ok(())
            }
            Err(e) => {
                self.failed_with(&e);
                Err(e)
            }
        }
    }

    /// Waits until the last transaction ended is complete at its
    /// coordinator: its markers are written, so read_committed consumers of
    /// each of its partitions see it (or see it aborted). `commit` and
    /// `abort` answer once the decision is stored and the markers follow
    /// within moments; this is for a process handing off to readers (a
    /// script's last commit), not for every transaction. Gives up after the
    /// request timeout.
    pub async fn settled(&self) -> Result<(), TransactionError> {
        let request = DescribeTransactionRequest { transactional_id: self.id.clone() };
        let deadline = Instant::now() + self.client.config().request_timeout;
        loop {
            let state = self.coordinator_call(&request).await?.transaction.state;
            if !state.starts_with("prepare") {
                return Ok(());
            }
            if Instant::now() + CONCURRENT_BACKOFF >= deadline {
                return Err(TransactionError::Coordinator(CallError::Broker(WireError::new(
                    ErrorCode::ConcurrentTransactions,
                    format!("'{}' is still {state}", self.id),
                ))));
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// A coordinator request, again while the coordinator moves, loads or
    /// is ending the transaction (for up to the request timeout).
    async fn coordinator_call<R: quiver_protocol::messages::Request>(
        &self,
        request: &R,
    ) -> Result<R::Response, TransactionError> {
        let deadline = Instant::now() + self.client.config().request_timeout;
        loop {
            match self.client.coordinated_call(CoordinatorKind::Transaction, &self.id, request).await {
                Err(CallError::Broker(e))
                    if e.code == ErrorCode::ConcurrentTransactions
                        && Instant::now() + CONCURRENT_BACKOFF < deadline =>
                {
                    tracing::debug!(id = %self.id, error = %e, "the coordinator is ending a transaction; asking again");
                    tokio::time::sleep(CONCURRENT_BACKOFF).await;
                }
                other => return other.map_err(coordinator_error),
            }
        }
    }

    fn set_identity(&self, producer_id: i64, epoch: i16) {
        let shared = self.producer.shared();
        let txn = shared.txn.as_ref().expect("a transactional producer has an identity");
        let before = txn.current.lock().expect("transactional identity").replace((producer_id, epoch));
        // Leaders that saw the producer id still know it in its new epoch;
        // a new id is known nowhere.
        shared.reset_sequences(before.is_some_and(|(id, _)| id == producer_id));
    }

    fn take_failure(&self) -> Option<String> {
        self.producer.shared().txn.as_ref()?.failed.lock().expect("transaction failure").take()
    }

    /// Sends what is buffered; an open transaction stays open (its
    /// coordinator aborts it at its timeout unless a new instance does
    /// first).
    pub async fn close(self) {
        self.producer.flush().await;
    }
}

impl crate::admin::Admin {
    /// Every transactional id of the cluster with its transaction: each
    /// broker lists those it coordinates. Sorted by id.
    pub async fn list_transactions(&self) -> Result<Vec<TransactionInfo>, CallError> {
        let client = self.client();
        let brokers = self.metadata(Some(Vec::new())).await?.brokers;
        let ask: Vec<Client> = match brokers.len() {
            0 | 1 => vec![client.bootstrap()],
            _ => brokers.iter().map(|b| client.peer(&b.address)).collect(),
        };
        let mut all = std::collections::BTreeMap::new();
        for broker in ask {
            for t in broker.call(&ListTransactionsRequest {}).await?.transactions {
                all.insert(t.transactional_id.clone(), t);
            }
        }
        Ok(all.into_values().collect())
    }

    /// A transactional id's state, producer id and epoch, partitions and
    /// age (`unknown_transactional_id` if there is none).
    pub async fn describe_transaction(&self, transactional_id: &str) -> Result<TransactionInfo, CallError> {
        let request = DescribeTransactionRequest { transactional_id: transactional_id.to_owned() };
        let answer = self.client().coordinated_call(CoordinatorKind::Transaction, transactional_id, &request).await?;
        Ok(answer.transaction)
    }

    /// Aborts a hanging transaction (its producer is fenced); answers once
    /// every partition has its abort marker.
    pub async fn abort_transaction(&self, transactional_id: &str) -> Result<TransactionInfo, CallError> {
        let request = AbortTransactionRequest { transactional_id: transactional_id.to_owned() };
        let answer = self.client().coordinated_call(CoordinatorKind::Transaction, transactional_id, &request).await?;
        Ok(answer.transaction)
    }
}
