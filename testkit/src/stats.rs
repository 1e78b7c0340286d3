//! Latency percentiles, one definition for every test and table: samples go into an HDR
//! histogram of 3 significant digits, so a quantile is exact to 0.1% and a run of any length
//! takes the same memory.

use std::time::Duration;

use hdrhistogram::Histogram;

/// The longest sample told apart: a longer one counts as this long.
pub const SAMPLE_MAX: Duration = Duration::from_secs(3600);

/// Durations recorded to 3 significant digits, in nanoseconds, up to [`SAMPLE_MAX`].
#[derive(Clone, Debug)]
pub struct Latencies(Histogram<u64>);

impl Latencies {
    /// No samples yet.
    pub fn new() -> Self {
        // 1 ns to an hour at 3 significant digits is a range the histogram supports (a high
        // bound of at least twice the low one, 0..=5 digits).
        let high = SAMPLE_MAX.as_nanos() as u64;
        Self(Histogram::new_with_bounds(1, high, 3).expect("1 ns to an hour, 3 digits"))
    }

    /// Adds a sample (one longer than [`SAMPLE_MAX`] as that long).
    pub fn record(&mut self, sample: Duration) {
        self.0
            .saturating_record(u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX));
    }

    /// How many samples.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// True before the first sample.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The sample at quantile `q` (0.0..=1.0): the smallest that at least `q` of the samples
    /// do not exceed. Zero when there are none.
    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_nanos(self.0.value_at_quantile(q))
    }

    /// The median.
    pub fn median(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.0.max())
    }

    /// The mean.
    pub fn mean(&self) -> Duration {
        Duration::from_secs_f64(self.0.mean() / 1e9)
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Extend<Duration> for Latencies {
    fn extend<I: IntoIterator<Item = Duration>>(&mut self, samples: I) {
        for sample in samples {
            self.record(sample);
        }
    }
}

impl FromIterator<Duration> for Latencies {
    fn from_iter<I: IntoIterator<Item = Duration>>(samples: I) -> Self {
        let mut latencies = Self::new();
        latencies.extend(samples);
        latencies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_the_samples_to_three_digits() {
        let l: Latencies = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(l.len(), 100);
        let close = |got: Duration, want_ms: f64| {
            let got_ms = got.as_secs_f64() * 1e3;
            assert!(
                (got_ms - want_ms).abs() <= want_ms * 1e-3,
                "{got_ms} ms, not {want_ms}"
            );
        };
        close(l.median(), 50.0);
        close(l.p99(), 99.0);
        close(l.max(), 100.0);
        close(l.mean(), 50.5);
        assert_eq!(Latencies::new().median(), Duration::ZERO);
    }
}
