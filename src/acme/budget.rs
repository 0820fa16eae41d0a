//! The process-wide order budget: at most [`ORDERS`] new orders in any
//! [`WINDOW`], across every host, `portcullis renew` included (certmagic
//! keeps the same kind of limit). Whatever goes wrong — a clock years ahead
//! that makes every new certificate look due, a CA that keeps answering
//! with certificates it should not, a bug of ours — can only spend the CA's
//! rate limits this fast (Let's Encrypt allows 5 certificates per exact set
//! of names per week and 300 new orders per account per 3 hours).
//!
//! One budget lives as long as the server: a reload that restarts every ACME
//! task does not refill it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::info;

/// New orders allowed in any [`WINDOW`].
pub const ORDERS: usize = 10;
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct OrderBudget {
    limit: usize,
    window: Duration,
    /// When each of the orders in the current window was let through, oldest first.
    spent: Mutex<VecDeque<Instant>>,
}

impl Default for OrderBudget {
    fn default() -> Self {
        OrderBudget::new(ORDERS, WINDOW)
    }
}

impl OrderBudget {
    pub fn new(limit: usize, window: Duration) -> OrderBudget {
        OrderBudget {
            limit: limit.max(1),
            window,
            spent: Mutex::new(VecDeque::new()),
        }
    }

    /// Waits until one more order fits, then counts it. Waiters are let
    /// through in the order they came (the lock is held while waiting).
    pub async fn take(&self) {
        let mut spent = self.spent.lock().await;
        loop {
            let now = Instant::now();
            while spent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                spent.pop_front();
            }
            if spent.len() < self.limit {
                spent.push_back(now);
                return;
            }
            // The queue is full, so it has a front.
            let Some(oldest) = spent.front().copied() else {
                continue;
            };
            let until = oldest + self.window;
            info!(
                limit = self.limit,
                window = %humantime::format_duration(self.window),
                wait_ms = until.duration_since(now).as_millis() as u64,
                "order budget spent: the next order waits"
            );
            tokio::time::sleep_until(until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn ten_orders_a_minute_then_each_waits_for_a_slot() {
        let budget = Arc::new(OrderBudget::default());
        let start = Instant::now();
        for _ in 0..ORDERS {
            budget.take().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the first ten at once");
        // Twelve more, from several hosts at once: they go in slots as the
        // first orders leave the window.
        let mut waits = Vec::new();
        for _ in 0..12 {
            let b = budget.clone();
            waits.push(tokio::spawn(async move {
                b.take().await;
                start.elapsed()
            }));
        }
        let mut got = Vec::new();
        for w in waits {
            got.push(w.await.unwrap());
        }
        got.sort();
        assert_eq!(&got[..10], &[WINDOW; 10], "ten more after a minute");
        assert_eq!(&got[10..], &[2 * WINDOW; 2], "the rest a minute later");
    }

    #[tokio::test(start_paused = true)]
    async fn spread_out_orders_never_wait() {
        let budget = OrderBudget::new(2, Duration::from_secs(60));
        let start = Instant::now();
        for i in 0..6u64 {
            budget.take().await;
            assert_eq!(start.elapsed(), Duration::from_secs(30 * i));
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }
}
