//! The broker's QUIC endpoint: accepts connections, and for every
//! bidirectional stream reads one request frame, asks the broker, and writes
//! the response frame. The frame size limit is checked before the body is
//! read, so an oversized request costs the broker nothing.
//!
//! Memory for requests is bounded broker-wide: body bytes take room in one
//! budget (`request_bytes_in_flight_max`) as they arrive — a declared length
//! takes none, and past 8 MiB reserves no buffer either — and give it back
//! once the answer is written; a request must arrive whole within
//! `request_read_timeout_ms`. So connections that declare large bodies and
//! send slowly hold only what they sent, and only for a while.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quiver_broker::{AppendOrder, AppendTurn, Broker, Principal, RequestContext};
use quiver_protocol::frame::{LENGTH_PREFIX_BYTES, encode_error_response, frame_len};
use quiver_protocol::messages::ApiKey;
use quiver_protocol::{ErrorCode, WireError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, watch};
use tokio::time::Instant;
use tracing::Instrument;

/// Serves until `shutdown` turns true, then closes the endpoint.
pub async fn serve(endpoint: quinn::Endpoint, broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let budget = Arc::new(Semaphore::new(broker.config().request_bytes_in_flight_max));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let (broker, budget) = (broker.clone(), budget.clone());
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => {
                            let span = tracing::debug_span!("connection", %remote);
                            serve_connection(conn, broker, budget).instrument(span).await;
                        }
                        Err(e) => tracing::info!(%remote, error = %e, "connection failed during handshake"),
                    }
                });
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    endpoint.close(0u32.into(), b"broker shutting down");
}

/// Numbers connections for their requests' context.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Who is on the other end: a certificate passed the verifier, so it chains
/// to the cluster CA; its subject names a node or a user. No certificate:
/// anonymous.
fn principal_of(conn: &quinn::Connection) -> Principal {
    let Some(identity) = conn.peer_identity() else {
        return Principal::Anonymous;
    };
    let Ok(chain) = identity.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>() else {
        return Principal::Anonymous;
    };
    let name = chain.first().and_then(|leaf| {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
        let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
        Some(name)
    });
    match name {
        Some(name) => Principal::from_common_name(&name),
        // Verified, but without a readable common name: a user without one.
        None => Principal::User(String::new()),
    }
}

async fn serve_connection(conn: quinn::Connection, broker: Arc<Broker>, budget: Arc<Semaphore>) {
    let context = Arc::new(RequestContext {
        principal: principal_of(&conn),
        peer: Some(conn.remote_address()),
        connection: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
    });
    tracing::debug!(principal = %context.principal, connection = context.connection, "connection open");
    let mut order = AppendOrder::default();
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(reason = %e, "connection closed");
                return;
            }
        };
        let deadline = Instant::now() + Duration::from_millis(broker.config().request_read_timeout_ms);
        // Streams are accepted in the order the client opened them. Reading
        // the length and API key here, before the next accept, is what lets
        // produce requests take append tickets in that order.
        let head = tokio::time::timeout(HEAD_READ_TIMEOUT, read_head(&mut recv)).await;
        let head = match head {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "stream ended before a frame header");
                continue;
            }
            Err(_) => {
                let _ = recv.stop(0u32.into());
                tracing::debug!("no frame header within {HEAD_READ_TIMEOUT:?}");
                continue;
            }
        };
        let turn = (head.api_key == Some(ApiKey::Produce as u16)).then(|| order.ticket());
        let (broker, budget, context) = (broker.clone(), budget.clone(), context.clone());
        tokio::spawn(async move {
            let request = Request { head, turn, context, deadline };
            if let Err(e) = serve_stream(send, recv, request, &broker, &budget).await {
                tracing::debug!(error = %e, "stream ended early");
            }
        });
    }
}

const HEAD_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

struct Head {
    len: usize,
    /// `None` when the frame is too short to hold one.
    api_key: Option<u16>,
}

async fn read_head(recv: &mut quinn::RecvStream) -> anyhow::Result<Head> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    recv.read_exact(&mut prefix).await?;
    let len = frame_len(prefix);
    if len < 2 {
        return Ok(Head { len, api_key: None });
    }
    let mut key = [0u8; 2];
    recv.read_exact(&mut key).await?;
    Ok(Head { len, api_key: Some(u16::from_be_bytes(key)) })
}

