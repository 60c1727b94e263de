//! A small seeded generator (SplitMix64): every random choice of a scenario
//! comes from its seed, so a failing run can be replayed.

/// The core's SplitMix64, with what scenarios need besides.
#[derive(Debug, Clone)]
pub struct Rng(sundial_core::session::Rng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(sundial_core::session::Rng::new(
            seed ^ 0x5DEE_CE66_D1A4_F87D,
        ))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, n)` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A derived generator for a sub-part (a relay, an agent).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}
