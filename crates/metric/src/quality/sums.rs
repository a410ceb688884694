//! A regressor's sums, from which MAE, RMSE and R² follow, and those figures.

/// Sums from which MAE, RMSE and R² follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sums {
    /// Pairs.
    pub n: u64,
    sum_abs: f64,
    sum_sq: f64,
    sum_y: f64,
    sum_y2: f64,
}

impl Sums {
    pub(super) fn add(&mut self, y_true: f64, y_pred: f64) {
        let err = y_true - y_pred;
        self.n += 1;
        self.sum_abs += err.abs();
        self.sum_sq += err * err;
        self.sum_y += y_true;
        self.sum_y2 += y_true * y_true;
    }

    /// Mean absolute error (0 without pairs).
    pub fn mae(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum_abs / self.n as f64
        }
    }

    /// Root mean squared error (0 without pairs).
    pub fn rmse(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            (self.sum_sq / self.n as f64).sqrt()
        }
    }

    /// Coefficient of determination (0 when the targets do not vary).
    pub fn r2(&self) -> f64 {
        let n = self.n as f64;
        let ss_tot = self.sum_y2 - self.sum_y * self.sum_y / n;
        if self.n < 2 || ss_tot <= 0.0 {
            0.0
        } else {
            1.0 - self.sum_sq / ss_tot
        }
    }
}

/// MAE, RMSE and R² of a set of pairs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Figures {
    /// Pairs.
    pub n: u64,
    /// Mean absolute error.
    pub mae: f64,
    /// Root mean squared error.
    pub rmse: f64,
    /// Coefficient of determination.
    pub r2: f64,
}

impl From<&Sums> for Figures {
    fn from(sums: &Sums) -> Self {
        Self {
            n: sums.n,
            mae: sums.mae(),
            rmse: sums.rmse(),
            r2: sums.r2(),
        }
    }
}
