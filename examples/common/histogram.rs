//! A latency histogram in microseconds: exact below 128, then 64 buckets per power of
//! two (under 1.6% error), up to about 19 hours.

pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    const EXACT: u64 = 128;
    const SUB_BITS: u32 = 6;
    const MAX_EXP: u32 = 35;
    const BUCKETS: usize =
        Self::EXACT as usize + (((Self::MAX_EXP - 6) as usize) << Self::SUB_BITS);

    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; Self::BUCKETS],
            total: 0,
        }
    }

    fn index(us: u64) -> usize {
        if us < Self::EXACT {
            return us as usize;
        }
        let us = us.min((2 << Self::MAX_EXP) - 1);
        let exp = 63 - us.leading_zeros();
        let sub = (us >> (exp - Self::SUB_BITS)) & ((1 << Self::SUB_BITS) - 1);
        Self::EXACT as usize + (((exp - 7) as usize) << Self::SUB_BITS) + sub as usize
    }

    /// The middle of a bucket.
    fn value(index: usize) -> u64 {
        if index < Self::EXACT as usize {
            return index as u64;
        }
        let k = (index - Self::EXACT as usize) as u64;
        let exp = 7 + (k >> Self::SUB_BITS);
        let sub = k & ((1 << Self::SUB_BITS) - 1);
        let width = 1u64 << (exp - u64::from(Self::SUB_BITS));
        (((1 << Self::SUB_BITS) + sub) << (exp - u64::from(Self::SUB_BITS))) + width / 2
    }

    pub fn record(&mut self, us: u64) {
        self.counts[Self::index(us)] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::value(index);
            }
        }
        Self::value(self.counts.len() - 1)
    }
}
