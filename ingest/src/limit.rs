//! The in-flight limit of the API (`ingest.max_in_flight`): a request gets a
//! permit at once or is shed. The limit is fixed, or adapts (the default)
//! between `ingest.min_in_flight` and `ingest.max_in_flight` to the latency
//! the admitted requests see, so that overload is answered early instead of
//! queued in front of the database (docs/http-api.md, "Overload and slow clients").
//!
//! The adaptation is TCP Vegas as `tower_acc::Vegas` implements it: the
//! smallest latency seen is the no-load baseline, and a latency above it
//! means requests are queueing behind each other, so the limit shrinks;
//! near it, the limit grows. tower-acc's own layer waits for a permit, while
//! ingest sheds, so only its algorithm is used here.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_acc::{Algorithm, Vegas};

/// Vegas forgets its no-load baseline every `PROBE_MULTIPLIER x limit`
/// answers (times a jitter of 0.5 to 1), so that it follows a database that
/// got slower for good. tower-acc's 30 means several times a second under
/// load, and each time the baseline becomes a loaded latency and the limit
/// climbs; 500 is every few seconds.
const PROBE_MULTIPLIER: usize = 500;

/// How far one answer moves the limit towards Vegas' new value.
const SMOOTHING: f64 = 0.2;

/// Admits requests up to the current limit.
#[derive(Clone)]
pub(crate) struct InFlight {
    semaphore: Arc<Semaphore>,
    control: Arc<Mutex<Control>>,
}

struct Control {
    /// `None`: the limit stays at `max`.
    vegas: Option<Vegas>,
    /// Permits the semaphore holds in all (free and taken).
    limit: usize,
    min: usize,
    max: usize,
    /// Shows the limit (`entrip_ingest_in_flight_limit`).
    gauge: IntGauge,
}

/// A request's right to run; hand it back with [`Permit::finish`] so that
/// its latency counts (a dropped one, from a client gone away or an answer
/// that is not a measure of the work, does not).
pub(crate) struct Permit {
    permit: OwnedSemaphorePermit,
    started: Instant,
    control: Arc<Mutex<Control>>,
}

impl InFlight {
    /// A limit between `min` and `max` that adapts, or `max` fixed when
    /// `adaptive` is false. Both start at `max`: a burst on a quiet service
    /// is admitted, and queueing, once seen, shrinks the limit.
    pub(crate) fn new(adaptive: bool, min: usize, max: usize, gauge: IntGauge) -> Self {
        let max = max.max(1);
        let min = min.clamp(1, max);
        let limit = max;
        let vegas = adaptive.then(|| {
            // Steps of one: tower-acc's default jumps by 6 whenever one
            // answer comes near the baseline, and on a busy machine that
            // keeps the queue (and the tail latency) long. Each answer moves
            // the limit a fifth of a step (SMOOTHING): a stall of a few
            // dozen slow answers costs a few permits, not dozens.
            Vegas::builder()
                .initial_limit(max)
                // Smoothing nears its bound without reaching it: one above
                // `max` lets the limit get back to `max` itself.
                .max_limit(max.saturating_add(1))
                .smoothing(SMOOTHING)
                .threshold(|_| 0)
                .increase(|limit| limit + 1.0)
                .decrease(|limit| limit - 1.0)
                .probe_multiplier(PROBE_MULTIPLIER)
                .build()
        });
        gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
        Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            control: Arc::new(Mutex::new(Control {
                vegas,
                limit,
                min,
                max,
                gauge,
            })),
        }
    }

    /// A permit if fewer than the limit are taken; never waits.
    pub(crate) fn try_acquire(&self) -> Option<Permit> {
        let permit = self.semaphore.clone().try_acquire_owned().ok()?;
        Some(Permit {
            permit,
            started: Instant::now(),
            control: self.control.clone(),
        })
    }

    /// The current limit.
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .limit
    }
}

impl Permit {
    /// Counts the request's latency, then frees the permit. `failed`: the
    /// answer was a server error (the database is down, the deadline
    /// passed), which shrinks the limit.
    pub(crate) fn finish(self, failed: bool) {
        let rtt = self.started.elapsed();
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        control.update(self.permit.semaphore(), rtt, failed);
    }
}

