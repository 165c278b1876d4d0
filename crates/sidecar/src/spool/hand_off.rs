//! Freshly stored rows, handed to their destination's dispatcher in memory as they are committed, so
//! that it need not read back the body it has just seen stored (one round trip through the spool's
//! writer and one copy of the body less per notification).
//!
//! The spool stays the only source of truth: a hand-off is a hint that a row is due. Whatever the
//! hand-off does not carry (it is full, or the commit queued a stored repeat) is marked [missed], and
//! the dispatcher looks in the spool instead.
//!
//! What keeps a row from being started twice, once from here and once from a due query: the spool
//! offers each committed row here *before* it serves any later read, and the dispatcher takes
//! everything waiting here right after each due query's reply, before it sorts the reply out against
//! the rows it is attempting. So a row that is in a reply is, by then, either started from here or was
//! never here; and a row stays in the dispatcher's in-flight set until its outcome is committed.
//!
//! [missed]: HandOff::take_missed

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::DueDelivery;

/// Bodies held in one hand-off at most: beyond it rows wait only in the spool. Bounds the memory a
/// busy destination holds beside the spool (about 50 notifications of 20 KB).
pub const MAX_HELD_BYTES: usize = 1 << 20;

#[derive(Default)]
struct State {
    /// Committed rows that were not offered or did not fit since the dispatcher last looked.
    missed: AtomicBool,
    /// Body bytes sent and not yet taken.
    held_bytes: AtomicUsize,
    /// The dispatcher is behind (the spool holds more due rows than it has slots for): rows are not
    /// offered, only marked missed. Fresh rows would only wait behind the older ones and be dropped.
    behind: AtomicBool,
}

/// The spool's end: offers committed rows.
pub struct Offers {
    rows: mpsc::Sender<DueDelivery>,
    state: Arc<State>,
}

/// The dispatcher's end.
pub struct HandOff {
    rows: mpsc::Receiver<DueDelivery>,
    state: Arc<State>,
}

/// A pair of ends holding up to `capacity` rows.
pub fn channel(capacity: usize) -> (Offers, HandOff) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let state = Arc::new(State::default());
    (Offers { rows: tx, state: state.clone() }, HandOff { rows: rx, state })
}

impl Offers {
    /// Hands `row` over if it fits; otherwise marks it missed.
    pub fn offer(&self, row: DueDelivery) {
        if self.state.behind.load(Ordering::SeqCst) {
            self.mark_missed();
            return;
        }
        let size = row.body.len();
        let held = self.state.held_bytes.fetch_add(size, Ordering::SeqCst);
        // A single body larger than the budget is never held.
        if held + size > MAX_HELD_BYTES || self.rows.try_send(row).is_err() {
            self.state.held_bytes.fetch_sub(size, Ordering::SeqCst);
            self.mark_missed();
        }
    }

    /// Says that a commit changed this destination's due rows without handing them over.
    pub fn mark_missed(&self) {
        self.state.missed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.rows.is_closed()
    }
}

impl HandOff {
    /// The next row, waiting for one.
    pub async fn recv(&mut self) -> Option<DueDelivery> {
        let row = self.rows.recv().await?;
        self.state.held_bytes.fetch_sub(row.body.len(), Ordering::SeqCst);
        Some(row)
    }

    /// The next row if one is waiting.
    pub fn try_recv(&mut self) -> Option<DueDelivery> {
        let row = self.rows.try_recv().ok()?;
        self.state.held_bytes.fetch_sub(row.body.len(), Ordering::SeqCst);
        Some(row)
    }

    /// Up to `at_most` rows that are waiting, without waiting for more.
    pub fn take(&mut self, at_most: usize) -> Vec<DueDelivery> {
        let mut rows = Vec::new();
        while rows.len() < at_most {
            match self.try_recv() {
                Some(row) => rows.push(row),
                None => break,
            }
        }
        rows
    }

    /// Whether rows were missed since the last call (which clears it): the spool must be looked in.
    /// Call it before the look, so a row missed during the look is seen by the next call.
    pub fn take_missed(&self) -> bool {
        self.state.missed.swap(false, Ordering::SeqCst)
    }

    /// Says whether the dispatcher is behind, i.e. left due rows in the spool for want of slots: until
    /// it says otherwise new rows are only marked missed.
    pub fn set_behind(&self, behind: bool) {
        self.state.behind.store(behind, Ordering::SeqCst);
    }

    /// Whether rows were missed, without clearing it.
    pub fn missed(&self) -> bool {
        self.state.missed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn row(id: i64, size: usize) -> DueDelivery {
        DueDelivery { notification_id: id, received_at: 0, attempts: 0, body: Bytes::from(vec![b'x'; size]) }
    }

    #[test]
    fn what_does_not_fit_is_marked_missed_and_bytes_are_given_back_when_taken() {
        let (offers, mut hand_off) = channel(2);
        offers.offer(row(1, 10));
        offers.offer(row(2, 10));
        assert!(!hand_off.missed());
        offers.offer(row(3, 10));
        assert!(hand_off.take_missed(), "the third row did not fit");
        assert!(!hand_off.take_missed(), "taking clears it");
        assert_eq!(hand_off.try_recv().map(|r| r.notification_id), Some(1));
        assert_eq!(hand_off.try_recv().map(|r| r.notification_id), Some(2));
        assert!(hand_off.try_recv().is_none());
        assert_eq!(hand_off.state.held_bytes.load(Ordering::SeqCst), 0);

        offers.offer(row(4, MAX_HELD_BYTES - 5));
        offers.offer(row(5, 10));
        assert!(hand_off.take_missed(), "over the byte budget");
        assert_eq!(hand_off.try_recv().map(|r| r.notification_id), Some(4));
        assert!(hand_off.try_recv().is_none());
        offers.offer(row(6, MAX_HELD_BYTES + 1));
        assert!(hand_off.take_missed(), "a body larger than the budget is never held");
        assert_eq!(hand_off.state.held_bytes.load(Ordering::SeqCst), 0);

        hand_off.set_behind(true);
        offers.offer(row(7, 10));
        assert!(hand_off.take_missed() && hand_off.try_recv().is_none(), "a dispatcher behind is offered nothing");
        hand_off.set_behind(false);
        offers.offer(row(8, 10));
        assert_eq!(hand_off.try_recv().map(|r| r.notification_id), Some(8));

        assert!(!offers.is_closed());
        drop(hand_off);
        assert!(offers.is_closed(), "the dispatcher is gone");
    }
}
