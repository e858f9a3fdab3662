//! `quiver group ...`: list, describe (members, assignments, committed
//! offsets and lag), reset offsets and delete consumer groups.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use quiver_client::{Client, ErrorCode};
use quiver_protocol::messages::{DescribeGroupResponse, OFFSET_EARLIEST, OFFSET_LATEST, TopicPartitions};

use crate::cli::{ConnArgs, Format, parse_key_value};

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Every consumer group of the cluster, with its state and members.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// A group's members and their partitions, and per partition its
    /// committed offset, end offset and lag.
    Describe {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Sets a group's committed offsets for a topic (every partition, or
    /// one). Refused while the group has members: stop them first.
    ResetOffsets {
        name: String,
        #[arg(long)]
        topic: String,
        #[arg(short, long)]
        partition: Option<u32>,
        /// start | end | offset:N | @UNIX_MS (the first record at or after
        /// that time).
        #[arg(long)]
        to: String,
        /// Print the new offsets without setting them.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Deletes a group and its committed offsets; refused while it has
    /// members.
    Delete { name: String },
    /// Sets a group's own timings over the broker's: `-c
    /// session.timeout.ms=3000 -c heartbeat.interval.ms=500` (an empty
    /// value: the broker's default again).
    Configure {
        name: String,
        #[arg(short = 'c', long = "config", value_parser = parse_key_value, required = true)]
        configs: Vec<(String, String)>,
    },
}

/// Where `reset-offsets --to` moves a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    Start,
    End,
    Offset(i64),
    Time(i64),
}

pub fn parse_reset_to(arg: &str) -> anyhow::Result<ResetTo> {
    Ok(match arg {
        "start" | "earliest" => ResetTo::Start,
        "end" | "latest" => ResetTo::End,
        s if s.starts_with("offset:") => {
            let n = &s["offset:".len()..];
            let n: i64 = n.parse().with_context(|| format!("'{s}': expected offset:N with N a number"))?;
            if n < 0 {
                bail!("'{s}': offsets are not negative");
            }
            ResetTo::Offset(n)
        }
        s if s.starts_with('@') => ResetTo::Time(
            s[1..].parse().with_context(|| format!("'{s}': expected @ followed by milliseconds since the epoch"))?,
        ),
        s => bail!("--to '{s}': expected start, end, offset:N or @UNIX_MS"),
    })
}

