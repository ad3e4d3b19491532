//! What a pool has done: plain counters, for logs and for the metrics
//! exporter.

use std::time::Duration;

/// Buckets of the latency histogram: bucket `i` counts tasks that took less
/// than 2^i microseconds (and at least 2^(i-1)); the last one, the rest.
pub const LATENCY_BUCKETS: usize = 32;

/// A snapshot of a pool's counters ([`Pool::stats`](super::Pool::stats)).
///
/// For a pool on Redis, the counters of running tasks (`running`, `done`,
/// `failed`, `retried`, `requeued`, `recycled`) are this primary's workers';
/// those of submissions (`submitted`, `cancelled`, `refused_full`,
/// `latency`) are this process's; `queued` adds the tasks waiting in Redis
/// for any primary, as read at most about 50 ms ago.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Tasks waiting for a worker now.
    pub queued: usize,
    /// Tasks running on a worker now.
    pub running: usize,
    /// Workers taking tasks now.
    pub workers: usize,
    /// Tasks accepted since the start.
    pub submitted: u64,
    /// Tasks that produced their result.
    pub done: u64,
    /// Tasks that ended with an error (a handler error, or every attempt
    /// failed).
    pub failed: u64,
    /// Attempts that failed and were tried again (on another worker when
    /// the worker died or timed out).
    pub retried: u64,
    /// Tasks run again, without counting an attempt, because their worker
    /// left for a reason of no fault of theirs (it refused them while
    /// leaving, or the pool recycled it for another task's timeout).
    pub requeued: u64,
    /// Tasks whose submitter stopped waiting (removed from the queue, or
    /// signalled to their handler).
    pub cancelled: u64,
    /// Submissions refused because the queue was full (`try_submit`).
    pub refused_full: u64,
    /// Submissions refused because their worker already had
    /// [`MAX_WORKER_SUBMISSIONS`](super::MAX_WORKER_SUBMISSIONS) waiting.
    pub refused_worker_limit: u64,
    /// Workers the pool recycled (SIGKILL) because a task timed out.
    pub recycled: u64,
    /// A pool on Redis: tasks this primary took over from another primary
    /// that stopped answering while it held them.
    pub reclaimed: u64,
    /// A pool on Redis: tasks this primary had read and gave back to the
    /// queue because none of its workers could take them.
    pub given_back: u64,
    /// Time from submission to result of the tasks done.
    pub latency: Latency,
}

/// A histogram of task latencies with power-of-two buckets of microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latency {
    /// Tasks measured.
    pub count: u64,
    /// Their total time.
    pub total: Duration,
    /// `buckets[i]`: tasks that took under 2^i µs (and at least 2^(i-1)).
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            count: 0,
            total: Duration::ZERO,
            buckets: [0; LATENCY_BUCKETS],
        }
    }
}

impl Latency {
    pub(super) fn record(&mut self, took: Duration) {
        self.count += 1;
        self.total += took;
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (64 - micros.leading_zeros()) as usize;
        self.buckets[bucket.min(LATENCY_BUCKETS - 1)] += 1;
    }

    /// The mean, if anything was measured.
    pub fn mean(&self) -> Option<Duration> {
        let count = u32::try_from(self.count).ok().filter(|n| *n > 0)?;
        Some(self.total / count)
    }

    /// An upper bound of the `q` quantile (`0.5` for the median): the top
    /// of the bucket it falls in, so within a factor of two.
    ///
    /// ```
    /// # use procluster::pool::Latency;
    /// let latency = Latency::default();
    /// assert_eq!(latency.quantile(0.5), None);
    /// ```
    pub fn quantile(&self, q: f64) -> Option<std::time::Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(1u64 << i));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_fall_in_power_of_two_buckets() {
        let mut latency = Latency::default();
        for micros in [3, 5, 6, 7, 100, 1000] {
            latency.record(Duration::from_micros(micros));
        }
        assert_eq!(latency.count, 6);
        assert_eq!(latency.quantile(0.5), Some(Duration::from_micros(8)));
        assert_eq!(latency.quantile(1.0), Some(Duration::from_micros(1024)));
        assert_eq!(latency.mean(), Some(Duration::from_nanos(186_833)));
    }
}
