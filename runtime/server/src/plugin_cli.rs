//! `quiver plugin ...`: scaffold, build, test (locally, no broker), deploy
//! and operate WebAssembly plugins.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;
use quiver_plugin_host::{Entry, HostConfig, Input, Kind, Monitor, PluginHost, StateStore, builder};
use quiver_protocol::messages::{OFFSET_LATEST, PluginAction, PluginDeployRequest};

use crate::cli::{ConnArgs, Format, parse_key_value};

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Scaffold a plugin crate in ./NAME.
    Init {
        name: String,
        #[arg(long, default_value = "transform")]
        kind: String,
    },
    /// Build the plugin crate in DIR (default .) into a component and check it.
    Build {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Run a component on sample records (JSON lines: {"key":..,"value":..,"headers":{..}}), without a broker.
    Test {
        file: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long = "param", value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        /// Output topics (transforms).
        #[arg(long = "output", value_delimiter = ',', default_value = "out")]
        outputs: Vec<String>,
        /// Partition count (partitioners).
        #[arg(long, default_value_t = 6)]
        partitions: u32,
        /// Run a serializer's decode instead of its encode.
        #[arg(long)]
        decode: bool,
    },
    /// Deploy a component (a new version if NAME exists).
    Deploy {
        name: String,
        #[arg(required_unless_present = "builtin")]
        file: Option<PathBuf>,
        /// Deploy a plugin built into the broker instead of a component:
        /// `identity` (a native pass-through transform).
        #[arg(long, conflicts_with = "file")]
        builtin: Option<String>,
        #[arg(long)]
        kind: String,
        #[arg(long, default_value = "")]
        input: String,
        #[arg(long = "output", value_delimiter = ',')]
        outputs: Vec<String>,
        #[arg(long = "param", value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        /// fail | skip | dead-letter=TOPIC
        #[arg(long, default_value = "fail")]
        on_error: String,
        /// start | end | offset:N | @UNIX_MS (first deploy only)
        #[arg(long, default_value = "start")]
        start: String,
        /// Transforms: exactly-once (the default: each step's outputs,
        /// state and progress commit in one transaction, so read_committed
        /// consumers of the outputs see each input's outputs once, across
        /// broker crashes and failovers) or at-least-once (a step redone
        /// after a failure writes its outputs again).
        #[arg(long, default_value = "")]
        guarantee: String,
    },
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    Describe {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    Remove {
        name: String,
    },
    /// Print the plugin's log lines (what it logged, and its failures).
    Logs {
        name: String,
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
}

pub async fn run(conn: ConnArgs, command: PluginCommand) -> anyhow::Result<ExitCode> {
    match command {
        PluginCommand::Init { name, kind } => init(&name, &kind),
        PluginCommand::Build { dir } => build(&dir),
        PluginCommand::Test { file, input, params, outputs, partitions, decode } => {
            test(&file, &input, &params, &outputs, partitions, decode)
        }
        PluginCommand::Deploy { name, file, builtin, kind, input, outputs, params, on_error, start, guarantee } => {
            let wasm = match &file {
                Some(file) => std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?,
                None => Vec::new(),
            };
            let client = conn.connect().await?;
            let request = PluginDeployRequest {
                name: name.clone(),
                kind,
                wasm: wasm.into(),
                builtin: builtin.unwrap_or_default(),
                params,
                input,
                outputs,
                on_error,
                start,
                guarantee,
            };
            let r = client.admin().deploy_plugin(request).await?;
            println!("deployed plugin '{name}' version {} (sha256 {}, ABI {})", r.version, r.sha256, r.abi_version);
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::List { format } => describe(&conn, None, format).await,
        PluginCommand::Describe { name, format } => describe(&conn, Some(vec![name]), format).await,
        PluginCommand::Pause { name } => control(&conn, &name, PluginAction::Pause, "paused").await,
        PluginCommand::Resume { name } => control(&conn, &name, PluginAction::Resume, "resumed").await,
        PluginCommand::Remove { name } => control(&conn, &name, PluginAction::Remove, "removed").await,
        PluginCommand::Logs { name, since } => {
            let client = conn.connect().await?;
            for l in client.admin().plugin_logs(&name, since).await? {
                println!("{} {} {:>5} {}", l.seq, l.timestamp_ms, l.level, l.message);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn control(conn: &ConnArgs, name: &str, action: PluginAction, done: &str) -> anyhow::Result<ExitCode> {
    conn.connect().await?.admin().control_plugin(name, action).await?;
    println!("plugin '{name}' {done}");
    Ok(ExitCode::SUCCESS)
}

async fn describe(conn: &ConnArgs, names: Option<Vec<String>>, format: Format) -> anyhow::Result<ExitCode> {
    let single = names.is_some();
    let client = conn.connect().await?;
    let mut plugins = client.admin().list_plugins(names).await?;
    // In a cluster the answering broker knows the high watermark only of
    // the input partitions it leads: ask the other partitions' leaders.
    let consumer = client.consumer(quiver_client::ConsumerConfig::default());
    for p in &mut plugins {
        for x in p.progress.iter_mut().filter(|x| x.high_watermark < 0) {
            if let Ok(hw) = consumer.lookup(&p.input, x.partition, OFFSET_LATEST).await {
                x.high_watermark = hw;
            }
        }
    }
    for p in plugins {
        let progress: Vec<_> = p
            .progress
            .iter()
            .map(|x| serde_json::json!({"partition": x.partition, "next_offset": x.next_offset, "high_watermark": x.high_watermark, "lag": (x.high_watermark >= 0).then(|| (x.high_watermark - x.next_offset).max(0))}))
            .collect();
        let mut json = serde_json::json!({
            "name": p.name, "version": p.version, "kind": p.kind, "sha256": p.sha256, "abi_version": p.abi_version,
            "size_bytes": p.size_bytes, "deployed_ms": p.deployed_ms,
            "params": p.params.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "input": p.input, "outputs": p.outputs, "on_error": p.on_error, "guarantee": p.guarantee, "state": p.state, "reason": p.reason,
            "progress": progress,
            "stats": {"calls": p.calls, "records_in": p.records_in, "records_out": p.records_out, "errors": p.errors, "busy_ns": p.busy_ns},
        });
        if !p.state_topic.is_empty() {
            // Keys and bytes of the stores of the partitions the answering
            // broker leads.
            json["state_store"] =
                serde_json::json!({"changelog": p.state_topic, "keys": p.state_keys, "bytes": p.state_bytes});
        }
        match format {
            Format::Json => println!("{json}"),
            Format::Text if !single => {
                println!("{}\tv{}\t{}\t{}\t{}", p.name, p.version, p.kind, p.state, &p.sha256[..12])
            }
            Format::Text => println!("{}", serde_json::to_string_pretty(&json)?),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init(name: &str, kind: &str) -> anyhow::Result<ExitCode> {
    let kind: Kind = kind.parse().map_err(anyhow::Error::msg)?;
    let dir = Path::new(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/plugin");
    let sdk = sdk.canonicalize().unwrap_or(sdk);
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join(".cargo"))?;
    let crate_name = name.replace('-', "_");
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\n\
             [dependencies]\nquiver-plugin = {{ path = \"{}\", features = [\"{kind}\"] }}\n\n\
             [profile.release]\nopt-level = 3\nlto = true\nstrip = true\npanic = \"abort\"\n\n# Not part of an enclosing workspace.\n[workspace]\n",
            sdk.display()
        ),
    )?;
    std::fs::write(
        dir.join(".cargo/config.toml"),
        "[target.wasm32-wasip2]\nrustflags = [\"-C\", \"target-feature=+simd128\"]\n",
    )?;
    let body = match kind {
        Kind::Transform => format!(
            "//! A transform: each input record becomes zero or more output records.\n\n\
             use quiver_plugin::{{Error, Output, Record}};\n\n\
             pub fn {crate_name}(record: &Record<'_>) -> Result<Option<Output>, Error> {{\n    \
             let text = record.value_str()?;\n    Ok(Some(Output::with_value(record, text.to_uppercase())))\n}}\n\n\
             quiver_plugin::transform!(fn {crate_name});\n\n\
             #[cfg(test)]\nmod tests {{\n    use quiver_plugin::testing::{{TestRecord, transform}};\n\n    \
             #[test]\n    fn uppercases() {{\n        \
             let out = transform::<super::__QuiverFnTransform>(&[], &[\"out\"], &[TestRecord::value(\"hi\")]).unwrap();\n        \
             assert_eq!(out[0].record.value.as_deref(), Some(&b\"HI\"[..]));\n    }}\n}}\n"
        ),
        Kind::Filter => format!(
            "//! A read-side filter: keep (forward), drop (None) or rewrite records in a fetch.\n\n\
             use quiver_plugin::{{Error, Output, Record}};\n\n\
             pub fn {crate_name}(record: &Record<'_>) -> Result<Option<Output>, Error> {{\n    \
             Ok(record.value().is_some_and(|v| !v.is_empty()).then(Output::forward))\n}}\n\n\
             quiver_plugin::filter!(fn {crate_name});\n"
        ),
        Kind::Partitioner => format!(
            "//! A partitioner: one partition per record.\n\n\
             use quiver_plugin::{{Error, Record}};\n\n\
             pub fn {crate_name}(record: &Record<'_>, partitions: u32) -> Result<u32, Error> {{\n    \
             let key = record.key().ok_or_else(|| Error::new(\"a key is needed\"))?;\n    \
             Ok(key.iter().map(|b| u32::from(*b)).sum::<u32>() % partitions)\n}}\n\n\
             quiver_plugin::partitioner!(fn {crate_name});\n"
        ),
        Kind::Serializer => "//! A serializer: checks values on produce, decodes them on consume.\n\n\
             use quiver_plugin::{Error, Output, Params, Record, Serializer};\n\n\
             pub struct Utf8Only;\n\n\
             impl Serializer for Utf8Only {\n    \
             fn init(_: &Params) -> Result<Self, Error> {\n        Ok(Utf8Only)\n    }\n\n    \
             fn encode(&mut self, record: &Record<'_>) -> Result<Output, Error> {\n        \
             record.value_str()?;\n        Ok(Output::forward())\n    }\n\n    \
             fn decode(&mut self, _: &Record<'_>) -> Result<Output, Error> {\n        Ok(Output::forward())\n    }\n}\n\n\
             quiver_plugin::serializer!(Utf8Only);\n"
            .to_string(),
    };
    std::fs::write(dir.join("src/lib.rs"), body)?;
    std::fs::write(dir.join("sample.jsonl"), "{\"key\": \"k1\", \"value\": \"hello\"}\n{\"value\": \"world\"}\n")?;
    println!(
        "created {kind} plugin crate {name}/: `cargo test` runs it natively; `quiver plugin build {name}` makes the component"
    );
    Ok(ExitCode::SUCCESS)
}

fn build(dir: &Path) -> anyhow::Result<ExitCode> {
    let wasm = builder::build(dir, None).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(&wasm)?;
    let host = PluginHost::new(HostConfig::default())?;
    let plugin = host.load(&bytes).with_context(|| format!("{} is not a valid Quiver plugin", wasm.display()))?;
    println!(
        "{}\n  kind {}, ABI {}, {} bytes, sha256 {}",
        wasm.display(),
        plugin.kind(),
        plugin.abi_version(),
        bytes.len(),
        plugin.sha256()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads sample records into one batch: one JSON object per line with
/// optional `key`, `value` (a string is taken as is, any other JSON is
/// serialised) and `headers` (an object of strings).
fn read_samples(path: &Path) -> anyhow::Result<bytes::Bytes> {
    use quiver_protocol::batch::{BatchBuilder, Compression, Header};
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut b = BatchBuilder::new(Compression::None);
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        let field = |name: &str| -> Option<Vec<u8>> {
            match v.get(name) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone().into_bytes()),
                Some(other) => Some(other.to_string().into_bytes()),
            }
        };
        let headers: Vec<Header> = v
            .get("headers")
            .and_then(|h| h.as_object())
            .map(|h| {
                h.iter()
                    .map(|(k, v)| Header { key: k.clone(), value: v.as_str().map(|s| s.as_bytes().to_vec().into()) })
                    .collect()
            })
            .unwrap_or_default();
        b.append(0, field("key").as_deref(), field("value").as_deref(), &headers);
    }
    if b.is_empty() {
        bail!("{} holds no records", path.display());
    }
    Ok(b.build())
}

fn test(
    file: &Path,
    input: &Path,
    params: &[(String, String)],
    outputs: &[String],
    partitions: u32,
    decode: bool,
) -> anyhow::Result<ExitCode> {
    let wasm = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let host = PluginHost::new(HostConfig::default())?;
    let plugin = host.load(&wasm)?;
    let monitor = Arc::new(Monitor::default());
    let outputs: Vec<String> = if plugin.kind() == Kind::Transform { outputs.to_vec() } else { Vec::new() };
    // A stateful transform gets a store of its own for the run (empty: the
    // broker's changelog is not read).
    let state = plugin.uses_state().then(|| StateStore::shared(HostConfig::default().state_max_bytes));
    let mut inst = plugin.instantiate_with_state(params, &outputs, monitor.clone(), state)?;
    let stored = read_samples(input)?;
    let (header, body) = quiver_protocol::batch::records_section(&stored)?;
    let records = quiver_protocol::batch::decode_section(&header, &body)?;
    let count = records.len() as u32;
    let batch = Input { base_offset: 0, base_timestamp: 0, count, records: &body };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = false;
    match plugin.kind() {
        Kind::Partitioner => match inst.partition(&batch, partitions)? {
            Ok(parts) => {
                for (i, p) in parts.iter().enumerate() {
                    writeln!(out, "{}", serde_json::json!({"input": i, "partition": p}))?;
                }
            }
            Err(r) => {
                eprintln!("record {} refused: {}", r.index, r.message);
                failed = true;
            }
        },
        kind => {
            let result = match kind {
                Kind::Transform => inst.transform(&batch)?,
                Kind::Filter => inst.filter(&batch)?,
                _ => inst.serialize(&batch, !decode)?,
            };
            let topics = outputs.len().max(1) as u32;
            for e in result.decode(count, topics)? {
                let src = &records[e.input() as usize];
                let topic = outputs.get(e.topic() as usize).cloned().unwrap_or_default();
                let json = match &e {
                    Entry::Forward { input, .. } => serde_json::json!({
                        "input": input, "topic": topic, "forwarded": true,
                        "key": crate::cli::bytes_json(src.key.as_deref()), "value": crate::cli::bytes_json(src.value.as_deref()),
                    }),
                    Entry::New { input, partition, key, value, headers, .. } => serde_json::json!({
                        "input": input, "topic": topic, "partition": partition,
                        "key": crate::cli::bytes_json(*key), "value": crate::cli::bytes_json(*value),
                        "headers": headers.iter().map(|(k, v)| ((*k).to_owned(), crate::cli::bytes_json(*v))).collect::<serde_json::Map<_, _>>(),
                    }),
                };
                writeln!(out, "{json}")?;
            }
            if let Some(r) = result.refusal {
                eprintln!("record {} refused: {}", r.index, r.message);
                failed = true;
            }
        }
    }
    for l in monitor.lines_since(0) {
        eprintln!("[plugin {}] {}", l.level, l.message);
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
