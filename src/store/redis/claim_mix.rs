//! Which claim path goes first on Redis: the claim script, or a plain read.
//!
//! A replay needs no write, and a plain `HMGET` of a completed record costs
//! Redis a fraction of the claim script (about 0.5 µs against 4 µs of
//! command time). Reading first pays only when most claims find a settled
//! record, as in a storm of retries; for new keys it would add a round trip.
//! So the store keeps a score of recent claims and reads first while most
//! of them were settled.

use std::sync::atomic::{AtomicI32, Ordering};

/// A score in `-LIMIT..=LIMIT`: up for each claim that found a settled
/// record, down for each that did not. Read first while it is above zero.
#[derive(Debug, Default)]
pub struct ClaimMix(AtomicI32);

impl ClaimMix {
    /// How much history the score keeps: after a change of traffic, at most
    /// this many claims take the other path.
    const LIMIT: i32 = 16;

    pub fn read_first(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    pub fn saw(&self, settled: bool) {
        let step = if settled { 1 } else { -1 };
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |score| {
                Some((score + step).clamp(-Self::LIMIT, Self::LIMIT))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimMix;

    #[test]
    fn reads_first_only_while_most_claims_were_settled() {
        let mix = ClaimMix::default();
        assert!(!mix.read_first(), "new stores run the script first");
        mix.saw(true);
        assert!(mix.read_first(), "a settled claim tips it");
        for _ in 0..100 {
            mix.saw(true);
        }
        // Bounded history: LIMIT new keys bring the script back first.
        for _ in 0..ClaimMix::LIMIT {
            assert!(mix.read_first());
            mix.saw(false);
        }
        assert!(!mix.read_first());
        // Mixed traffic, one replay in three: the script stays first.
        for i in 0..99 {
            mix.saw(i % 3 == 0);
        }
        assert!(!mix.read_first());
    }
}
