//! Share groups (queue semantics, Kafka's KIP-932): members of a share
//! group read the same topics together, each record handed to one member
//! at a time under an acquisition lock, and each acknowledged on its own —
//! accepted, released (delivered again, to any member) or rejected (to the
//! dead-letter topic `<topic>-dlq`, as is a record out of delivery
//! attempts).
//!
//! ```no_run
//! # async fn run(client: quiver_client::Client) -> Result<(), quiver_client::ConsumeError> {
//! use quiver_client::{AckKind, ShareConsumerConfig};
//! let mut jobs = client.share_consumer("workers", &["jobs"], ShareConsumerConfig::default());
//! loop {
//!     for job in jobs.poll().await? {
//!         let ok = job.record.value.is_some();
//!         // Records not acknowledged are accepted by the next poll.
//!         jobs.acknowledge(&job, if ok { AckKind::Accept } else { AckKind::Reject });
//!     }
//! }
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use quiver_protocol::batch::{Batches, decode_records};
use quiver_protocol::messages::{
    SHARE_ACCEPT, SHARE_REJECT, SHARE_RELEASE, ShareAcknowledgement, ShareFetchRequest, ShareFetchResponse,
};
use quiver_protocol::{ErrorCode, WireError};

use crate::connection::{CallError, Client};
use crate::consumer::{ConsumeError, ConsumerRecord, corrupt};

/// How a share consumer fetches.
#[derive(Debug, Clone)]
pub struct ShareConsumerConfig {
    /// At most this many records per poll (500).
    pub max_records: u32,
    /// How long the coordinator may wait for records when there are none.
    pub max_wait: Duration,
    /// Bound on one poll's records in bytes (whole batches; at least one).
    pub max_bytes: u32,
}

impl Default for ShareConsumerConfig {
    fn default() -> Self {
        ShareConsumerConfig { max_records: 500, max_wait: Duration::from_millis(500), max_bytes: 4 * 1024 * 1024 }
    }
}

/// How a record is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Processed: done.
    Accept,
    /// Not processed: deliver it again, to any member (unless that was
    /// its last allowed delivery: then it is a dead letter).
    Release,
    /// Cannot be processed: to the dead-letter topic, never again.
    Reject,
}

/// A record handed to this member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRecord {
    pub record: ConsumerRecord,
    /// 1 the first time the record is delivered, more after it was
    /// released or its lock expired.
    pub delivery_count: u32,
}

/// An acknowledgement the coordinator refused: the record was not held by
/// this member any more (its lock expired and it went to another, or the
/// member was fenced). It will be, or was, delivered again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub error: WireError,
}

/// A member of a share group. Not shared between tasks: one per worker.
pub struct ShareConsumer {
    client: Client,
    group: String,
    topics: Vec<String>,
    config: ShareConsumerConfig,
    member_id: String,
    /// Records of the last poll not acknowledged yet, by partition and
    /// offset: accepted by the next poll, commit or close unless
    /// acknowledged otherwise before.
    delivered: BTreeMap<(Arc<str>, u32, i64), Option<AckKind>>,
    /// Acknowledgements refused by the coordinator, since last taken.
    refused: Vec<AckError>,
    left: bool,
}

impl Client {
    /// A member of share group `group` reading `topics` (it joins at its
    /// first poll; the group is created as a share group then).
    pub fn share_consumer(&self, group: &str, topics: &[&str], config: ShareConsumerConfig) -> ShareConsumer {
        ShareConsumer {
            client: self.clone(),
            group: group.to_owned(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            config,
            member_id: String::new(),
            delivered: BTreeMap::new(),
            refused: Vec::new(),
            left: false,
        }
    }
}

impl ShareConsumer {
    /// The id the coordinator gave this member (empty before its first
    /// poll).
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Acknowledges a record of the last poll; sent with the next poll,
    /// commit or close. A record left unacknowledged is accepted then.
    pub fn acknowledge(&mut self, record: &ShareRecord, kind: AckKind) {
        let r = &record.record;
        if let Some(ack) = self.delivered.get_mut(&(r.topic.clone(), r.partition, r.offset)) {
            *ack = Some(kind);
        }
    }

