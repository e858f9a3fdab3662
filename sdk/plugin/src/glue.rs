//! The batch ABI, shared by the Wasm exports and the native test harness:
//! decode the input buffer, call the plugin per record, encode the entries.
//! Not part of the API; the export macros call it.

use std::any::Any;
use std::cell::RefCell;

use crate::output::topic_index;
use crate::{Error, Filter, Level, Output, Params, Partitioner, Records, Serializer, Transform};

/// What one batch call produced: entries for every record before the error's
/// index (or all), and the first record's error.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchResult {
    pub entries: Vec<u8>,
    pub error: Option<(u32, String)>,
}

struct State {
    plugin: Box<dyn Any>,
    outputs: Vec<String>,
}

thread_local! {
    // One plugin instance per Wasm instance; the host never calls it
    // concurrently.
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

pub fn init_transform<T: Transform>(params: Vec<(String, String)>, outputs: Vec<String>) -> Result<(), String> {
    if outputs.is_empty() {
        return Err("a transform needs at least one output topic".into());
    }
    let plugin = T::init(&Params::new(params).with_outputs(outputs.clone())).map_err(|e| e.to_string())?;
    STATE.with(|s| *s.borrow_mut() = Some(State { plugin: Box::new(plugin), outputs }));
    Ok(())
}

pub fn init_plugin<T: 'static>(
    params: Vec<(String, String)>,
    init: fn(&Params) -> Result<T, Error>,
) -> Result<(), String> {
    let plugin = init(&Params::new(params)).map_err(|e| e.to_string())?;
    STATE.with(|s| *s.borrow_mut() = Some(State { plugin: Box::new(plugin), outputs: Vec::new() }));
    Ok(())
}

fn with_state<T: 'static, R>(f: impl FnOnce(&mut T, &[String]) -> R) -> Result<R, String> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let state = s.as_mut().ok_or("the plugin was called before init")?;
        let plugin = state.plugin.downcast_mut::<T>().ok_or("the plugin's state has another type")?;
        Ok(f(plugin, &state.outputs))
    })
}

fn not_started(message: String) -> BatchResult {
    BatchResult { entries: Vec::new(), error: Some((0, message)) }
}

/// Runs `f` on each record, stopping at the first error.
fn each_record(
    records: &[u8],
    base_offset: i64,
    base_timestamp: i64,
    mut f: impl FnMut(&crate::Record<'_>, &mut Vec<u8>) -> Result<(), Error>,
) -> BatchResult {
    let mut entries = Vec::with_capacity(records.len() / 64 + 16);
    for record in Records::new(records, base_offset, base_timestamp) {
        let index = match &record {
            Ok(r) => r.index(),
            Err(_) => u32::MAX,
        };
        if let Err(e) = record.and_then(|r| f(&r, &mut entries)) {
            return BatchResult { entries, error: Some((index, e.to_string())) };
        }
    }
    BatchResult { entries, error: None }
}

pub fn call_transform<T: Transform>(records: &[u8], base_offset: i64, base_timestamp: i64) -> BatchResult {
    with_state::<T, _>(|plugin, outputs| {
        each_record(records, base_offset, base_timestamp, |record, entries| {
            for output in plugin.transform(record)? {
                let topic = topic_index(outputs, &output)?;
                output.encode(entries, record.index(), topic);
            }
            Ok(())
        })
    })
    .unwrap_or_else(not_started)
}

pub fn call_filter<T: Filter>(records: &[u8], base_offset: i64, base_timestamp: i64) -> BatchResult {
    with_state::<T, _>(|plugin, _| {
        each_record(records, base_offset, base_timestamp, |record, entries| {
            if let Some(output) = plugin.filter(record)? {
                output.encode(entries, record.index(), 0);
            }
            Ok(())
        })
    })
    .unwrap_or_else(not_started)
}

pub fn call_serializer<T: Serializer>(
    records: &[u8],
    base_offset: i64,
    base_timestamp: i64,
    encode: bool,
) -> BatchResult {
    with_state::<T, _>(|plugin, _| {
        each_record(records, base_offset, base_timestamp, |record, entries| {
            let output: Output = if encode { plugin.encode(record)? } else { plugin.decode(record)? };
            output.encode(entries, record.index(), 0);
            Ok(())
        })
    })
    .unwrap_or_else(not_started)
}

pub fn call_partitioner<T: Partitioner>(
    records: &[u8],
    base_offset: i64,
    base_timestamp: i64,
    partitions: u32,
) -> Result<Vec<u32>, (u32, String)> {
    with_state::<T, _>(|plugin, _| {
        let mut out = Vec::new();
        for record in Records::new(records, base_offset, base_timestamp) {
            let index = out.len() as u32;
            let partition =
                record.and_then(|r| plugin.partition(&r, partitions)).map_err(|e| (index, e.to_string()))?;
            if partition >= partitions {
                return Err((index, format!("partition {partition} is out of range: the topic has {partitions}")));
            }
            out.push(partition);
        }
        Ok(out)
    })
    .map_err(|e| (0, e))?
}

#[cfg(target_arch = "wasm32")]
pub fn to_wit(result: BatchResult) -> crate::__wasm::quiver::plugin::types::BatchOutput {
    use crate::__wasm::quiver::plugin::types::{BatchOutput, RecordError};
    BatchOutput { entries: result.entries, error: result.error.map(|(index, message)| RecordError { index, message }) }
}

#[cfg(target_arch = "wasm32")]
pub fn log(level: Level, message: &str) {
    use crate::__wasm::quiver::plugin::host::{Level as L, log};
    let level = match level {
        Level::Trace => L::Trace,
        Level::Debug => L::Debug,
        Level::Info => L::Info,
        Level::Warn => L::Warn,
        Level::Error => L::Error,
    };
    log(level, message);
}

#[cfg(not(target_arch = "wasm32"))]
pub fn log(level: Level, message: &str) {
    eprintln!("[{level:?}] {message}");
}
