//! The broker's QUIC endpoint: accepts connections, and for every
//! bidirectional stream reads one request frame, asks the broker, and writes
//! the response frame. The frame size limit is checked before the body is
//! read, so an oversized request costs the broker nothing.

use std::sync::Arc;

use bytes::BytesMut;
use quiver_broker::Broker;
use quiver_protocol::frame::{LENGTH_PREFIX_BYTES, encode_error_response, frame_len};
use quiver_protocol::{ErrorCode, WireError};
use tokio::sync::watch;
use tracing::Instrument;

/// Serves until `shutdown` turns true, then closes the endpoint.
pub async fn serve(
    endpoint: quinn::Endpoint,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
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
    tracing::debug!("connection open");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let broker = broker.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(send, recv, &broker).await {
                        tracing::debug!(error = %e, "stream ended early");
                    }
                });
            }
            Err(e) => {
                tracing::debug!(reason = %e, "connection closed");
                return;
            }
        }
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    broker: &Broker,
) -> anyhow::Result<()> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    recv.read_exact(&mut prefix).await?;
    let len = frame_len(prefix);
    let limit = broker.config().frame_bytes_max;
    let response = if len > limit {
        let _ = recv.stop(0u32.into());
        encode_error_response(&WireError::new(
            ErrorCode::FrameTooLarge,
            format!("request of {len} bytes exceeds the broker's limit of {limit} bytes"),
        ))
    } else {
        let mut body = BytesMut::zeroed(len);
        recv.read_exact(&mut body).await?;
        broker.handle(body.freeze()).await
    };
    send.write_all(&response).await?;
    send.finish()?;
    Ok(())
}