pub async fn run(conn: ConnArgs, command: GroupCommand) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    let admin = client.admin();
    match command {
        GroupCommand::List { format } => {
            let groups = admin.list_groups().await?;
            match format {
                Format::Json => {
                    let list: Vec<_> = groups
                        .iter()
                        .map(|g| {
                            serde_json::json!({"group": g.group, "kind": g.kind, "state": g.state, "members": g.members})
                        })
                        .collect();
                    println!("{}", serde_json::to_string(&list)?);
                }
                Format::Text => {
                    for g in groups {
                        println!("{}\t{}\t{}\t{} member(s)", g.group, g.kind, g.state, g.members);
                    }
                }
            }
        }
        GroupCommand::Describe { name, format } => {
            let g = admin.describe_group(&name).await?;
            let lags = lags(&client, &g).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&describe_json(&g, &lags))?),
                Format::Text => print_description(&g, &lags),
            }
        }
        GroupCommand::ResetOffsets { name, topic, partition, to, dry_run, format } => {
            let to = parse_reset_to(&to)?;
            let plan = reset_plan(&client, &topic, partition, to).await?;
            if !dry_run {
                let offsets = plan.iter().map(|(p, o)| (topic.clone(), *p, *o)).collect();
                admin.set_group_offsets(&name, offsets).await.map_err(|e| match &e {
                    quiver_client::CallError::Broker(w) if w.code == ErrorCode::GroupNotEmpty => {
                        anyhow::anyhow!("cannot reset the offsets of an active group: {}", w.message)
                    }
                    _ => anyhow::Error::from(e),
                })?;
            }
            match format {
                Format::Json => {
                    let list: Vec<_> = plan
                        .iter()
                        .map(|(p, o)| serde_json::json!({"topic": topic, "partition": p, "offset": o}))
                        .collect();
                    println!("{}", serde_json::to_string(&serde_json::json!({"dry_run": dry_run, "offsets": list}))?);
                }
                Format::Text => {
                    for (p, o) in &plan {
                        println!("{topic}-{p}\t{o}");
                    }
                    let verb = if dry_run { "would set" } else { "set" };
                    eprintln!("{verb} {} offset(s) of group '{name}'", plan.len());
                }
            }
        }
        GroupCommand::Configure { name, configs } => {
            for (key, value) in admin.alter_group_config(&name, &configs).await? {
                println!("{key}={value}");
            }
        }
        GroupCommand::Delete { name } => {
            admin.delete_group(&name).await?;
            println!("deleted group '{name}'");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The offsets `reset-offsets` sets: (partition, offset).
async fn reset_plan(
    client: &Client,
    topic: &str,
    partition: Option<u32>,
    to: ResetTo,
) -> anyhow::Result<Vec<(u32, i64)>> {
    let meta = client.admin().metadata(Some(vec![topic.to_owned()])).await?;
    let t = meta
        .topics
        .into_iter()
        .find(|t| t.name == topic && t.error == ErrorCode::None)
        .with_context(|| format!("topic '{topic}' does not exist"))?;
    let partitions: Vec<u32> = match partition {
        Some(p) if t.partitions.iter().any(|x| x.partition == p) => vec![p],
        Some(p) => bail!("topic '{topic}' has {} partition(s); there is no partition {p}", t.partitions.len()),
        None => t.partitions.iter().map(|p| p.partition).collect(),
    };
    let consumer = client.consumer(Default::default());
    let mut plan = Vec::new();
    for p in partitions {
        let start = consumer.lookup(topic, p, OFFSET_EARLIEST).await?;
        let end = consumer.lookup(topic, p, OFFSET_LATEST).await?;
        let offset = match to {
            ResetTo::Start => start,
            ResetTo::End => end,
            // Kafka clamps to the log's range.
            ResetTo::Offset(n) => n.clamp(start, end),
            ResetTo::Time(ms) => consumer.lookup(topic, p, ms.max(0)).await?,
        };
        plan.push((p, offset));
    }
    Ok(plan)
}

/// Per committed partition: (committed, end offset, lag).
type Lags = BTreeMap<(String, u32), (i64, i64, i64)>;

async fn lags(client: &Client, g: &DescribeGroupResponse) -> anyhow::Result<Lags> {
    let consumer = client.consumer(Default::default());
    let mut out = BTreeMap::new();
    for o in &g.offsets {
        let end = consumer.lookup(&o.topic, o.partition, OFFSET_LATEST).await.unwrap_or(-1);
        let lag = if end >= 0 { (end - o.offset).max(0) } else { -1 };
        out.insert((o.topic.clone(), o.partition), (o.offset, end, lag));
    }
    Ok(out)
}

fn partitions_text(list: &[TopicPartitions]) -> String {
    let parts: Vec<String> =
        list.iter().flat_map(|tp| tp.partitions.iter().map(move |p| format!("{}-{p}", tp.topic))).collect();
    if parts.is_empty() { "-".into() } else { parts.join(",") }
}

fn owner_of<'a>(g: &'a DescribeGroupResponse, topic: &str, partition: u32) -> Option<&'a str> {
    g.members
        .iter()
        .find(|m| {
            m.assignment.iter().chain(&m.revoking).any(|tp| tp.topic == topic && tp.partitions.contains(&partition))
        })
        .map(|m| m.member_id.as_str())
}

