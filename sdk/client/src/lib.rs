//! Quiver's async Rust client.
//!
//! - [`Client`]: one QUIC + TLS connection to a broker; every request runs on
//!   its own QUIC stream, so requests never block each other.
//! - [`Producer`]: batching (size and linger), compression, Kafka-compatible
//!   key partitioning (murmur2), sticky partitioning for keyless records,
//!   per-record delivery futures, bounded buffers and in-flight requests,
//!   retries of retriable errors.
//! - [`Consumer`]: assign / seek / poll, with the next fetch pipelined while
//!   the caller processes the current records.
//! - Consumer groups: [`Consumer::subscribe`] joins a group whose
//!   coordinator (a broker) assigns partitions among its members, with
//!   committed offsets, auto-commit, static membership and a
//!   [`RebalanceListener`].
//! - [`TransactionalProducer`]: records written in transactions, visible to
//!   read_committed consumers ([`ConsumerConfig::isolation`]) all together
//!   at the commit, or never.
//! - [`Admin`] for topics, plugins, groups and transactions.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use quiver_client::{Client, ClientConfig, ProducerRecord, OffsetSpec};
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7878", std::fs::read(".quiver/ca.pem")?)).await?;
//! client.admin().create_topic("orders", 6, &[]).await?;
//! let producer = client.producer(Default::default());
//! let delivery = producer.send(ProducerRecord::new("orders", "hello").key("k1")).await?;
//! println!("written at offset {}", delivery.await?.offset);
//! let mut consumer = client.consumer(Default::default());
//! consumer.assign("orders", None, OffsetSpec::Earliest).await?;
//! for record in consumer.poll().await? { println!("{:?}", record.value); }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod admin;
mod connection;
mod consumer;
mod delivery;
mod groups;
mod membership;
mod partitioning;
pub use quiver_protocol::partitioner;
mod producer;
mod routing;
mod sequencer;
mod share;
mod transactions;

pub use admin::Admin;
pub use connection::{
    CallError, Client, ClientConfig, ConnectError, RequestStream, quic_client_config, transport_config,
};
pub use consumer::{ConsumeError, Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, OffsetSpec};
pub use delivery::DeliveryFuture;
pub use groups::GroupOffset;
pub use membership::RebalanceListener;
pub use producer::{ProduceError, Producer, ProducerConfig, ProducerRecord, RecordMetadata};
pub use quiver_protocol::batch::{Compression, Header};
pub use quiver_protocol::messages::{Acks, PARTITION_ANY};
pub use quiver_protocol::messages::{Isolation, TransactionInfo};
pub use quiver_protocol::{ErrorCode, WireError};
pub use share::{AckError, AckKind, ShareConsumer, ShareConsumerConfig, ShareRecord};
pub use transactions::{TransactionError, TransactionalProducer};
