//! What one client saw: the check of every delivery against its publisher's sequence.

use super::histogram::Histogram;
use super::{Run, HEADER};

/// What one client saw.
pub struct Tally {
    /// Deliveries of the load's messages, duplicates included.
    pub delivered: u64,
    pub dup: u64,
    pub reordered: u64,
    /// Messages that were not the load's, or the client's own.
    pub bad: u64,
    /// The last sequence number seen from each publisher; 0 before the first.
    last: Vec<u64>,
    /// Sequence numbers skipped and not yet seen: (publisher, first, last).
    gaps: Vec<(u32, u64, u64)>,
    pub latency: Histogram,
    pub last_delivery_us: u64,
}

impl Tally {
    pub fn new(clients: usize) -> Tally {
        Tally {
            delivered: 0,
            dup: 0,
            reordered: 0,
            bad: 0,
            last: vec![0; clients],
            gaps: Vec::new(),
            latency: Histogram::new(),
            last_delivery_us: 0,
        }
    }

    /// Checks one delivery. Returns how far it moved this client along its
    /// publisher's sequence: 1 for the next in line, more past a gap, 0 for a duplicate
    /// or a late one.
    pub fn check(&mut self, run: &Run, me: usize, payload: &[u8]) -> u64 {
        let Some(header) = payload.get(..HEADER) else {
            self.bad += 1;
            return 0;
        };
        let publisher = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(header[4..12].try_into().unwrap_or_default());
        let sent_us = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
        let p = publisher as usize;
        if p >= run.clients || p == me || seq == 0 {
            self.bad += 1;
            return 0;
        }

        let now = run.now_us();
        self.latency.record(now.saturating_sub(sent_us));
        self.last_delivery_us = now;
        self.delivered += 1;

        // The common case first: the next in line.
        let last = &mut self.last[p];
        let before = *last;
        if seq == before + 1 {
            *last = seq;
            return 1;
        }
        if seq > before + 1 {
            self.gaps.push((publisher, before + 1, seq - 1));
            *last = seq;
            return seq - before;
        }
        if self.fill_gap(publisher, seq) {
            self.reordered += 1;
        } else {
            self.dup += 1;
        }
        0
    }

    /// Removes `seq` from the open gaps of `publisher`; false when it was not missing.
    fn fill_gap(&mut self, publisher: u32, seq: u64) -> bool {
        let Some(i) = self
            .gaps
            .iter()
            .position(|&(p, first, last)| p == publisher && first <= seq && seq <= last)
        else {
            return false;
        };
        let (p, first, last) = self.gaps[i];
        match (seq == first, seq == last) {
            (true, true) => {
                self.gaps.swap_remove(i);
            }
            (true, false) => self.gaps[i].1 += 1,
            (false, true) => self.gaps[i].2 -= 1,
            (false, false) => {
                self.gaps[i].2 = seq - 1;
                self.gaps.push((p, seq + 1, last));
            }
        }
        true
    }

    /// Messages this client should have received and did not: the open gaps and
    /// whatever each publisher sent past the last one seen.
    pub fn lost(&self, me: usize, sent_by: &[u64]) -> u64 {
        let gaps: u64 = self
            .gaps
            .iter()
            .map(|&(_, first, last)| last - first + 1)
            .sum();
        let tails: u64 = sent_by
            .iter()
            .zip(&self.last)
            .enumerate()
            .filter(|&(p, _)| p != me)
            .map(|(_, (&sent, &last))| sent.saturating_sub(last))
            .sum();
        gaps + tails
    }
}
