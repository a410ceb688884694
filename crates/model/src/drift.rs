//! Feature drift as plain data: the reference statistics of the training data (per feature its
//! mean, standard deviation, decile edges and how the training rows fall into the decile bins),
//! a sliding window of the features the service receives kept as bin counts in a ring, the
//! population stability index (PSI) between the two, and the alarm state that decides when a
//! feature's drift is reported and when it is over.
//!
//! The per-message work is a binary search over 9 edges and two counter updates per feature; the
//! PSI is computed from the counts on a tick, never per message.

use crate::error::ModelError;
use pipeline::dataset::Dataset;
use serde::{Deserialize, Serialize};

/// Quantiles the edges are taken at: the deciles 10 %, 20 %, ..., 90 %.
pub const DECILES: usize = 9;
/// Bins per feature: below the first edge, between two edges, above the last.
pub const BINS: usize = DECILES + 1;
/// Floor of a bin's share in the PSI, so an empty bin gives a large but finite term.
pub const PSI_FLOOR: f64 = 1e-4;

/// Reference statistics of the data a model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// Training rows.
    pub rows: usize,
    /// In-sample mean absolute error of the model.
    pub mae: f64,
    /// One entry per feature, in the model's order.
    pub features: Vec<FeatureReference>,
}

/// Reference statistics of one feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureReference {
    /// Feature name.
    pub name: String,
    /// Mean over the training rows.
    pub mean: f64,
    /// Population standard deviation over the training rows.
    pub std_dev: f64,
    /// The 10 %, 20 %, ..., 90 % quantiles (linear interpolation); repeated for a feature with few
    /// distinct values.
    pub decile_edges: Vec<f64>,
    /// Share of training rows in each bin `(-inf, e1], (e1, e2], ..., (e9, +inf)`; a bin between
    /// two equal edges is empty.
    pub bin_fractions: Vec<f64>,
}

/// The bin of `value`: the number of edges below it (`0..=edges.len()`).
pub fn bin_of(edges: &[f64], value: f64) -> usize {
    edges.partition_point(|&edge| edge < value)
}

/// The `q` quantile (0..=1) of sorted, non-empty `values`, interpolated linearly (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = (low + 1).min(sorted.len() - 1);
    let fraction = position - low as f64;
    sorted[low] + (sorted[high] - sorted[low]) * fraction
}

impl FeatureReference {
    /// Statistics of `values` (non-empty, finite).
    pub fn of(name: &str, values: &[f64]) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let decile_edges: Vec<f64> = (1..=DECILES)
            .map(|i| quantile(&sorted, i as f64 / BINS as f64))
            .collect();
        let mut counts = [0u64; BINS];
        for &value in values {
            counts[bin_of(&decile_edges, value)] += 1;
        }
        Self {
            name: name.to_owned(),
            mean,
            std_dev: variance.sqrt(),
            decile_edges,
            bin_fractions: counts.iter().map(|&c| c as f64 / n).collect(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let finite = |v: &f64| v.is_finite();
        if self.decile_edges.len() != DECILES || self.bin_fractions.len() != BINS {
            return Err(format!(
                "feature {:?}: expected {DECILES} decile edges and {BINS} bin fractions",
                self.name
            ));
        }
        let all_finite = self.mean.is_finite()
            && self.std_dev.is_finite()
            && self.decile_edges.iter().all(finite)
            && self
                .bin_fractions
                .iter()
                .all(|f| f.is_finite() && *f >= 0.0);
        if !all_finite {
            return Err(format!(
                "feature {:?}: statistics must be finite numbers (fractions >= 0)",
                self.name
            ));
        }
        if self.decile_edges.windows(2).any(|w| w[0] > w[1]) {
            return Err(format!(
                "feature {:?}: decile edges must be ascending",
                self.name
            ));
        }
        Ok(())
    }
}

impl Reference {
    /// Statistics of `data`'s features and the model's in-sample `mae`.
    pub fn of(data: &Dataset, mae: f64) -> Self {
        let features = (0..data.n_features())
            .map(|column| {
                let values: Vec<f64> = (0..data.len()).map(|row| data.row(row)[column]).collect();
                FeatureReference::of(&data.feature_names[column], &values)
            })
            .collect();
        Self {
            rows: data.len(),
            mae,
            features,
        }
    }