/// A request stream whose head was read.
struct Request {
    head: Head,
    /// A produce request's place in its connection's append order.
    turn: Option<AppendTurn>,
    context: Arc<RequestContext>,
    /// The whole request must have arrived by then.
    deadline: Instant,
}

/// Why a request body was not read whole.
enum BodyError {
    /// The stream failed or ended early: nobody is left to answer.
    Stream(String),
    /// Answered: the deadline passed, or the budget had no room in time.
    Refused(WireError),
}

/// Bodies up to this size get their whole buffer when they start (an
/// ordinary produce request is copied once, into place); a larger declared
/// length reserves nothing: its buffer grows with what arrives.
const BODY_RESERVE_AT_ONCE_MAX: usize = 8 * 1024 * 1024;

/// Reads a body of `len` bytes as it arrives, taking room in `budget` for
/// each piece, until `deadline`. The permit holds the body's room until it
/// is dropped.
async fn read_body(
    recv: &mut quinn::RecvStream,
    len: usize,
    budget: &Arc<Semaphore>,
    deadline: Instant,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), BodyError> {
    let mut body = BytesMut::with_capacity(len.min(BODY_RESERVE_AT_ONCE_MAX));
    let mut room: Option<OwnedSemaphorePermit> = None;
    while body.len() < len {
        let received = body.len();
        let chunk = match tokio::time::timeout_at(deadline, recv.read_chunk(len - received, true)).await {
            Ok(Ok(Some(chunk))) => chunk.bytes,
            Ok(Ok(None)) => return Err(BodyError::Stream(format!("stream ended after {received} of {len} bytes"))),
            Ok(Err(e)) => return Err(BodyError::Stream(e.to_string())),
            Err(_) => {
                return Err(BodyError::Refused(WireError::new(
                    ErrorCode::RequestTimedOut,
                    format!("request not received in time: {received} of {len} body bytes arrived"),
                )));
            }
        };
        // A chunk is at most a packet's payload, far below u32::MAX.
        let n = chunk.len() as u32;
        let permit = match budget.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                match tokio::time::timeout_at(deadline, budget.clone().acquire_many_owned(n)).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) | Err(_) => return Err(BodyError::Refused(busy(budget))),
                }
            }
            Err(TryAcquireError::Closed) => return Err(BodyError::Refused(busy(budget))),
        };
        match &mut room {
            Some(room) => room.merge(permit),
            None => room = Some(permit),
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), room))
}

fn busy(budget: &Semaphore) -> WireError {
    WireError::new(
        ErrorCode::BrokerBusy,
        format!(
            "the broker is busy: its room for request bytes in flight stayed full ({} bytes free); retry shortly",
            budget.available_permits()
        ),
    )
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    request: Request,
    broker: &Arc<Broker>,
    budget: &Arc<Semaphore>,
) -> anyhow::Result<()> {
    let Request { head, turn, context, deadline } = request;
    let limit = broker.config().frame_bytes_max;
    // The body's room in the budget, given back once the answer is written.
    let mut room = None;
    let response = match head.api_key {
        _ if head.len > limit => {
            let _ = recv.stop(0u32.into());
            encode_error_response(&WireError::new(
                ErrorCode::FrameTooLarge,
                format!("request of {} bytes exceeds the broker's limit of {limit} bytes", head.len),
            ))
        }
        None => encode_error_response(&WireError::new(
            ErrorCode::CorruptMessage,
            format!("request frame of {} bytes is too short for a header", head.len),
        )),
        // The API key was read already; the rest goes to the broker as is.
        Some(key) => match read_body(&mut recv, head.len - 2, budget, deadline).await {
            Ok((rest, held)) => {
                room = held;
                broker.handle_after_key(&context, key, rest, turn).await
            }
            Err(BodyError::Refused(error)) => {
                let _ = recv.stop(0u32.into());
                tracing::debug!(%error, "request refused before it was read");
                encode_error_response(&error)
            }
            Err(BodyError::Stream(reason)) => anyhow::bail!(reason),
        },
    };
    let mut response = response;
    send.write_all_chunks(&mut response).await?;
    send.finish()?;
    drop(room);
    Ok(())
}
