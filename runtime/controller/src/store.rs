//! Durable storage of the metadata quorum, under `DATA_DIR/controller/`:
//!
//! - `vote.json`: the Raft vote, replaced atomically;
//! - `log.jsonl`: one JSON line per entry, appended and fsynced before
//!   openraft is told the entries are durable; a torn last line (a crash in
//!   the middle of a write) is dropped at open. Truncation and purging
//!   rewrite the file atomically (the metadata log is small, and both are
//!   rare). Its first line may record the last purged log id;
//! - `snapshot.json`: the last snapshot (applied log id, membership and the
//!   whole [`ClusterImage`]), replaced atomically.
//!
//! The state machine lives in memory; on start it is the snapshot, and
//! openraft re-applies the log after it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    RaftTypeConfig, SnapshotMeta, StorageError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::image::{ClusterImage, Command, Outcome};

/// The openraft type configurations this store serves: the crate's
/// [`TypeConfig`](crate::TypeConfig), or any other that differs from it only
/// in the Raft node id type. The store is generic for one reason: openraft's
/// storage test suite builds node ids from `u64`, and ours are `u32`.
///
/// Node ids must be `Copy` (both are integers) so that log ids are too.
pub trait StoreConfig:
    RaftTypeConfig<
        D = Command,
        R = Outcome,
        NodeId: Copy,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
        Entry = Entry<Self>,
    >
{
}

impl<C> StoreConfig for C where
    C: RaftTypeConfig<
            D = Command,
            R = Outcome,
            NodeId: Copy,
            Node = BasicNode,
            SnapshotData = Cursor<Vec<u8>>,
            Entry = Entry<C>,
        >
{
}

type StoreResult<C, T> = Result<T, StorageError<<C as RaftTypeConfig>::NodeId>>;

fn io_error<NID: openraft::NodeId>(
    subject: ErrorSubject<NID>,
    verb: ErrorVerb,
    e: std::io::Error,
) -> StorageError<NID> {
    StorageError::from_io_error(subject, verb, e)
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
enum LogLine<C: StoreConfig> {
    Purged(LogId<C::NodeId>),
    Entry(Entry<C>),
}

struct LogInner<C: StoreConfig> {
    path: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry<C>>,
    purged: Option<LogId<C::NodeId>>,
}

impl<C: StoreConfig> LogInner<C> {
    /// Rewrites the whole file from memory (after truncate or purge).
    fn rewrite(&mut self) -> std::io::Result<()> {
        let mut body = Vec::new();
        if let Some(p) = self.purged {
            serde_json::to_writer(&mut body, &LogLine::<C>::Purged(p)).expect("log line serialises");
            body.push(b'\n');
        }
        for e in self.entries.values() {
            serde_json::to_writer(&mut body, &LogLine::<C>::Entry(e.clone())).expect("log line serialises");
            body.push(b'\n');
        }
        write_atomic(&self.path, &body)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }
}

/// The Raft log and vote. Cloning shares the same log.
pub struct LogStore<C: StoreConfig> {
    inner: Arc<Mutex<LogInner<C>>>,
    vote_path: PathBuf,
}

// Not derived: the derive would require `C: Clone`.
impl<C: StoreConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore { inner: self.inner.clone(), vote_path: self.vote_path.clone() }
    }
}