    /// Checks the shape (one entry per feature, named as the model's) and that every number is
    /// finite.
    pub fn validate(&self, feature_names: &[String]) -> Result<(), ModelError> {
        let invalid = |reason: String| ModelError::Invalid(format!("reference: {reason}"));
        let names: Vec<&String> = self.features.iter().map(|f| &f.name).collect();
        if names.len() != feature_names.len()
            || names.iter().zip(feature_names).any(|(a, b)| *a != b)
        {
            return Err(invalid(format!(
                "features {names:?} do not match the model's {feature_names:?}"
            )));
        }
        if !self.mae.is_finite() {
            return Err(invalid("mae must be a finite number".to_owned()));
        }
        self.features
            .iter()
            .try_for_each(FeatureReference::validate)
            .map_err(invalid)
    }
}

/// Population stability index of the observed bin `counts` against the `reference` shares:
/// `Σ (a - r) · ln(a / r)` over the bins, each share floored at [`PSI_FLOOR`]. Every term is
/// `>= 0`, so the index is too; equal distributions give 0. `None` when nothing was counted.
pub fn psi(reference: &[f64], counts: &[u32]) -> Option<f64> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let total = total as f64;
    Some(
        reference
            .iter()
            .zip(counts)
            .map(|(&r, &c)| {
                let (r, a) = (r.max(PSI_FLOOR), (f64::from(c) / total).max(PSI_FLOOR));
                (a - r) * (a / r).ln()
            })
            .sum(),
    )
}

/// The last `capacity` feature vectors received, as their bins, with the count of each bin.
#[derive(Debug, Clone)]
pub struct DriftWindow {
    /// Per feature, its decile edges.
    edges: Vec<Vec<f64>>,
    /// `features × BINS` counts over the vectors in the ring.
    counts: Vec<u32>,
    /// `capacity × features` bins, oldest overwritten first.
    ring: Vec<u8>,
    capacity: usize,
    len: usize,
    next: usize,
}

impl DriftWindow {
    /// An empty window over `capacity` (at least 1) vectors binned by `reference`'s edges.
    pub fn new(reference: &Reference, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let features = reference.features.len();
        Self {
            edges: reference
                .features
                .iter()
                .map(|f| f.decile_edges.clone())
                .collect(),
            counts: vec![0; features * BINS],
            ring: vec![0; capacity * features],
            capacity,
            len: 0,
            next: 0,
        }
    }

    /// Adds one feature vector, dropping the oldest when full. A vector of the wrong length is
    /// ignored (the model dead-letters it anyway).
    pub fn observe(&mut self, features: &[f64]) {
        let n = self.edges.len();
        if features.len() != n || n == 0 {
            return;
        }
        let slot = &mut self.ring[self.next * n..(self.next + 1) * n];
        for (feature, (value, edges)) in features.iter().zip(&self.edges).enumerate() {
            if self.len == self.capacity {
                let old = usize::from(slot[feature]);
                self.counts[feature * BINS + old] -= 1;
            }
            // At most BINS - 1 = 9, so it fits a u8.
            let bin = bin_of(edges, *value).min(BINS - 1);
            slot[feature] = bin as u8;
            self.counts[feature * BINS + bin] += 1;
        }
        self.next = (self.next + 1) % self.capacity;
        self.len = (self.len + 1).min(self.capacity);
    }

    /// Vectors in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first vector.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True once the window holds `capacity` vectors.
    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    /// The bin counts, `features × BINS`, feature-major.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }
}

/// PSI of every feature: `counts` as returned by [`DriftWindow::counts`].
pub fn psi_per_feature(reference: &Reference, counts: &[u32]) -> Vec<Option<f64>> {
    reference
        .features
        .iter()
        .zip(counts.chunks(BINS))
        .map(|(feature, counts)| psi(&feature.bin_fractions, counts))
        .collect()
}

/// A change of a feature's drift alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    /// The PSI went above the threshold.
    Raised,
    /// The PSI came back to or below the threshold.
    Cleared,
}