    /// Sends this member's acknowledgements, then returns the records
    /// acquired for it (empty after the wait when there are none).
    pub async fn poll(&mut self) -> Result<Vec<ShareRecord>, ConsumeError> {
        self.ensure_open()?;
        let answer = self.fetch(self.config.max_records, false).await?;
        let mut out = Vec::new();
        for p in answer.partitions {
            if p.error != ErrorCode::None {
                return Err(ConsumeError::Partition {
                    topic: p.topic,
                    partition: p.partition,
                    error: WireError::new(p.error, p.message),
                });
            }
            let topic: Arc<str> = p.topic.as_str().into();
            let count_of = |offset: i64| {
                p.acquired
                    .iter()
                    .find(|a| a.first_offset <= offset && offset <= a.last_offset)
                    .map(|a| a.delivery_count)
            };
            for batch in Batches::new(p.records.clone()) {
                let (header, bytes) = batch.map_err(|e| corrupt(&p.topic, p.partition, -1, e))?;
                let decoded =
                    decode_records(&bytes).map_err(|e| corrupt(&p.topic, p.partition, header.base_offset, e))?;
                for r in decoded {
                    let Some(delivery_count) = count_of(r.offset) else { continue };
                    self.delivered.insert((topic.clone(), p.partition, r.offset), None);
                    // A transaction marker is no record: accepted unseen.
                    if header.is_control() {
                        continue;
                    }
                    out.push(ShareRecord {
                        record: ConsumerRecord {
                            topic: topic.clone(),
                            partition: p.partition,
                            offset: r.offset,
                            timestamp_ms: r.timestamp,
                            key: r.key,
                            value: r.value,
                            headers: r.headers,
                        },
                        delivery_count,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Sends the acknowledgements now (records of the last poll not
    /// acknowledged are accepted); returns those the coordinator refused
    /// since the last call.
    pub async fn commit(&mut self) -> Result<Vec<AckError>, ConsumeError> {
        self.ensure_open()?;
        if !self.member_id.is_empty() {
            self.fetch(0, false).await?;
        }
        Ok(std::mem::take(&mut self.refused))
    }

    /// Acknowledgements refused since last taken (by [`ShareConsumer::commit`]
    /// or this).
    pub fn refused(&mut self) -> Vec<AckError> {
        std::mem::take(&mut self.refused)
    }

    /// Sends the acknowledgements and leaves the group: what it still holds
    /// goes to the other members at once.
    pub async fn close(&mut self) -> Result<(), ConsumeError> {
        if self.left {
            return Ok(());
        }
        if !self.member_id.is_empty() {
            self.fetch(0, true).await?;
        }
        self.left = true;
        Ok(())
    }

    fn ensure_open(&self) -> Result<(), ConsumeError> {
        if self.left {
            return Err(ConsumeError::Usage("the share consumer was closed".into()));
        }
        Ok(())
    }

    /// One share fetch carrying the pending acknowledgements.
    async fn fetch(&mut self, max_records: u32, leave: bool) -> Result<ShareFetchResponse, ConsumeError> {
        let acknowledgements = self.pending_acks();
        let request = ShareFetchRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            topics: self.topics.clone(),
            acknowledgements,
            max_records,
            max_wait_ms: if max_records == 0 {
                0
            } else {
                self.config.max_wait.as_millis().min(u32::MAX as u128) as u32
            },
            max_bytes: self.config.max_bytes,
            leave,
        };
        let answer = match self.client.group_call(&self.group, &request).await {
            Ok(answer) => answer,
            // Fenced (silent past its session): what it held went to the
            // others; it joins again as a new member.
            Err(CallError::Broker(e)) if e.code == ErrorCode::UnknownMember && !self.member_id.is_empty() => {
                tracing::info!(group = %self.group, member = %self.member_id, "share member fenced; joining again");
                self.member_id.clear();
                self.delivered.clear();
                return Box::pin(self.fetch(max_records, leave)).await;
            }
            Err(CallError::Broker(e)) if e.code != ErrorCode::NotAuthorized && !e.code.is_retriable() => {
                return Err(ConsumeError::Group { group: self.group.clone(), error: e });
            }
            Err(e) => return Err(e.into()),
        };
        // The acknowledgements are in: forget those records.
        self.delivered.clear();
        self.member_id = answer.member_id.clone();
        self.refused.extend(answer.acknowledgement_errors.iter().map(|e| AckError {
            topic: e.topic.clone(),
            partition: e.partition,
            offset: e.offset,
            error: WireError::new(e.error, e.message.clone()),
        }));
        Ok(answer)
    }

    /// The last poll's records as acknowledgement ranges: each record's
    /// kind (accept unless said otherwise), consecutive offsets of one kind
    /// merged.
    fn pending_acks(&self) -> Vec<ShareAcknowledgement> {
        let mut out: Vec<ShareAcknowledgement> = Vec::new();
        for ((topic, partition, offset), kind) in &self.delivered {
            let kind = match kind.unwrap_or(AckKind::Accept) {
                AckKind::Accept => SHARE_ACCEPT,
                AckKind::Release => SHARE_RELEASE,
                AckKind::Reject => SHARE_REJECT,
            };
            match out.last_mut() {
                Some(a)
                    if *a.topic == **topic
                        && a.partition == *partition
                        && a.last_offset + 1 == *offset
                        && a.kind == kind =>
                {
                    a.last_offset = *offset
                }
                _ => out.push(ShareAcknowledgement {
                    topic: topic.to_string(),
                    partition: *partition,
                    first_offset: *offset,
                    last_offset: *offset,
                    kind,
                }),
            }
        }
        out
    }
}
