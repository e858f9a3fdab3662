//! Wire error codes. Every failed request or partition result carries one of
//! these plus a human-readable message; the list is documented in
//! spec/protocol.md and never renumbered.

use crate::wire_enum;

wire_enum! {
    pub enum ErrorCode {
        None = 0,
        /// An unexpected server-side failure; the message says what.
        Internal = 1,
        /// The frame or a record batch could not be decoded.
        CorruptMessage = 2,
        UnsupportedVersion = 3,
        UnknownApi = 4,
        UnknownTopic = 5,
        UnknownPartition = 6,
        TopicAlreadyExists = 7,
        InvalidConfig = 8,
        InvalidPartitions = 9,
        RecordTooLarge = 10,
        FrameTooLarge = 11,
        OffsetOutOfRange = 12,
        InvalidRequest = 13,
        NotLeader = 14,
        RequestTimedOut = 15,
        StorageError = 16,
        InvalidTopicName = 17,
        BrokerShuttingDown = 18,
        /// The batch on disk failed its CRC: the broker never serves it.
        CorruptStoredBatch = 19,
        NotEnoughReplicas = 20,
        /// A plugin was refused at deploy: not a component, wrong ABI
        /// version or kind, bad parameters.
        InvalidPlugin = 21,
        UnknownPlugin = 22,
        /// A serializer refused a record: the whole batch is not appended.
        RecordRejected = 23,
        /// A plugin trapped, ran past its deadline or its memory cap while
        /// serving this request.
        PluginFailed = 24,
        /// The metadata quorum has no leader (a majority of controllers is
        /// down or cut off); retry when it is back.
        NoQuorum = 25,
        /// The caller may not use this API (e.g. the controller API without
        /// a node certificate).
        NotAuthorized = 26,
        /// A follower fetched with a leader epoch other than the leader's:
        /// it refreshes its metadata and reconciles its log again.
        FencedLeaderEpoch = 27,
        /// An `acks=all` batch was appended by the leader, but the in-sync
        /// replicas did not confirm it (timeout, or leadership moved): it
        /// may or may not be kept. Not retriable: a retry could write it
        /// twice.
        NotReplicated = 28,
        /// A new leader does not know yet how far its predecessor's high
        /// watermark reached (its followers have not confirmed its log):
        /// "latest" now could go backwards. Retry shortly.
        OffsetNotAvailable = 29,
        /// An idempotent producer's batch skips a sequence number: an
        /// earlier batch of that producer for the partition has not arrived
        /// (still in flight, or lost). Nothing was appended; retry once the
        /// earlier batch is through.
        OutOfOrderSequence = 30,
        /// An idempotent producer's batch carries an epoch older than one
        /// the partition has seen from the same producer id: that
        /// generation of the producer gave up on the partition. Nothing was
        /// appended.
        ProducerFenced = 31,
        /// An idempotent producer's batch is behind the sequence the
        /// partition expects and not among the producer's batches it
        /// remembers: written long ago, or never. It cannot be appended in
        /// this epoch; its fate is unknown.
        StaleSequence = 32,
        /// The broker's budget for request bytes in flight stayed used up
        /// while this request waited: nothing was done; retry shortly.
        BrokerBusy = 33,
        /// The node started recently and has not caught up with the
        /// metadata log yet, so its answer could be stale: retry shortly
        /// (or ask another node).
        BrokerNotReady = 34,
        /// This broker does not coordinate the group (the leadership of its
        /// offsets partition moved): find the coordinator again and retry.
        NotCoordinator = 35,
        /// The coordinator is rebuilding its groups from the offsets topic
        /// (it just became their coordinator): retry shortly.
        CoordinatorLoading = 36,
        /// The member is not in the group (fenced for a missed session, or
        /// it never joined): drop every partition without committing and
        /// join again.
        UnknownMember = 37,
        /// The member's epoch is not the group's view of it (a zombie, or
        /// an answer it lost): drop every partition and join again.
        FencedMemberEpoch = 38,
        /// The group has members: stop them first (delete, offset reset).
        GroupNotEmpty = 39,
        /// No group of this name exists (nothing committed, no members).
        UnknownGroup = 40,
        /// A static member's instance id is used by another active member.
        InstanceInUse = 41,
        /// A member committed an offset for a partition it does not own.
        PartitionNotOwned = 42,
        /// A share member acknowledged a record it does not hold (never
        /// handed to it, acknowledged already, or its lock expired).
        InvalidRecordState = 43,
        /// A record without a key for a compacted topic (Kafka's
        /// INVALID_RECORD): compaction keeps the latest record per key.
        InvalidRecord = 44,
        /// The transaction cannot do this in its state (e.g. write to a
        /// partition while it is not open, commit one that was aborted):
        /// abort the transaction and begin another.
        InvalidTxnState = 45,
        /// A transaction of this transactional id is ending (its markers
        /// are being written): retry shortly.
        ConcurrentTransactions = 46,
        /// The transactional id is unknown to its coordinator (never
        /// initialised, or expired): call init_transactions.
        UnknownTransactionalId = 47,
        /// The transaction timeout asked is out of the broker's range.
        InvalidTransactionTimeout = 48,
        /// The transactional id belongs to another producer id: the
        /// producer must initialise again.
        InvalidProducerIdMapping = 49,
        /// An open transaction holds offsets of the group for these
        /// partitions: retry once it ends (Kafka's UNSTABLE_OFFSET_COMMIT).
        UnstableOffsetCommit = 50,
    }
}

