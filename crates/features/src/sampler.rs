//! Which data set row each new sample takes (`ORDER`, `SEED`).

use crate::config::Order;

/// Picks row indices.
pub struct Sampler {
    order: Order,
    rng: fastrand::Rng,
    rows: usize,
    next: usize,
}

impl Sampler {
    /// A sampler over `rows` rows.
    pub fn new(order: Order, seed: Option<u64>, rows: usize) -> Self {
        Self {
            order,
            rng: seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
            rows,
            next: 0,
        }
    }

    /// The next row index, in `0..rows` (every row can come up, the last one too).
    pub fn next_row(&mut self) -> usize {
        match self.order {
            Order::Random => self.rng.usize(0..self.rows),
            Order::Sequential => {
                let row = self.next;
                self.next = (self.next + 1) % self.rows;
                row
            }
        }
    }
}
