//! What a deployed plugin tells its operator: a bounded log and counters.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Lines kept per plugin; older ones are dropped (and counted).
pub const LOG_LINES_MAX: usize = 1000;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LogLine {
    /// Increases by one per line, across drops: `logs --since N` resumes.
    pub seq: u64,
    pub timestamp_ms: i64,
    pub level: String,
    pub message: String,
}

/// Counters, updated by every instance of the plugin.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub calls: u64,
    pub records_in: u64,
    pub records_out: u64,
    /// Records refused by the plugin, traps, deadlines and memory caps.
    pub errors: u64,
    pub busy_ns: u64,
}

/// Shared by all instances of one deployed plugin.
#[derive(Debug, Default)]
pub struct Monitor {
    lines: Mutex<VecDeque<LogLine>>,
    next_seq: AtomicU64,
    calls: AtomicU64,
    records_in: AtomicU64,
    records_out: AtomicU64,
    errors: AtomicU64,
    busy_ns: AtomicU64,
}

impl Monitor {
    pub fn log(&self, level: &str, message: impl Into<String>) {
        let mut message = message.into();
        message.truncate(message.floor_char_boundary(4096));
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if lines.len() == LOG_LINES_MAX {
            lines.pop_front();
        }
        lines.push_back(LogLine { seq, timestamp_ms: now_ms(), level: level.to_owned(), message });
    }

    /// Lines with `seq >= since`, oldest first.
    pub fn lines_since(&self, since: u64) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().filter(|l| l.seq >= since).cloned().collect()
    }

    pub(crate) fn record_call(&self, records_in: usize, records_out: usize, busy: std::time::Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.records_in.fetch_add(records_in as u64, Ordering::Relaxed);
        self.records_out.fetch_add(records_out as u64, Ordering::Relaxed);
        self.busy_ns.fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Counts output records (known once the caller decoded them).
    pub fn record_output(&self, records: usize) {
        self.records_out.fetch_add(records as u64, Ordering::Relaxed);
    }

    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        Stats {
            calls: self.calls.load(Ordering::Relaxed),
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
