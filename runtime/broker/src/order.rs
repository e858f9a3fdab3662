//! Append order within one connection.
//!
//! Every request travels on its own QUIC stream, and the broker handles
//! streams concurrently, so two produce requests that a client sent one after
//! the other could be appended in the opposite order. TCP-based Kafka gets
//! order from the byte stream; here the transport hands out a ticket to each
//! produce stream in the order the client opened them (QUIC stream ids), and
//! a produce request appends only when its ticket's turn has come. Other
//! requests (fetches, admin) never wait for a turn.

use std::sync::Arc;

use tokio::sync::watch;

/// Hands out append tickets for one connection, in stream order.
pub struct AppendOrder {
    next_ticket: u64,
    turn: Arc<watch::Sender<u64>>,
}

impl Default for AppendOrder {
    fn default() -> Self {
        AppendOrder { next_ticket: 0, turn: Arc::new(watch::channel(0).0) }
    }
}

impl AppendOrder {
    /// The ticket of the next produce stream.
    pub fn ticket(&mut self) -> AppendTurn {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        AppendTurn { turn: self.turn.clone(), ticket, released: false }
    }
}

/// One produce request's place in its connection's append order. Dropping
/// it without [`AppendTurn::release`] (a failed request) still passes the
/// turn on once it comes, so later requests are never stuck.
pub struct AppendTurn {
    turn: Arc<watch::Sender<u64>>,
    ticket: u64,
    released: bool,
}

impl AppendTurn {
    /// Waits until every produce request opened before this one appended.
    pub async fn wait(&self) {
        let mut rx = self.turn.subscribe();
        let _ = rx.wait_for(|t| *t == self.ticket).await;
    }

    /// Lets the next produce request of the connection append.
    pub fn release(mut self) {
        self.advance();
    }

    fn advance(&mut self) {
        if !self.released {
            self.released = true;
            let ticket = self.ticket;
            self.turn.send_modify(|t| {
                debug_assert_eq!(*t, ticket, "turns are released in ticket order");
                *t = ticket + 1;
            });
        }
    }
}

impl Drop for AppendTurn {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if *self.turn.borrow() == self.ticket {
            self.advance();
            return;
        }
        let mut rest = AppendTurn { turn: self.turn.clone(), ticket: self.ticket, released: false };
        self.released = true;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                rest.wait().await;
                rest.advance();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_follow_ticket_order_even_when_dropped() {
        let mut order = AppendOrder::default();
        let (a, b, c) = (order.ticket(), order.ticket(), order.ticket());
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = log.clone();
        let third = tokio::spawn(async move {
            c.wait().await;
            l.lock().unwrap().push(3);
            c.release();
        });
        tokio::task::yield_now().await;
        drop(b); // a failed request in the middle
        assert!(log.lock().unwrap().is_empty(), "3 must wait for 1");
        a.wait().await;
        log.lock().unwrap().push(1);
        a.release();
        third.await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec![1, 3]);
    }
}
