//! Coalesced acknowledgements for one consumer channel.
//!
//! On a quorum queue every `basic.ack` is a Raft command of its own: it
//! costs the broker about as much as the delivery did (docs/rules.md,
//! "At-least-once delivery, deduplicated"). A handler that finished hands
//! its delivery here instead of acknowledging it; a flusher sends, at most `ACK_LINGER` later
//! (sooner once `batch` are waiting), one `basic.ack` with `multiple` for
//! the run of finished deliveries from the oldest unsettled one, and single
//! acks for finished deliveries beyond a gap (a message still in its
//! handler never holds back the others' acks).
//!
//! Nothing is acknowledged before its handler finished, so a crash loses
//! nothing: the broker redelivers what was not acked yet, and the handlers
//! deduplicate it, as for any redelivery. A nack goes out at once, before
//! its tag stops counting as unsettled: a `multiple` ack can never cover it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use lapin::{
    Acker,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};
use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// How long a finished delivery may wait for others to share its ack.
const ACK_LINGER: Duration = Duration::from_millis(5);

/// The acknowledgements of one channel's deliveries; cheap to clone.
#[derive(Clone)]
pub struct Acks {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// A delivery finished: the flusher wakes.
    finished: Notify,
    /// `batch` deliveries wait: the flusher stops lingering.
    full: Notify,
    /// The session ends: one last flush, and the flusher stops.
    closing: CancellationToken,
    batch: usize,
}

/// Which deliveries of the channel are unsettled, and which of those
/// finished. Pure bookkeeping, so that its rules are tested on their own.
struct State<A = Acker> {
    /// Delivered and neither acked nor nacked yet, in delivery-tag order.
    unsettled: BTreeSet<u64>,
    /// Of those, the ones whose handler finished, with their ackers.
    finished: BTreeMap<u64, A>,
}

/// What one flush sends.
struct Flush<A> {
    /// Acks every delivery up to its own, with `multiple`.
    multiple: Option<A>,
    /// Finished deliveries beyond an unfinished one, acked one by one.
    singles: Vec<A>,
}

impl<A> Default for State<A> {
    fn default() -> Self {
        Self {
            unsettled: BTreeSet::new(),
            finished: BTreeMap::new(),
        }
    }
}

impl<A> State<A> {
    /// A nack of `tag` was sent: it is settled, and no longer ends a run.
    fn nacked(&mut self, tag: u64) {
        self.unsettled.remove(&tag);
    }

    /// Takes every finished delivery out: the run from the oldest unsettled
    /// one as one `multiple` ack, the rest as single acks.
    fn take(&mut self) -> Flush<A> {
        let mut multiple = None;
        while let Some(&tag) = self.unsettled.first() {
            let Some(acker) = self.finished.remove(&tag) else {
                break;
            };
            self.unsettled.pop_first();
            multiple = Some(acker);
        }
        let singles = std::mem::take(&mut self.finished);
        for tag in singles.keys() {
            self.unsettled.remove(tag);
        }
        Flush {
            multiple,
            singles: singles.into_values().collect(),
        }
    }
}

