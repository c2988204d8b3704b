//! Per-site clocks: a fixed offset from true (simulation) time plus a
//! constant drift, in parts per million.

/// A site's clock as a function of true time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteClock {
    /// How far the clock is ahead of true time at `epoch_ms`, ms.
    pub offset_ms: i64,
    /// How fast the clock runs off true time, parts per million
    /// (positive: runs fast). Bounded by [`DRIFT_PPM_MAX`].
    pub drift_ppm: i64,
    /// True time at which the offset holds exactly, unix ms.
    pub epoch_ms: i64,
}

/// Largest drift accepted, ppm (1 %: far beyond real quartz, still monotonic).
pub const DRIFT_PPM_MAX: i64 = 10_000;

impl SiteClock {
    /// A perfect clock.
    pub fn exact(epoch_ms: i64) -> SiteClock {
        SiteClock {
            offset_ms: 0,
            drift_ppm: 0,
            epoch_ms,
        }
    }

    /// The site's reading at true time `true_ms`. Non-decreasing in `true_ms`.
    pub fn local(&self, true_ms: i64) -> i64 {
        assert!(
            self.drift_ppm.abs() <= DRIFT_PPM_MAX,
            "drift {} ppm out of bounds",
            self.drift_ppm
        );
        let elapsed = true_ms - self.epoch_ms;
        // The engine reads clocks at every event: i64 arithmetic whenever
        // the product fits (spans below ~29,000 years), i128 beyond. Both
        // truncate toward zero, so the reading is the same.
        let drift = match elapsed.checked_mul(self.drift_ppm) {
            Some(product) => product / 1_000_000,
            None => {
                let drift = i128::from(elapsed) * i128::from(self.drift_ppm) / 1_000_000;
                i64::try_from(drift).expect("drift over an i64 span fits an i64")
            }
        };
        true_ms + self.offset_ms + drift
    }

    /// The earliest true time at which the site's clock reads `local_ms` or
    /// later: when a timer the site armed for `local_ms` fires.
    pub fn true_time_of(&self, local_ms: i64) -> i64 {
        let target = local_ms - self.offset_ms - self.epoch_ms;
        // As in `local`: i64 when the product fits (the quotient then fits
        // too), i128 beyond, the same estimate either way.
        let estimate = match target.checked_mul(1_000_000) {
            Some(product) => product / (1_000_000 + self.drift_ppm),
            None => {
                let estimate =
                    i128::from(target) * 1_000_000 / i128::from(1_000_000 + self.drift_ppm);
                i64::try_from(estimate).unwrap_or(i64::MAX / 2)
            }
        };
        let estimate = estimate + self.epoch_ms;
        // The estimate is within a few ms of the answer; walk to the first
        // instant that reads `local_ms`, from just before it.
        let mut at = estimate.saturating_sub(4);
        while self.local(at) >= local_ms && at > estimate.saturating_sub(64) {
            at -= 1;
        }
        for _ in 0..128 {
            if self.local(at) >= local_ms {
                return at;
            }
            at += 1;
        }
        at
    }
}
