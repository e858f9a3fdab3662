//! Reads: long-polled reads of partitions this broker leads, up to their
//! high watermarks, through an optional filter and the topics' value
//! decoders; and offset lookups. Log reads run on blocking threads, never
//! on the runtime's.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch;
use quiver_protocol::messages::{OFFSET_EARLIEST, OFFSET_LAST_STABLE, OFFSET_LATEST};

use crate::broker::Broker;
use crate::errors::{FetchError, ListOffsetsError, PluginCallError, blocking_as};
use crate::partition::RemoteLeader;
use crate::registry::{BatchMode, serializers};

/// One partition to read from.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) offset: i64,
    /// At most this much from this partition (at least one whole batch).
    pub(crate) max_bytes: u32,
}

/// How a read waits and what it returns.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadOptions {
    /// How long to wait for `min_bytes` (capped by the broker's
    /// `fetch_wait_ms_max`).
    pub(crate) max_wait: Duration,
    pub(crate) min_bytes: u32,
    /// At most this much in all.
    pub(crate) max_bytes: u32,
    /// A filter plugin and its parameters, run over every batch.
    pub(crate) filter: Option<(String, Vec<(String, String)>)>,
    /// Run the topics' value (and key) decoders too.
    pub(crate) decode_values: bool,
    /// Only up to each partition's last stable offset, with the aborted
    /// transactions in the range named.
    pub(crate) read_committed: bool,
}

/// What one partition answered.
#[derive(Debug)]
pub(crate) struct PartitionRead {
    /// `-1` when the partition could not be looked up.
    pub(crate) high_watermark: i64,
    pub(crate) log_start_offset: i64,
    /// `-1` when the partition could not be looked up.
    pub(crate) last_stable_offset: i64,
    /// read_committed: the aborted transactions with data in the range
    /// read, as (producer id, first offset).
    pub(crate) aborted: Vec<(i64, i64)>,
    pub(crate) records: Result<Bytes, FetchError>,
}

impl PartitionRead {
    fn failed(e: FetchError) -> PartitionRead {
        PartitionRead {
            high_watermark: -1,
            log_start_offset: -1,
            last_stable_offset: -1,
            aborted: Vec::new(),
            records: Err(e),
        }
    }

    fn empty() -> PartitionRead {
        PartitionRead {
            high_watermark: -1,
            log_start_offset: -1,
            last_stable_offset: -1,
            aborted: Vec::new(),
            records: Ok(Bytes::new()),
        }
    }
}

/// Where to find an offset.
#[derive(Debug, Clone)]
pub(crate) struct OffsetQuery {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    /// `OFFSET_EARLIEST`, `OFFSET_LATEST`, or a timestamp (ms).
    pub(crate) timestamp: i64,
}

/// How often a read of partitions led elsewhere looks again while it waits.
const REMOTE_READ_POLL: Duration = Duration::from_millis(100);

impl Broker {
    /// Reads `reads` from wherever each partition is led: here, or from its
    /// leader over the replica link (a share group's coordinator reads its
    /// members' records). Returns at once if any has records (or fails),
    /// else when records arrive, at the latest after `max_wait`. No filter
    /// or decoders: the records as stored; `committed`: read_committed.
    pub(crate) async fn read_anywhere(
        self: &Arc<Self>,
        reads: Vec<Read>,
        max_bytes: u32,
        max_wait: Duration,
        committed: bool,
    ) -> Vec<PartitionRead> {
        let mut local = Vec::new();
        let mut remote: std::collections::BTreeMap<RemoteLeader, Vec<usize>> = Default::default();
        let mut results: Vec<Option<PartitionRead>> = (0..reads.len()).map(|_| None).collect();
        for (i, r) in reads.iter().enumerate() {
            match self.remote_leader(&r.topic, r.partition) {
                Ok(None) => local.push(i),
                Ok(Some(leader)) => remote.entry(leader).or_default().push(i),
                Err(e) => results[i] = Some(PartitionRead::failed(e.into())),
            }
        }
        let deadline = tokio::time::Instant::now() + self.fetch_wait(max_wait);
        loop {
            // Only here can a read wait for appends: with every partition
            // local it does; else it looks again now and then.
            let wait = if remote.is_empty() { max_wait } else { Duration::ZERO };
            let local_reads: Vec<Read> = local.iter().map(|&i| reads[i].clone()).collect();
            let options = ReadOptions {
                max_wait: wait,
                min_bytes: 1,
                max_bytes,
                read_committed: committed,
                ..ReadOptions::default()
            };
            let here = async {
                if local_reads.is_empty() {
                    return Ok(Vec::new());
                }
                self.read(local_reads, options).await
            };
            // Remote reads do not wait: one round trip per leader.
            let there = async {
                let mut all = Vec::with_capacity(remote.len());
                for (leader, indices) in &remote {
                    let asked = indices.iter().map(|&i| reads[i].clone()).collect();
                    all.push(self.read_at(leader.clone(), asked, max_bytes, committed).await);
                }
                all
            };
            let (here, there) = tokio::join!(here, there);
            let mut any = false;
            let mut place = |i: usize, read: PartitionRead| {
                any |= read.records.as_ref().map_or(true, |b| !b.is_empty());
                results[i] = Some(read);
            };
            match here {
                Ok(all) => local.iter().zip(all).for_each(|(&i, read)| place(i, read)),
                Err(e) => {
                    let message = e.to_string();
                    for &i in &local {
                        place(i, PartitionRead::failed(FetchError::Internal(message.clone())));
                    }
                }
            }
            for ((_, indices), answers) in remote.iter().zip(there) {
                indices.iter().zip(answers).for_each(|(&i, read)| place(i, read));
            }
            if any || remote.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(REMOTE_READ_POLL.min(deadline.saturating_duration_since(tokio::time::Instant::now())))
                .await;
        }
        results.into_iter().map(|r| r.unwrap_or_else(PartitionRead::empty)).collect()
    }