impl Acks {
    /// Acks for a channel with `prefetch` unacknowledged deliveries at most:
    /// a quarter of those waiting end the linger, so the window never fills
    /// with finished messages. Its flusher runs as a task of its own (never
    /// cut off in the middle of a flush) until [`Acks::close`].
    pub fn start(prefetch: u16) -> (Self, JoinHandle<()>) {
        let acks = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                finished: Notify::new(),
                full: Notify::new(),
                closing: CancellationToken::new(),
                batch: usize::from(prefetch / 4).max(1),
            }),
        };
        let flusher = tokio::spawn(acks.clone().run());
        (acks, flusher)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock guards plain sets whose every change is complete; a
        // panic elsewhere cannot leave them half-changed.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a delivery as unsettled; called before its handler starts.
    pub fn delivered(&self, delivery: &Delivery) {
        self.state().unsettled.insert(delivery.delivery_tag);
    }

    /// The delivery's handler finished: it is acked with the next flush.
    pub fn ack(&self, delivery: &Delivery) {
        let waiting = {
            let mut state = self.state();
            state
                .finished
                .insert(delivery.delivery_tag, delivery.acker.clone());
            state.finished.len()
        };
        self.inner.finished.notify_one();
        if waiting >= self.inner.batch {
            self.inner.full.notify_one();
        }
    }

    /// Nacks the delivery at once; once the nack is sent, its tag no longer
    /// counts as unsettled. A nack that failed leaves it unsettled (the
    /// channel is gone, and no ack may cover a message in doubt).
    pub async fn nack(
        &self,
        delivery: &Delivery,
        options: BasicNackOptions,
    ) -> Result<(), lapin::Error> {
        if !delivery.nack(options).await? {
            return Err(channel_gone());
        }
        self.state().nacked(delivery.delivery_tag);
        // Deliveries after it may form a run now.
        self.inner.finished.notify_one();
        Ok(())
    }

    /// Sends the lingering acks and stops the flusher; called once the
    /// handlers in flight finished, before the channel closes.
    pub async fn close(&self, flusher: JoinHandle<()>) {
        self.inner.closing.cancel();
        if let Err(err) = flusher.await {
            tracing::error!(%err, "the ack flusher failed; the broker redelivers what it did not ack");
        }
    }

    /// Sends the acks of every finished delivery, one after the other (each
    /// on the wire before the next: a `multiple` never overtakes a single).
    async fn flush(&self) -> Result<(), lapin::Error> {
        let Flush { multiple, singles } = self.state().take();
        let multiple = multiple.map(|a| (a, BasicAckOptions { multiple: true }));
        let singles = singles.into_iter().map(|a| (a, BasicAckOptions::default()));
        for (acker, options) in multiple.into_iter().chain(singles) {
            // `false`: the channel is gone (its ackers are poisoned).
            if !acker.ack(options).await? {
                return Err(channel_gone());
            }
        }
        Ok(())
    }

    /// Flushes at most `ACK_LINGER` after a delivery finished, and once more
    /// on `close`. Ends early when an ack fails: the channel is gone, the
    /// session ends with it, and the broker redelivers what was not acked.
    async fn run(self) {
        let closing = &self.inner.closing;
        while !closing.is_cancelled() {
            tokio::select! {
                _ = closing.cancelled() => {}
                _ = self.inner.finished.notified() => {
                    tokio::select! {
                        _ = closing.cancelled() => {}
                        _ = self.inner.full.notified() => {}
                        _ = tokio::time::sleep(ACK_LINGER) => {}
                    }
                }
            }
            if let Err(err) = self.flush().await {
                tracing::debug!(%err, "acks not sent; the broker redelivers those messages");
                return;
            }
        }
    }
}

/// The error of an ack or nack that lapin refused: its channel is closed.
fn channel_gone() -> lapin::Error {
    lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "acknowledgement refused")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(delivered: &[u64], finished: &[u64]) -> State<u64> {
        State {
            unsettled: delivered.iter().copied().collect(),
            finished: finished.iter().map(|&t| (t, t)).collect(),
        }
    }

    #[test]
    fn the_run_from_the_oldest_unsettled_is_one_multiple_ack() {
        let mut s = state(&[3, 4, 5, 6], &[3, 4, 5]);
        let f = s.take();
        assert_eq!(f.multiple, Some(5));
        assert!(f.singles.is_empty());
        assert_eq!(s.unsettled.iter().copied().collect::<Vec<_>>(), [6]);
        assert!(s.finished.is_empty());
    }

    #[test]
    fn a_delivery_still_in_its_handler_is_never_covered_and_holds_back_no_one() {
        // 2 is still being handled: 1 goes as a multiple ack, 3 and 5 alone.
        let mut s = state(&[1, 2, 3, 4, 5], &[1, 3, 5]);
        let f = s.take();
        assert_eq!(f.multiple, Some(1));
        assert_eq!(f.singles, [3, 5]);
        assert_eq!(s.unsettled.iter().copied().collect::<Vec<_>>(), [2, 4]);
        // 2 finishes: it alone is the oldest run (3 is settled already).
        s.finished.insert(2, 2);
        let f = s.take();
        assert_eq!(f.multiple, Some(2));
        assert!(f.singles.is_empty());
        assert_eq!(s.unsettled.iter().copied().collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn nothing_finished_sends_nothing() {
        let mut s = state(&[7, 8], &[]);
        let f = s.take();
        assert_eq!(f.multiple, None);
        assert!(f.singles.is_empty());
        assert_eq!(s.unsettled.len(), 2);
    }

    #[test]
    fn a_nacked_delivery_no_longer_blocks_the_run() {
        // 1 is in its handler: 2 and 3 could only go one by one.
        let mut s = state(&[1, 2, 3], &[2, 3]);
        // 1's nack was sent: 2 and 3 form a run, and 1 is never covered.
        s.nacked(1);
        let f = s.take();
        assert_eq!(f.multiple, Some(3));
        assert!(f.singles.is_empty());
        assert!(s.unsettled.is_empty());
    }
}