fn print_description(g: &DescribeGroupResponse, lags: &Lags) {
    if g.kind == "share" {
        println!(
            "share group {}  state {}  coordinator node {}  members {}",
            g.group,
            g.state,
            g.coordinator,
            g.share_members.len()
        );
    } else {
        println!(
            "group {}  state {}  epoch {}  assignor {}  coordinator node {}  members {}",
            g.group,
            g.state,
            g.group_epoch,
            g.assignor,
            g.coordinator,
            g.members.len()
        );
    }
    let configs: Vec<String> = g
        .configs
        .iter()
        .map(|(k, v)| {
            let own = if g.overridden.contains(k) { " (group)" } else { "" };
            format!("{k}={v}{own}")
        })
        .collect();
    println!("configs {}", configs.join("  "));
    if !g.members.is_empty() {
        println!("MEMBER\tINSTANCE\tEPOCH\tSTATE\tASSIGNED");
        for m in &g.members {
            let instance = if m.instance_id.is_empty() { "-" } else { m.instance_id.as_str() };
            println!(
                "{}\t{}\t{}\t{}\t{}",
                m.member_id,
                instance,
                m.member_epoch,
                m.state,
                partitions_text(&m.assignment)
            );
        }
    }
    if !g.share_members.is_empty() {
        println!("MEMBER\tTOPICS");
        for m in &g.share_members {
            println!("{}\t{}", m.member_id, m.topics.join(","));
        }
    }
    if !g.share_partitions.is_empty() {
        println!("TOPIC\tPARTITION\tSTART\tEND\tACQUIRED\tDEAD_LETTERS");
        for p in &g.share_partitions {
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}",
                p.topic, p.partition, p.start_offset, p.end_offset, p.acquired, p.dead_letters
            );
        }
    }
    if !lags.is_empty() {
        println!("TOPIC\tPARTITION\tCOMMITTED\tEND\tLAG\tMEMBER");
        for ((topic, p), (committed, end, lag)) in lags {
            let owner = owner_of(g, topic, *p).unwrap_or("-");
            println!("{topic}\t{p}\t{committed}\t{end}\t{lag}\t{owner}");
        }
    }
}

fn describe_json(g: &DescribeGroupResponse, lags: &Lags) -> serde_json::Value {
    let tps = |list: &[TopicPartitions]| -> Vec<serde_json::Value> {
        list.iter().map(|tp| serde_json::json!({"topic": tp.topic, "partitions": tp.partitions})).collect()
    };
    let members: Vec<_> = g
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "member_id": m.member_id,
                "instance_id": (!m.instance_id.is_empty()).then_some(&m.instance_id),
                "member_epoch": m.member_epoch,
                "state": m.state,
                "subscription": {"topics": m.subscription.topics, "pattern": (!m.subscription.pattern.is_empty()).then_some(&m.subscription.pattern)},
                "assignment": tps(&m.assignment),
                "revoking": tps(&m.revoking),
                "target": tps(&m.target),
            })
        })
        .collect();
    let offsets: Vec<_> = lags
        .iter()
        .map(|((topic, p), (committed, end, lag))| {
            serde_json::json!({
                "topic": topic,
                "partition": p,
                "committed": committed,
                "end": end,
                "lag": lag,
                "member": owner_of(g, topic, *p),
            })
        })
        .collect();
    let share_members: Vec<_> =
        g.share_members.iter().map(|m| serde_json::json!({"member_id": m.member_id, "topics": m.topics})).collect();
    let share_partitions: Vec<_> = g
        .share_partitions
        .iter()
        .map(|p| {
            serde_json::json!({
                "topic": p.topic,
                "partition": p.partition,
                "start": p.start_offset,
                "end": p.end_offset,
                "acquired": p.acquired,
                "dead_letters": p.dead_letters,
            })
        })
        .collect();
    serde_json::json!({
        "group": g.group,
        "kind": g.kind,
        "share_members": share_members,
        "share_partitions": share_partitions,
        "state": g.state,
        "group_epoch": g.group_epoch,
        "assignor": g.assignor,
        "coordinator": g.coordinator,
        "configs": g.configs.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "overridden": g.overridden,
        "members": members,
        "offsets": offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_targets_parse() {
        assert_eq!(parse_reset_to("start").unwrap(), ResetTo::Start);
        assert_eq!(parse_reset_to("end").unwrap(), ResetTo::End);
        assert_eq!(parse_reset_to("offset:42").unwrap(), ResetTo::Offset(42));
        assert_eq!(parse_reset_to("@1700000000000").unwrap(), ResetTo::Time(1_700_000_000_000));
        assert!(parse_reset_to("offset:-1").is_err());
        assert!(parse_reset_to("offset:x").is_err());
        assert!(parse_reset_to("middle").is_err());
    }
}