/// Which features are drifting: raised when a feature's PSI goes above the threshold, cleared when
/// it comes back; each change is reported once.
#[derive(Debug, Clone)]
pub struct DriftAlarms {
    threshold: f64,
    raised: Vec<bool>,
}

impl DriftAlarms {
    /// No alarm raised yet, for `features` features.
    pub fn new(threshold: f64, features: usize) -> Self {
        Self {
            threshold,
            raised: vec![false; features],
        }
    }

    /// Takes the latest PSI per feature (`None`: not known, no change) and returns the features
    /// whose alarm changed.
    pub fn update(&mut self, psi: &[Option<f64>]) -> Vec<(usize, AlarmChange)> {
        let mut changes = Vec::new();
        for (feature, (raised, psi)) in self.raised.iter_mut().zip(psi).enumerate() {
            let Some(psi) = psi else { continue };
            let above = *psi > self.threshold;
            if above != *raised {
                *raised = above;
                changes.push((
                    feature,
                    if above {
                        AlarmChange::Raised
                    } else {
                        AlarmChange::Cleared
                    },
                ));
            }
        }
        changes
    }

    /// Indices of the features whose alarm is raised.
    pub fn raised(&self) -> impl Iterator<Item = usize> + '_ {
        self.raised
            .iter()
            .enumerate()
            .filter_map(|(i, &raised)| raised.then_some(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference_of(columns: &[(&str, Vec<f64>)]) -> Reference {
        Reference {
            rows: columns[0].1.len(),
            mae: 1.0,
            features: columns
                .iter()
                .map(|(name, values)| FeatureReference::of(name, values))
                .collect(),
        }
    }

    #[test]
    fn deciles_of_1_to_100() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let feature = FeatureReference::of("x", &values);
        assert_eq!(feature.mean, 50.5);
        assert!((feature.std_dev - 28.866_070_047_722_12).abs() < 1e-12);
        // numpy.quantile(range(1, 101), 0.1) == 10.9, ...
        let expected = [10.9, 20.8, 30.7, 40.6, 50.5, 60.4, 70.3, 80.2, 90.1];
        for (edge, want) in feature.decile_edges.iter().zip(expected) {
            assert!((edge - want).abs() < 1e-9, "{edge} != {want}");
        }
        assert_eq!(feature.bin_fractions, vec![0.1; BINS]);
    }

    #[test]
    fn a_feature_with_two_values_has_two_nonempty_bins() {
        let values: Vec<f64> = (0..100).map(|i| if i < 60 { -1.0 } else { 1.0 }).collect();
        let feature = FeatureReference::of("sex", &values);
        let nonempty: Vec<f64> = feature
            .bin_fractions
            .iter()
            .copied()
            .filter(|&f| f > 0.0)
            .collect();
        assert_eq!(nonempty, vec![0.6, 0.4]);
        let mut window = DriftWindow::new(&reference_of(&[("sex", values.clone())]), 100);
        for value in &values {
            window.observe(&[*value]);
        }
        assert_eq!(psi(&feature.bin_fractions, window.counts()), Some(0.0));
    }

    #[test]
    fn psi_of_known_shares() {
        // Two bins, 0.5/0.5 against 0.8/0.2: 0.3 ln 1.6 + (-0.3) ln 0.4.
        let got = psi(&[0.5, 0.5], &[80, 20]).unwrap();
        let want = 0.3 * 1.6f64.ln() - 0.3 * 0.4f64.ln();
        assert!((got - want).abs() < 1e-12);
        assert_eq!(psi(&[0.5, 0.5], &[0, 0]), None);
        // An empty bin gives a large, finite index.
        let empty = psi(&[0.5, 0.5], &[100, 0]).unwrap();
        assert!(empty.is_finite() && empty > 3.0);
    }

    #[test]
    fn the_window_forgets_the_oldest_vectors() {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let reference = reference_of(&[("x", values)]);
        let mut window = DriftWindow::new(&reference, 10);
        for _ in 0..10 {
            window.observe(&[0.0]);
        }
        assert!(window.is_full());
        assert_eq!(window.counts()[0], 10);
        for _ in 0..4 {
            window.observe(&[999.0]);
        }
        assert_eq!(window.len(), 10);
        assert_eq!(window.counts()[0], 6);
        assert_eq!(window.counts()[BINS - 1], 4);
        // Wrong lengths are ignored.
        window.observe(&[1.0, 2.0]);
        assert_eq!(window.counts().iter().sum::<u32>(), 10);
    }

    #[test]
    fn a_shifted_feature_drifts_and_the_others_do_not() {
        let rng = &mut fastrand::Rng::with_seed(7);
        let a: Vec<f64> = (0..442).map(|_| rng.f64()).collect();
        let b: Vec<f64> = (0..442).map(|_| rng.f64()).collect();
        let reference = reference_of(&[("a", a.clone()), ("b", b.clone())]);
        let mut window = DriftWindow::new(&reference, 1000);
        for _ in 0..1000 {
            let row = rng.usize(0..442);
            // "a" shifted by about one standard deviation (0.29).
            window.observe(&[a[row] + 0.3, b[row]]);
        }
        let psi = psi_per_feature(&reference, window.counts());
        assert!(psi[0].unwrap() > 0.25, "{psi:?}");
        assert!(psi[1].unwrap() < 0.1, "{psi:?}");
    }

    #[test]
    fn alarms_are_raised_and_cleared_once() {
        let mut alarms = DriftAlarms::new(0.25, 2);
        assert_eq!(alarms.update(&[Some(0.1), None]), vec![]);
        assert_eq!(
            alarms.update(&[Some(0.3), Some(0.5)]),
            vec![(0, AlarmChange::Raised), (1, AlarmChange::Raised)]
        );
        assert_eq!(alarms.update(&[Some(0.4), Some(0.6)]), vec![]);
        assert_eq!(alarms.update(&[Some(0.3), None]), vec![]);
        assert_eq!(alarms.raised().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(
            alarms.update(&[Some(0.25), Some(0.9)]),
            vec![(0, AlarmChange::Cleared)]
        );
        assert_eq!(alarms.raised().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn invalid_references_are_refused() {
        let names = vec!["x".to_owned()];
        let good = reference_of(&[("x", vec![1.0, 2.0, 3.0])]);
        assert!(good.validate(&names).is_ok());
        assert!(good.validate(&["y".to_owned()]).is_err());
        let mut unsorted = good.clone();
        unsorted.features[0].decile_edges.swap(0, 8);
        assert!(unsorted.validate(&names).is_err());
        let mut short = good.clone();
        short.features[0].bin_fractions.pop();
        assert!(short.validate(&names).is_err());
        let mut nan = good;
        nan.features[0].mean = f64::NAN;
        assert!(nan.validate(&names).is_err());
    }

    proptest! {
        /// The window filled with exactly the reference data gives a PSI of (about) 0, and any
        /// window gives a PSI >= 0.
        #[test]
        fn psi_is_zero_for_the_same_data_and_never_negative(
            values in prop::collection::vec(-1e6f64..1e6, 1..300),
            observed in prop::collection::vec(-2e6f64..2e6, 1..300),
        ) {
            let reference = reference_of(&[("x", values.clone())]);
            let mut same = DriftWindow::new(&reference, values.len());
            for value in &values {
                same.observe(&[*value]);
            }
            let identical = psi(&reference.features[0].bin_fractions, same.counts()).unwrap();
            prop_assert!(identical.abs() < 1e-9, "identical distributions: {}", identical);

            let mut other = DriftWindow::new(&reference, 100);
            for value in &observed {
                other.observe(&[*value]);
            }
            let index = psi(&reference.features[0].bin_fractions, other.counts()).unwrap();
            prop_assert!(index >= 0.0 && index.is_finite(), "psi {}", index);
        }

        /// Shares of any shape against counts of any shape: never negative.
        #[test]
        fn psi_is_never_negative(
            reference in prop::collection::vec(0.0f64..1.0, BINS),
            counts in prop::collection::vec(0u32..10_000, BINS),
        ) {
            if let Some(index) = psi(&reference, &counts) {
                prop_assert!(index >= 0.0 && index.is_finite());
            }
        }
    }
}