impl<C: StoreConfig> LogStore<C> {
    pub fn open(dir: &Path) -> std::io::Result<LogStore<C>> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log.jsonl");
        let mut entries = BTreeMap::new();
        let mut purged = None;
        let mut torn = false;
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                match serde_json::from_str::<LogLine<C>>(&line) {
                    Ok(LogLine::Purged(p)) => purged = Some(p),
                    Ok(LogLine::Entry(e)) => {
                        entries.insert(e.log_id.index, e);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metadata log ends in a torn line; dropping it");
                        torn = true;
                        break;
                    }
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut inner = LogInner { path, file, entries, purged };
        if torn {
            inner.rewrite()?;
        }
        Ok(LogStore { inner: Arc::new(Mutex::new(inner)), vote_path: dir.join("vote.json") })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner<C>> {
        self.inner.lock().expect("metadata log lock")
    }
}

impl<C: StoreConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<C, Vec<Entry<C>>> {
        Ok(self.lock().entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl<C: StoreConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = LogStore<C>;

    async fn get_log_state(&mut self) -> StoreResult<C, LogState<C>> {
        let inner = self.lock();
        let last = inner.entries.values().next_back().map(|e| e.log_id).or(inner.purged);
        Ok(LogState { last_purged_log_id: inner.purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> StoreResult<C, ()> {
        let body = serde_json::to_vec(vote).expect("vote serialises");
        write_atomic(&self.vote_path, &body).map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> StoreResult<C, Option<Vote<C::NodeId>>> {
        match std::fs::read(&self.vote_path) {
            Ok(raw) => serde_json::from_slice(&raw).map(Some).map_err(|e| {
                io_error(ErrorSubject::Vote, ErrorVerb::Read, std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(ErrorSubject::Vote, ErrorVerb::Read, e)),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> StoreResult<C, ()>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut body = Vec::new();
        let mut added = Vec::new();
        for e in entries {
            serde_json::to_writer(&mut body, &LogLine::<C>::Entry(e.clone())).expect("log line serialises");
            body.push(b'\n');
            added.push(e);
        }
        let written = inner.file.write_all(&body).and_then(|_| inner.file.sync_data());
        if let Err(e) = written {
            let err = io_error(ErrorSubject::Logs, ErrorVerb::Write, std::io::Error::new(e.kind(), e.to_string()));
            callback.log_io_completed(Err(e));
            return Err(err);
        }
        for e in added {
            inner.entries.insert(e.log_id.index, e);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> StoreResult<C, ()> {
        let mut inner = self.lock();
        inner.entries.retain(|i, _| *i < log_id.index);
        inner.rewrite().map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> StoreResult<C, ()> {
        let mut inner = self.lock();
        inner.entries.retain(|i, _| *i > log_id.index);
        inner.purged = Some(log_id);
        inner.rewrite().map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct SnapshotFile<C: StoreConfig> {
    last_applied: Option<LogId<C::NodeId>>,
    membership: StoredMembership<C::NodeId, BasicNode>,
    image: ClusterImage,
    snapshot_id: String,
}

// Not derived: the derive would require `C: Default`.
impl<C: StoreConfig> Default for SnapshotFile<C> {
    fn default() -> Self {
        SnapshotFile {
            last_applied: None,
            membership: StoredMembership::default(),
            image: ClusterImage::default(),
            snapshot_id: String::new(),
        }
    }
}

struct MachineInner<C: StoreConfig> {
    last_applied: Option<LogId<C::NodeId>>,
    membership: StoredMembership<C::NodeId, BasicNode>,
    image: ClusterImage,
    snapshot_count: u64,
}

/// The state machine: applies committed commands to the [`ClusterImage`] and
/// publishes every new image.
pub struct StateMachine<C: StoreConfig> {
    inner: Arc<Mutex<MachineInner<C>>>,
    snapshot_path: PathBuf,
    published: watch::Sender<Arc<ClusterImage>>,
}

// Not derived: the derive would require `C: Clone`.
impl<C: StoreConfig> Clone for StateMachine<C> {
    fn clone(&self) -> Self {
        StateMachine {
            inner: self.inner.clone(),
            snapshot_path: self.snapshot_path.clone(),
            published: self.published.clone(),
        }
    }
}

impl<C: StoreConfig> StateMachine<C> {
    pub fn open(dir: &Path) -> std::io::Result<StateMachine<C>> {
        std::fs::create_dir_all(dir)?;
        let snapshot_path = dir.join("snapshot.json");
        let snap: SnapshotFile<C> = match std::fs::read(&snapshot_path) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", snapshot_path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SnapshotFile::default(),
            Err(e) => return Err(e),
        };
        let published = watch::channel(Arc::new(snap.image.clone())).0;
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(MachineInner {
                last_applied: snap.last_applied,
                membership: snap.membership,
                image: snap.image,
                snapshot_count: 0,
            })),
            snapshot_path,
            published,
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterImage>> {
        self.published.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MachineInner<C>> {
        self.inner.lock().expect("state machine lock")
    }

    fn snapshot_of(inner: &MachineInner<C>) -> SnapshotFile<C> {
        let snapshot_id = match inner.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, inner.snapshot_count),
            None => format!("empty-{}", inner.snapshot_count),
        };
        SnapshotFile {
            last_applied: inner.last_applied,
            membership: inner.membership.clone(),
            image: inner.image.clone(),
            snapshot_id,
        }
    }

    fn to_snapshot(&self, file: &SnapshotFile<C>, body: Vec<u8>) -> Snapshot<C> {
        let _ = self;
        Snapshot {
            meta: SnapshotMeta {
                last_log_id: file.last_applied,
                last_membership: file.membership.clone(),
                snapshot_id: file.snapshot_id.clone(),
            },
            snapshot: Box::new(Cursor::new(body)),
        }
    }
}

impl<C: StoreConfig> RaftSnapshotBuilder<C> for StateMachine<C> {
    async fn build_snapshot(&mut self) -> StoreResult<C, Snapshot<C>> {
        let file = {
            let mut inner = self.lock();
            inner.snapshot_count += 1;
            Self::snapshot_of(&inner)
        };
        let body = serde_json::to_vec(&file).expect("snapshot serialises");
        write_atomic(&self.snapshot_path, &body)
            .map_err(|e| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(self.to_snapshot(&file, body))
    }
}

impl<C: StoreConfig> RaftStateMachine<C> for StateMachine<C> {
    type SnapshotBuilder = StateMachine<C>;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<C, (Option<LogId<C::NodeId>>, StoredMembership<C::NodeId, BasicNode>)> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<C, Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for e in entries {
            inner.last_applied = Some(e.log_id);
            let outcome = match e.payload {
                EntryPayload::Blank => Outcome::Done,
                EntryPayload::Normal(cmd) => inner.image.apply(e.log_id.index, &cmd),
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(e.log_id), m);
                    Outcome::Done
                }
            };
            out.push(outcome);
        }
        self.published.send_replace(Arc::new(inner.image.clone()));
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<C, Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<C::NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<C, ()> {
        let body = snapshot.into_inner();
        let file: SnapshotFile<C> = serde_json::from_slice(&body).map_err(|e| {
            io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        write_atomic(&self.snapshot_path, &body)
            .map_err(|e| io_error(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, e))?;
        let mut inner = self.lock();
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.image = file.image;
        self.published.send_replace(Arc::new(inner.image.clone()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<C, Option<Snapshot<C>>> {
        match std::fs::read(&self.snapshot_path) {
            Ok(body) => {
                let file: SnapshotFile<C> = serde_json::from_slice(&body).map_err(|e| {
                    io_error(
                        ErrorSubject::Snapshot(None),
                        ErrorVerb::Read,
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    )
                })?;
                Ok(Some(self.to_snapshot(&file, body)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e)),
        }
    }
}

/// Replaces `path` with `body` durably (temporary file, fsync, rename, fsync
/// of the directory).
fn write_atomic(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(path.parent().expect("a file has a directory"))?.sync_all()
}

#[cfg(test)]
mod suite;