    /// One read without waiting at another broker; each partition's answer.
    async fn read_at(
        &self,
        leader: RemoteLeader,
        reads: Vec<Read>,
        max_bytes: u32,
        committed: bool,
    ) -> Vec<PartitionRead> {
        use quiver_protocol::messages::{FetchPartition, FetchRequest, Isolation};
        let count = reads.len();
        let request = FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes,
            partitions: reads
                .into_iter()
                .map(|r| FetchPartition {
                    topic: r.topic,
                    partition: r.partition,
                    offset: r.offset,
                    max_bytes: r.max_bytes,
                })
                .collect(),
            filter: String::new(),
            filter_params: Vec::new(),
            decode_values: false,
            isolation: if committed { Isolation::ReadCommitted } else { Isolation::ReadUncommitted },
        };
        let node = leader.0;
        match self.replica_link.read(leader.0, leader.1, request).await {
            Ok(answer) if answer.partitions.len() == count => answer
                .partitions
                .into_iter()
                .map(|p| PartitionRead {
                    high_watermark: p.high_watermark,
                    log_start_offset: p.log_start_offset,
                    last_stable_offset: p.last_stable_offset,
                    aborted: p.aborted.iter().map(|a| (a.producer_id, a.first_offset)).collect(),
                    records: match p.error {
                        quiver_protocol::ErrorCode::None => Ok(p.records),
                        code => Err(FetchError::AtLeader {
                            leader: node,
                            error: quiver_protocol::WireError::new(code, p.message),
                        }),
                    },
                })
                .collect(),
            answer => {
                let error = match answer {
                    Err(e) => e,
                    Ok(_) => quiver_protocol::WireError::new(
                        quiver_protocol::ErrorCode::Internal,
                        "a fetch answer without every partition asked",
                    ),
                };
                (0..count)
                    .map(|_| PartitionRead::failed(FetchError::AtLeader { leader: node, error: error.clone() }))
                    .collect()
            }
        }
    }

    /// Reads `reads`: at once if any has records (or fails), else when
    /// records arrive, at the latest after `options.max_wait`.
    pub(crate) async fn read(
        self: &Arc<Self>,
        reads: Vec<Read>,
        options: ReadOptions,
    ) -> Result<Vec<PartitionRead>, FetchError> {
        let held = self.held_partitions(reads.iter().map(|r| (r.topic.as_str(), r.partition)));
        let deadline = tokio::time::Instant::now() + self.fetch_wait(options.max_wait);
        let reads = Arc::new(reads);
        // After a read that fell short of `min_bytes`, the high watermarks
        // it saw: the next read waits for them to move.
        let mut seen = None;
        let results = loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let last = self
                .poll_appends(remaining, &held, |last| {
                    let moved = seen.is_none_or(|s| s != watermarks(&held));
                    (last || (moved && self.readable(&reads))).then_some(last)
                })
                .await;
            seen = Some(watermarks(&held));
            let (broker, all) = (self.clone(), reads.clone());
            let (max_bytes, committed) = (options.max_bytes, options.read_committed);
            let (results, bytes, failed) =
                blocking_as(move || Ok::<_, FetchError>(broker.read_partitions(&all, max_bytes, committed))).await?;
            if last
                || failed
                || bytes >= options.min_bytes.max(1) as usize
                || self.shutting_down.load(Ordering::Relaxed)
            {
                break results;
            }
        };
        self.run_read_plugins(&options, &reads, results).await
    }

    /// Whether a read of `reads` now would return records or an error
    /// (no I/O: offsets against watermarks).
    fn readable(&self, reads: &[Read]) -> bool {
        reads.iter().any(|r| match self.partition(&r.topic, r.partition) {
            Err(_) => true,
            Ok((_, p)) => {
                r.offset < p.high_watermark()
                    || r.offset > p.log.log_end_offset()
                    || r.offset < p.log.log_start_offset()
            }
        })
    }

    /// Reads every partition once (blocking); returns the results, the
    /// bytes read, and whether any partition failed.
    fn read_partitions(&self, reads: &[Read], max_bytes: u32, committed: bool) -> (Vec<PartitionRead>, usize, bool) {
        let mut remaining = max_bytes as usize;
        let mut total = 0usize;
        let mut failed = false;
        let results = reads
            .iter()
            .map(|r| {
                let mut read = PartitionRead::empty();
                read.records = self.partition(&r.topic, r.partition).map_err(FetchError::from).and_then(|(_, p)| {
                    let hw = p.high_watermark();
                    let lso = p.log.last_stable_offset(hw);
                    read.high_watermark = hw;
                    read.log_start_offset = p.log.log_start_offset();
                    read.last_stable_offset = lso;
                    // read_committed stops where the oldest open
                    // transaction begins.
                    let end = if committed { lso } else { hw };
                    if (r.offset >= end && r.offset <= hw) || remaining == 0 {
                        return Ok(Bytes::new());
                    }
                    // Always allow one whole batch, so a batch larger than
                    // the limit cannot stall a consumer.
                    let limit = (r.max_bytes as usize).min(remaining).max(1);
                    let records = p.log.read(r.offset, limit, end)?;
                    if committed && !records.is_empty() {
                        let aborted = p.log.aborted_transactions(r.offset, end);
                        read.aborted = aborted.iter().map(|a| (a.producer_id, a.first_offset)).collect();
                    }
                    Ok(records)
                });
                match &read.records {
                    Ok(records) => {
                        remaining = remaining.saturating_sub(records.len());
                        total += records.len();
                    }
                    Err(_) => failed = true,
                }
                read
            })
            .collect();
        (results, total, failed)
    }

    /// Runs the read's filter and the topics' value decoders over what was
    /// read, batch by batch, off the async runtime.
    async fn run_read_plugins(
        self: &Arc<Self>,
        options: &ReadOptions,
        reads: &Arc<Vec<Read>>,
        mut results: Vec<PartitionRead>,
    ) -> Result<Vec<PartitionRead>, FetchError> {
        if options.filter.is_none() && !options.decode_values {
            return Ok(results);
        }
        let (filter, decode) = (options.filter.clone(), options.decode_values);
        let (broker, reads) = (self.clone(), reads.clone());
        blocking_as(move || {
            for (read, asked) in results.iter_mut().zip(reads.iter()) {
                let Ok(records) = &mut read.records else { continue };
                if records.is_empty() {
                    continue;
                }
                let topic = broker.topic(&asked.topic).filter(|_| decode);
                let decoders = topic.as_ref().map(|t| serializers(&t.config, false)).unwrap_or_default();
                let mut out = Vec::new();
                for item in batch::Batches::new(records.clone()) {
                    let (header, mut stored) = item.map_err(PluginCallError::Corrupt)?;
                    // Transaction markers are the reader's, never a plugin's.
                    if header.is_control() {
                        out.push(stored);
                        continue;
                    }
                    for (name, mode) in &decoders {
                        stored = broker.apply_plugin(name, None, *mode, &stored)?;
                    }
                    if let Some((name, params)) = &filter {
                        stored = broker.apply_plugin(name, Some(params), BatchMode::Filter, &stored)?;
                    }
                    out.push(stored);
                }
                *records = quiver_protocol::codec::concat(&out);
            }
            Ok(results)
        })
        .await
    }

    /// Finds each query's offset (and the timestamp of the record found by
    /// time; `-1` otherwise). Reads the time index and a batch for queries
    /// by time: blocking.
    pub(crate) async fn find_offsets(
        self: &Arc<Self>,
        queries: Vec<OffsetQuery>,
    ) -> Vec<Result<(i64, i64), ListOffsetsError>> {
        let (broker, count) = (self.clone(), queries.len());
        let answers =
            tokio::task::spawn_blocking(move || queries.iter().map(|q| broker.find_offset(q)).collect()).await;
        answers.unwrap_or_else(|e| (0..count).map(|_| Err(ListOffsetsError::Internal(e.to_string()))).collect())
    }

    fn find_offset(&self, q: &OffsetQuery) -> Result<(i64, i64), ListOffsetsError> {
        let (_, p) = self.partition(&q.topic, q.partition)?;
        match q.timestamp {
            OFFSET_EARLIEST => Ok((p.log.log_start_offset(), -1)),
            _ if !p.high_watermark_known() => {
                Err(ListOffsetsError::NotAvailable { topic: q.topic.clone(), partition: q.partition })
            }
            OFFSET_LATEST => Ok((p.high_watermark(), -1)),
            OFFSET_LAST_STABLE => Ok((p.log.last_stable_offset(p.high_watermark()), -1)),
            ts if ts >= 0 => match p.log.offset_for_timestamp(ts)? {
                Some((offset, _)) if offset >= p.high_watermark() => Ok((p.high_watermark(), -1)),
                Some(found) => Ok(found),
                None => Ok((p.high_watermark(), -1)),
            },
            ts => Err(ListOffsetsError::InvalidTimestamp(ts)),
        }
    }
}

/// The sum of `held`'s high watermarks: it moves when any of them does.
fn watermarks(held: &[Arc<crate::partition::Partition>]) -> i64 {
    held.iter().map(|p| p.high_watermark()).sum()
}
