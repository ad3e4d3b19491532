//! Restart delays, jitter sources and the crash-loop window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::config::BackoffConfig;

/// Source of uniformly distributed numbers in `[0, 1)` used for jitter.
///
/// Any `FnMut() -> f64 + Send` closure is a source, which makes tests
/// deterministic (`|| 0.5`). Values outside `[0, 1]` are clamped.
pub trait JitterSource: Send {
    /// Next sample in `[0, 1)`.
    fn unit(&mut self) -> f64;
}

impl<F: FnMut() -> f64 + Send> JitterSource for F {
    fn unit(&mut self) -> f64 {
        self()
    }
}

/// Small seeded pseudo-random generator (SplitMix64); the default jitter
/// source. Not cryptographic, only meant to decorrelate workers.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// Generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
}

impl JitterSource for SplitMix64 {
    fn unit(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Delay before restart `attempt` (1-based); see [`BackoffConfig`].
pub(super) fn restart_delay(cfg: &BackoffConfig, attempt: u32, unit: f64) -> Duration {
    let max = cfg.max.as_secs_f64();
    let raw = if cfg.initial.is_zero() {
        0.0
    } else {
        let exponent = attempt.saturating_sub(1).min(i32::MAX as u32) as i32;
        (cfg.initial.as_secs_f64() * cfg.multiplier.max(1.0).powi(exponent)).min(max)
    };
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    Duration::from_secs_f64(raw * (1.0 - cfg.jitter * unit))
}

/// Per-worker request limit: `max + k`, `k` in `0..=spread`.
pub(super) fn request_limit(max: u64, spread: u64, unit: f64) -> u64 {
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    let extra = ((unit * (spread as f64 + 1.0)) as u64).min(spread);
    max.saturating_add(extra)
}

/// Failure timestamps inside the breaker's sliding window.
#[derive(Debug, Default)]
pub(super) struct CrashWindow {
    times: VecDeque<Instant>,
}

impl CrashWindow {
    /// Records a failure at `now` and returns how many fall within `window`.
    pub(super) fn record(&mut self, now: Instant, window: Duration) -> usize {
        self.times.push_back(now);
        while let Some(&first) = self.times.front() {
            if now.saturating_duration_since(first) < window {
                break;
            }
            self.times.pop_front();
        }
        self.times.len()
    }

    /// Forgets every recorded failure.
    pub(super) fn clear(&mut self) {
        self.times.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.5,
        }
    }

    #[test]
    fn delay_grows_and_caps() {
        let got: Vec<_> = (1..=6).map(|n| restart_delay(&cfg(), n, 0.0)).collect();
        let secs = |s| Duration::from_secs(s);
        assert_eq!(
            got,
            [secs(1), secs(2), secs(4), secs(8), secs(10), secs(10)]
        );
        assert_eq!(restart_delay(&cfg(), u32::MAX, 0.0), secs(10));
    }

    #[test]
    fn jitter_only_shortens() {
        assert_eq!(restart_delay(&cfg(), 1, 0.5), Duration::from_millis(750));
        assert_eq!(restart_delay(&cfg(), 9, 1.0), Duration::from_secs(5));
        assert_eq!(restart_delay(&cfg(), 9, 7.0), Duration::from_secs(5));
    }

    #[test]
    fn zero_initial_means_no_delay() {
        let c = BackoffConfig {
            initial: Duration::ZERO,
            ..cfg()
        };
        assert_eq!(restart_delay(&c, 1000, 0.3), Duration::ZERO);
    }

    #[test]
    fn request_limit_spread() {
        assert_eq!(request_limit(100, 50, 0.0), 100);
        assert_eq!(request_limit(100, 50, 0.5), 125);
        assert_eq!(request_limit(100, 50, 1.0), 150);
        assert_eq!(request_limit(u64::MAX, 50, 0.9), u64::MAX);
    }

    #[test]
    fn splitmix_in_unit_interval_and_deterministic() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        for _ in 0..1000 {
            let x = a.unit();
            assert!((0.0..1.0).contains(&x));
            assert_eq!(x, b.unit());
        }
    }

    #[test]
    fn window_forgets_old_crashes() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut win = CrashWindow::default();
        assert_eq!(win.record(t0, w), 1);
        assert_eq!(win.record(t0 + Duration::from_secs(5), w), 2);
        assert_eq!(win.record(t0 + Duration::from_secs(10), w), 2);
        assert_eq!(win.record(t0 + Duration::from_secs(30), w), 1);
    }
}
