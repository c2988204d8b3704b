//! The simulator's only source of randomness: xoshiro256** seeded through
//! SplitMix64. Every stream (network, faults, each site, the workload) is
//! derived from the run's seed, so one number replays a whole run.

/// SplitMix64's output function: a strong 64-bit mixer, used to seed and to
/// derive independent streams and to hash trace fields.
pub fn mix64(value: u64) -> u64 {
    finalize(value.wrapping_add(GOLDEN_GAMMA))
}

/// SplitMix64's increment (2^64 / φ).
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded xoshiro256** generator (Blackman and Vigna, 2018). Not for
/// secrets; fast and with a 2^256 period, plenty for choosing faults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: [u64; 4],
}

impl Rng {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut sm = seed;
        let mut state = [0u64; 4];
        for word in &mut state {
            sm = sm.wrapping_add(GOLDEN_GAMMA);
            *word = finalize(sm);
        }
        // An all-zero state would only ever produce zeros; SplitMix64 never
        // yields four zeros in a row, but keep the guarantee explicit.
        assert!(state.iter().any(|&word| word != 0), "xoshiro state is zero");
        Rng { state }
    }

    /// An independent stream of `seed` named by `stream` (e.g. one per site):
    /// adding a stream never changes the numbers another stream draws.
    pub fn derive(seed: u64, stream: u64) -> Rng {
        Rng::new(mix64(seed ^ mix64(stream ^ 0x5EED_5EED_5EED_5EED)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.state[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.state[1] << 17;
        self.state[2] ^= self.state[0];
        self.state[3] ^= self.state[1];
        self.state[1] ^= self.state[2];
        self.state[0] ^= self.state[3];
        self.state[2] ^= t;
        self.state[3] = self.state[3].rotate_left(45);
        result
    }

    /// Uniform in `0..bound`; `bound` must be positive (Lemire's
    /// multiply-shift: the bias is below 2^-64 × bound, negligible here).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below() needs a positive bound");
        let wide = u128::from(self.next_u64()) * u128::from(bound);
        u64::try_from(wide >> 64).expect("the high half of a u64 × u64 product fits a u64")
    }

    /// Uniform index into a slice of `len` (> 0) items.
    pub fn index(&mut self, len: usize) -> usize {
        let bound = u64::try_from(len).expect("a slice length fits a u64");
        usize::try_from(self.below(bound)).expect("the result is below a usize length")
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        let span = hi.abs_diff(lo);
        if span == u64::MAX {
            return lo.wrapping_add_unsigned(self.next_u64());
        }
        lo.wrapping_add_unsigned(self.below(span + 1))
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn unit(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // 53 bits fit an f64 exactly
        let numerator = (self.next_u64() >> 11) as f64;
        numerator / (1u64 << 53) as f64
    }

    /// True with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// An exponentially distributed delay with mean `mean_ms` (≥ 1 ms),
    /// capped at a thousand means so one draw cannot stall a run.
    pub fn exponential_ms(&mut self, mean_ms: i64) -> i64 {
        #[allow(clippy::cast_precision_loss)] // delays are far below 2^53 ms
        let mean = mean_ms.max(1) as f64;
        let draw = -(1.0 - self.unit()).ln() * mean;
        #[allow(clippy::cast_possible_truncation)] // clamped to a small range first
        let ms = draw.clamp(1.0, mean * 1000.0) as i64;
        ms
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}