impl ErrorCode {
    /// Whether a client may retry the same request unchanged.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::RequestTimedOut
                | ErrorCode::BrokerShuttingDown
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::UnknownTopic
                | ErrorCode::NoQuorum
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::OffsetNotAvailable
                | ErrorCode::OutOfOrderSequence
                | ErrorCode::BrokerBusy
                | ErrorCode::BrokerNotReady
                | ErrorCode::NotCoordinator
                | ErrorCode::CoordinatorLoading
                | ErrorCode::ConcurrentTransactions
                | ErrorCode::UnstableOffsetCommit
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "none",
            ErrorCode::Internal => "internal",
            ErrorCode::CorruptMessage => "corrupt_message",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownApi => "unknown_api",
            ErrorCode::UnknownTopic => "unknown_topic",
            ErrorCode::UnknownPartition => "unknown_partition",
            ErrorCode::TopicAlreadyExists => "topic_already_exists",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::InvalidPlugin => "invalid_plugin",
            ErrorCode::UnknownPlugin => "unknown_plugin",
            ErrorCode::RecordRejected => "record_rejected",
            ErrorCode::PluginFailed => "plugin_failed",
            ErrorCode::NoQuorum => "no_quorum",
            ErrorCode::FencedLeaderEpoch => "fenced_leader_epoch",
            ErrorCode::NotReplicated => "not_replicated",
            ErrorCode::OffsetNotAvailable => "offset_not_available",
            ErrorCode::OutOfOrderSequence => "out_of_order_sequence",
            ErrorCode::ProducerFenced => "producer_fenced",
            ErrorCode::StaleSequence => "stale_sequence",
            ErrorCode::BrokerBusy => "broker_busy",
            ErrorCode::BrokerNotReady => "broker_not_ready",
            ErrorCode::NotAuthorized => "not_authorized",
            ErrorCode::InvalidPartitions => "invalid_partitions",
            ErrorCode::RecordTooLarge => "record_too_large",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::OffsetOutOfRange => "offset_out_of_range",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::RequestTimedOut => "request_timed_out",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::InvalidTopicName => "invalid_topic_name",
            ErrorCode::BrokerShuttingDown => "broker_shutting_down",
            ErrorCode::CorruptStoredBatch => "corrupt_stored_batch",
            ErrorCode::NotEnoughReplicas => "not_enough_replicas",
            ErrorCode::NotCoordinator => "not_coordinator",
            ErrorCode::CoordinatorLoading => "coordinator_loading",
            ErrorCode::UnknownMember => "unknown_member",
            ErrorCode::FencedMemberEpoch => "fenced_member_epoch",
            ErrorCode::GroupNotEmpty => "group_not_empty",
            ErrorCode::UnknownGroup => "unknown_group",
            ErrorCode::InstanceInUse => "instance_in_use",
            ErrorCode::PartitionNotOwned => "partition_not_owned",
            ErrorCode::InvalidRecordState => "invalid_record_state",
            ErrorCode::InvalidRecord => "invalid_record",
            ErrorCode::InvalidTxnState => "invalid_txn_state",
            ErrorCode::ConcurrentTransactions => "concurrent_transactions",
            ErrorCode::UnknownTransactionalId => "unknown_transactional_id",
            ErrorCode::InvalidTransactionTimeout => "invalid_transaction_timeout",
            ErrorCode::InvalidProducerIdMapping => "invalid_producer_id_mapping",
            ErrorCode::UnstableOffsetCommit => "unstable_offset_commit",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An error code with its message, as carried in responses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into() }
    }
}
