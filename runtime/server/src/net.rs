//! The broker's QUIC endpoint: accepts connections, and for every
//! bidirectional stream reads one request frame, asks the broker, and writes
//! the response frame. The frame size limit is checked before the body is
//! read, so an oversized request costs the broker nothing.

use std::sync::Arc;

use quiver_broker::{AppendOrder, AppendTurn, Broker};
use quiver_protocol::frame::{LENGTH_PREFIX_BYTES, encode_error_response, frame_len};
use quiver_protocol::messages::ApiKey;
use quiver_protocol::{ErrorCode, WireError};
use tokio::sync::watch;
use tracing::Instrument;

/// Serves until `shutdown` turns true, then closes the endpoint.
pub async fn serve(endpoint: quinn::Endpoint, broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let broker = broker.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => {
                            let span = tracing::debug_span!("connection", %remote);
                            serve_connection(conn, broker).instrument(span).await;
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

async fn serve_connection(conn: quinn::Connection, broker: Arc<Broker>) {
    // A peer that presented a certificate passed the verifier, so it chains
    // to the cluster CA: it is another node.
    let node_peer = conn.peer_identity().is_some();
    tracing::debug!(node_peer, "connection open");
    let mut order = AppendOrder::default();
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(reason = %e, "connection closed");
                return;
            }
        };
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
        let broker = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(send, recv, head, turn, node_peer, &broker).await {
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

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    head: Head,
    turn: Option<AppendTurn>,
    node_peer: bool,
    broker: &Arc<Broker>,
) -> anyhow::Result<()> {
    let limit = broker.config().frame_bytes_max;
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
        Some(key) if (key == ApiKey::Controller as u16 || key == ApiKey::ReplicaFetch as u16) && !node_peer => {
            let _ = recv.stop(0u32.into());
            encode_error_response(&WireError::new(
                ErrorCode::NotAuthorized,
                "the controller and replication APIs are for cluster nodes: connect with a node certificate of \
                 the cluster CA",
            ))
        }
        Some(key) => {
            // The API key was read already; the rest goes to the broker as is.
            let rest = quiver_client::read_body(&mut recv, head.len - 2).await?;
            broker.handle_after_key(key, rest, turn).await
        }
    };
    let mut response = response;
    send.write_all_chunks(&mut response).await?;
    send.finish()?;
    Ok(())
}
