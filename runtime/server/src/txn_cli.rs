//! `quiver transaction ...`: list the cluster's transactional ids, describe
//! one (state, partitions, age, producer id and epoch), abort a hanging
//! one.

use std::process::ExitCode;

use clap::Subcommand;
use quiver_client::TransactionInfo;

use crate::cli::{ConnArgs, Format};

#[derive(Subcommand, Debug)]
pub enum TransactionCommand {
    /// Every transactional id of the cluster with its transaction's state.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// A transactional id's transaction: state, partitions, age, producer
    /// id and epoch, timeout, coordinator.
    Describe {
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Aborts the id's open transaction (a producer that hangs or is gone):
    /// its records are never visible to read_committed consumers and its
    /// producer is fenced. Admin.
    Abort { id: String },
}

pub async fn run(conn: ConnArgs, command: TransactionCommand) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    let admin = client.admin();
    let now = quiver_broker::now_ms().max(0) as u64;
    match command {
        TransactionCommand::List { format } => {
            let all = admin.list_transactions().await?;
            match format {
                Format::Json => {
                    let list: Vec<_> = all.iter().map(|t| json(t, now)).collect();
                    println!("{}", serde_json::to_string(&list)?);
                }
                Format::Text => {
                    for t in &all {
                        println!(
                            "{}\t{}\t{} partition(s)\tproducer {} epoch {}\t{}",
                            t.transactional_id,
                            t.state,
                            t.partitions.len(),
                            t.producer_id,
                            t.producer_epoch,
                            age(t, now)
                        );
                    }
                }
            }
        }
        TransactionCommand::Describe { id, format } => {
            let t = admin.describe_transaction(&id).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&json(&t, now))?),
                Format::Text => print_text(&t, now),
            }
        }
        TransactionCommand::Abort { id } => {
            let t = admin.abort_transaction(&id).await?;
            println!("aborted the transaction of '{id}' ({} partition(s)); its producer is fenced", t.partitions.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long ago the current (or last) transaction began.
fn age(t: &TransactionInfo, now: u64) -> String {
    format!("began {:.1}s ago", now.saturating_sub(t.started_ms) as f64 / 1000.0)
}

fn print_text(t: &TransactionInfo, now: u64) {
    println!("transactional id: {}", t.transactional_id);
    println!("state:            {}", t.state);
    println!("producer:         id {} epoch {}", t.producer_id, t.producer_epoch);
    println!("timeout:          {} ms", t.timeout_ms);
    println!(
        "transaction:      {}; last change {:.1}s ago",
        age(t, now),
        now.saturating_sub(t.updated_ms) as f64 / 1000.0
    );
    println!("coordinator:      broker {}", t.coordinator);
    println!("partitions:       {}", t.partitions.len());
    for p in &t.partitions {
        println!("  {}-{}", p.topic, p.partition);
    }
    if !t.groups.is_empty() {
        println!("groups:           {}", t.groups.join(", "));
    }
}

fn json(t: &TransactionInfo, now: u64) -> serde_json::Value {
    serde_json::json!({
        "transactional_id": t.transactional_id,
        "state": t.state,
        "producer_id": t.producer_id,
        "producer_epoch": t.producer_epoch,
        "timeout_ms": t.timeout_ms,
        "partitions": t.partitions.iter().map(|p| serde_json::json!({"topic": p.topic, "partition": p.partition})).collect::<Vec<_>>(),
        "groups": t.groups,
        "started_ms": t.started_ms,
        "updated_ms": t.updated_ms,
        "age_ms": now.saturating_sub(t.started_ms),
        "coordinator": t.coordinator,
    })
}