impl Control {
    fn update(&mut self, semaphore: &Semaphore, rtt: Duration, failed: bool) {
        let Some(vegas) = self.vegas.as_mut() else {
            return;
        };
        // The finishing request still holds its permit, so it counts.
        let in_flight = self.limit.saturating_sub(semaphore.available_permits());
        vegas.update(rtt, in_flight, failed, false);
        let wanted = vegas.max_concurrency().clamp(self.min, self.max);
        if wanted > self.limit {
            semaphore.add_permits(wanted - self.limit);
            self.limit = wanted;
        } else if wanted < self.limit {
            // Only free permits can go; the rest go as they come back.
            self.limit -= semaphore.forget_permits(self.limit - wanted);
        }
        self.gauge
            .set(i64::try_from(self.limit).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> IntGauge {
        IntGauge::new("limit", "limit").unwrap()
    }

    /// Runs `n` rounds of `limit` requests at once, each taking `rtt`.
    fn rounds(limiter: &InFlight, n: usize, rtt: impl Fn(usize) -> Duration) {
        for _ in 0..n {
            let permits: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
            assert_eq!(permits.len(), limiter.limit(), "every permit was taken");
            for mut p in permits {
                p.started = Instant::now() - rtt(limiter.limit());
                p.finish(false);
            }
        }
    }

    #[test]
    fn a_fixed_limit_sheds_beyond_max_and_never_moves() {
        let g = gauge();
        let limiter = InFlight::new(false, 2, 8, g.clone());
        let held: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
        assert_eq!(held.len(), 8);
        assert!(limiter.try_acquire().is_none(), "the ninth is shed");
        for p in held {
            p.finish(true);
        }
        assert_eq!(limiter.limit(), 8);
        assert_eq!(g.get(), 8);
        rounds(&limiter, 20, |_| Duration::from_secs(1));
        assert_eq!(limiter.limit(), 8);
    }

    /// Each admitted request waits for the ones before it, as in front of
    /// a saturated database: 2 ms for the first (the no-load baseline).
    fn queueing(limit: usize) -> Duration {
        Duration::from_millis(2 * limit as u64)
    }

    #[test]
    fn queueing_latency_shrinks_the_limit_to_a_short_queue() {
        let g = gauge();
        let limiter = InFlight::new(true, 1, 20, g.clone());
        assert_eq!(limiter.limit(), 20, "starts at ingest.max_in_flight");
        rounds(&limiter, 1, |_| Duration::from_millis(2));
        rounds(&limiter, 60, queueing);
        // Vegas keeps its estimate of the queue (limit x (1 - baseline /
        // latency)) between 3 and 6 below a limit of 100.
        let limit = limiter.limit();
        assert!((4..=8).contains(&limit), "{limit}");
        assert_eq!(g.get(), limit as i64);
    }

    #[test]
    fn the_limit_never_goes_below_its_floor() {
        let limiter = InFlight::new(true, 12, 20, gauge());
        rounds(&limiter, 1, |_| Duration::from_millis(2));
        rounds(&limiter, 60, queueing);
        assert_eq!(limiter.limit(), 12, "ingest.min_in_flight");
    }

    #[test]
    fn latency_back_at_the_baseline_grows_the_limit_back_to_max() {
        let limiter = InFlight::new(true, 1, 20, gauge());
        rounds(&limiter, 1, |_| Duration::from_millis(2));
        rounds(&limiter, 60, queueing);
        assert!(limiter.limit() < 10, "{}", limiter.limit());
        rounds(&limiter, 200, |_| Duration::from_millis(2));
        assert_eq!(limiter.limit(), 20, "up to ingest.max_in_flight");
    }

    #[test]
    fn server_errors_shrink_the_limit() {
        let limiter = InFlight::new(true, 1, 20, gauge());
        rounds(&limiter, 1, |_| Duration::from_millis(2));
        let before = limiter.limit();
        // At the baseline's latency: only the errors can shrink it.
        for _ in 0..10 {
            let permits: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
            for mut p in permits {
                p.started = Instant::now() - Duration::from_millis(2);
                p.finish(true);
            }
        }
        assert!(limiter.limit() < before, "{} < {before}", limiter.limit());
    }

    #[test]
    fn a_shrinking_limit_takes_back_taken_permits_as_they_return() {
        let limiter = InFlight::new(true, 2, 20, gauge());
        let mut held: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
        assert_eq!(held.len(), 20);
        // A baseline, then slow answers while every permit is out.
        held.pop().unwrap().finish(false);
        for mut p in held.drain(..10) {
            p.started = Instant::now() - Duration::from_secs(1);
            p.finish(false);
        }
        let limit = limiter.limit();
        assert!(limit < 20, "{limit}");
        let now: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
        assert_eq!(
            now.len() + held.len(),
            limit,
            "never more out than the limit"
        );
    }

    #[test]
    fn a_dropped_permit_is_freed_without_counting() {
        let limiter = InFlight::new(true, 2, 20, gauge());
        rounds(&limiter, 1, |_| Duration::from_millis(2));
        // Slow enough that counting them would shrink the limit (as the
        // finished ones in the test above do).
        let held: Vec<_> = std::iter::from_fn(|| limiter.try_acquire())
            .map(|mut p| {
                p.started = Instant::now() - Duration::from_secs(1);
                p
            })
            .collect();
        assert_eq!(held.len(), 20);
        drop(held);
        assert_eq!(limiter.limit(), 20);
        let again: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
        assert_eq!(again.len(), 20, "every dropped permit is free again");
    }
}
