//! The live dashboard: `GET /` serves one page (embedded in the binary, uPlot vendored in
//! `assets/`) that polls `GET /api/dashboard` about once a second.
//!
//! Throttled and bounded: the consume loop's tick rebuilds one snapshot at most once a second
//! (never per message) from state the service keeps anyway, and stores it serialized; a request
//! hands out that string plus the live broker state (the tick does not run while disconnected).
//! What it keeps of its own is bounded by constants: the last [`RECENT_PAIRS`] pairs and
//! [`HISTORY_POINTS`] points of windowed MAE per kept model version.

use crate::quality::{Figures, Quality, VersionView};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use pipeline::health::Health;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Pairs shown in the predicted-against-true chart.
pub const RECENT_PAIRS: usize = 500;
/// Points of the windowed-MAE chart (one a second: ten minutes).
pub const HISTORY_POINTS: usize = 600;
/// Least time between two snapshots.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const UPLOT_JS: &str = include_str!("../assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/uPlot.min.css");

/// The last snapshot, serialized; shared between the consume loop and the HTTP handlers.
pub type SharedSnapshot = Arc<Mutex<Arc<String>>>;

/// What the page shows of the service's state, as of the last snapshot.
#[derive(Debug, serde::Serialize)]
struct Snapshot<'a> {
    /// Milliseconds since the epoch.
    taken_at_ms: u64,
    pairs: u64,
    pairs_per_second: f64,
    waiting: usize,
    window_size: usize,
    alert_ratio: f64,
    all: Figures,
    window: Figures,
    versions: &'a [VersionView],
    history: History<'a>,
    errors: Option<ErrorHistogram>,
    recent: Recent,
    /// The loss audit over the last hour; `None` when it is off.
    audit: Option<pipeline::audit::Summary>,
    /// A classifier's figures, confusion matrix and calibration (`TASK=classification`).
    classification: Option<crate::classification::ClassReport>,
}

/// The bins of `error_distribution.png` (same pairs, same bins; no median, which needs a copy).
#[derive(Debug, serde::Serialize)]
struct ErrorHistogram {
    count: usize,
    mean: f64,
    /// Right end of the last bin (the bins split 0..upper evenly).
    upper: f64,
    bins: Vec<u64>,
}

/// The windowed MAE over time: `t` in seconds since the epoch, one series per kept version
/// (`null` where the version had no figure yet).
#[derive(Debug, serde::Serialize)]
struct History<'a> {
    t: Vec<f64>,
    series: Vec<Series<'a>>,
}

#[derive(Debug, serde::Serialize)]
struct Series<'a> {
    version: &'a str,
    mae: Vec<Option<f64>>,
}

/// The last pairs, oldest first.
#[derive(Debug, serde::Serialize)]
struct Recent {
    y_true: Vec<f64>,
    y_pred: Vec<f64>,
}

/// The dashboard's own state, kept by the consume loop.
pub struct Dashboard {
    shared: SharedSnapshot,
    recent: VecDeque<(f64, f64)>,
    /// Seconds since the epoch, and the windowed MAE of each version at that time.
    history: VecDeque<(f64, Vec<(String, f64)>)>,
    last: Option<(Instant, u64)>,
    /// Per kept version: its pair count and when that count last grew.
    activity: std::collections::HashMap<String, (u64, Instant)>,
    version_idle: std::time::Duration,
    window_size: usize,
    alert_ratio: f64,
    dead_letters: DeadLetterTally,
    audit: Option<pipeline::audit::Summary>,
}

/// A version without a new pair for this long gets no more points in the MAE chart, so its line
/// ends where a newer version took over instead of running on flat.
const VERSION_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

impl Dashboard {
    /// An empty dashboard; the page shows "no data yet" until the first snapshot.
    pub fn new(window_size: usize, alert_ratio: f64) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Arc::new("null".to_owned()))),
            recent: VecDeque::with_capacity(RECENT_PAIRS),
            history: VecDeque::with_capacity(HISTORY_POINTS),
            last: None,
            activity: std::collections::HashMap::new(),
            version_idle: VERSION_IDLE,
            window_size,
            alert_ratio,
            dead_letters: DeadLetterTally::default(),
            audit: None,
        }
    }

    /// The loss audit's last hour, shown from the next snapshot on.
    pub fn set_audit(&mut self, summary: Option<pipeline::audit::Summary>) {
        self.audit = summary;
    }

    /// The handle the HTTP handlers read.
    pub fn shared(&self) -> SharedSnapshot {
        Arc::clone(&self.shared)
    }

    /// The dead-letter counts the HTTP handlers read.
    pub fn dead_letters(&self) -> DeadLetterTally {
        self.dead_letters.clone()
    }

    /// Counts one message of `queue` the handler dead-letters for `reason`.
    pub fn dead_lettered(&self, queue: &str, reason: &'static str) {
        self.dead_letters.count(queue, reason);
    }

    /// Remembers one joined pair (O(1), no allocation once full).
    pub fn observe(&mut self, y_true: f64, y_pred: f64) {
        if self.recent.len() == RECENT_PAIRS {
            self.recent.pop_front();
        }
        self.recent.push_back((y_true, y_pred));
    }

    /// Takes a snapshot when the last is at least a second old (call on the tick, after
    /// [`Quality::update_window`]). `errors` are the recent absolute errors of the picture.
    pub fn maybe_update<'e>(
        &mut self,
        quality: &Quality,
        classification: Option<&crate::classification::ClassQuality>,
        waiting: usize,
        errors: impl Iterator<Item = &'e f64> + Clone,
    ) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|(at, _)| now.duration_since(at) < SNAPSHOT_EVERY)
        {
            return;
        }
        let pairs = quality.all().n;
        let pairs_per_second = match self.last {
            Some((at, before)) => {
                pairs.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64()
            }
            None => 0.0,
        };
        self.last = Some((now, pairs));
        let taken_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let versions = quality.versions();
        self.activity
            .retain(|version, _| versions.iter().any(|v| &v.version == version));
        for view in &versions {
            let entry = self
                .activity
                .entry(view.version.clone())
                .or_insert((view.pairs, now));
            if entry.0 != view.pairs {
                *entry = (view.pairs, now);
            }
        }
        if self.history.len() == HISTORY_POINTS {
            self.history.pop_front();
        }
        let (activity, idle) = (&self.activity, self.version_idle);
        self.history.push_back((
            taken_at.as_secs_f64(),
            versions
                .iter()
                .filter(|v| v.window.n > 0)
                .filter(|v| {
                    activity
                        .get(&v.version)
                        .is_some_and(|(_, grew)| now.duration_since(*grew) < idle)
                })
                .map(|v| (v.version.clone(), v.window.mae))
                .collect(),
        ));
        let (count, mean, upper, bins) = crate::plot::histogram(errors);
        let snapshot = Snapshot {
            taken_at_ms: taken_at.as_millis() as u64,
            pairs,
            pairs_per_second,
            waiting,
            window_size: self.window_size,
            alert_ratio: self.alert_ratio,
            all: Figures::from(quality.all()),
            window: Figures::from(quality.window()),
            versions: &versions,
            history: self.history_of(&versions),
            errors: (count > 0).then_some(ErrorHistogram {
                count,
                mean,
                upper,
                bins,
            }),
            recent: Recent {
                y_true: self.recent.iter().map(|p| p.0).collect(),
                y_pred: self.recent.iter().map(|p| p.1).collect(),
            },
            audit: self.audit,
            // Read only when a snapshot is taken: not on every tick.
            classification: classification.and_then(|classes| classes.report()),
        };
        match serde_json::to_string(&snapshot) {
            Ok(json) => {
                let json = Arc::new(json);
                match self.shared.lock() {
                    Ok(mut shared) => *shared = json,
                    Err(poisoned) => *poisoned.into_inner() = json,
                }
            }
            // Only a non-finite figure could get here; the page keeps the previous snapshot.
            Err(err) => tracing::debug!(error = %err, "cannot serialize the dashboard snapshot"),
        }
    }

    /// One series per kept version (most recently seen first), aligned with the history's times.
    fn history_of<'v>(&self, versions: &'v [VersionView]) -> History<'v> {
        History {
            t: self.history.iter().map(|(t, _)| *t).collect(),
            series: versions
                .iter()
                .map(|view| Series {
                    version: &view.version,
                    mae: self
                        .history
                        .iter()
                        .map(|(_, point)| {
                            point
                                .iter()
                                .find(|(name, _)| *name == view.version)
                                .map(|(_, mae)| *mae)
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// What the handlers read live (the snapshot is not updated while the broker is away).
#[derive(Clone)]
pub struct Live {
    /// The last snapshot.
    pub snapshot: SharedSnapshot,
    /// `pipeline_broker_connected`.
    pub connected: Gauge,
    /// The service's health.
    pub health: Health,
    /// The dead-letter counts.
    pub dead_letters: DeadLetterTally,
    /// With `PARTITIONS > 1`: what the instance serves, and the partition this page shows.
    pub partitions: Option<(Arc<InstanceView>, String)>,
}

/// What a metric instance serving several partitions shows on each partition's page: which it
/// serves, and its totals over all of them.
pub struct InstanceView {
    /// E.g. `instance 0 of 2 serves partitions p0, p2 of 4`.
    pub served: String,
    /// Each served partition (`p0`, ...) with its `pipeline_pairs_total` and waiting ids.
    pub partitions: Vec<(String, Counter, Gauge)>,
}

#[derive(serde::Serialize)]
struct PartitionsStatus<'a> {
    served: &'a str,
    /// The partition of this page.
    page: &'a str,
    /// Every served partition, in order.
    pages: Vec<&'a str>,
    pairs: u64,
    waiting: i64,
}

/// The dashboard's routes: `/`, `/api/dashboard` and the page's assets.
pub fn routes(live: Live) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/assets/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/assets/uPlot.iife.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", UPLOT_JS) }),
        )
        .route(
            "/assets/uPlot.min.css",
            get(|| async { asset("text/css; charset=utf-8", UPLOT_CSS) }),
        )
        .route("/api/dashboard", get(api))
        .with_state(live)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// One dead-letter counter.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct DeadLetters {
    /// Queue the messages came from.
    pub queue: String,
    /// Why they were refused.
    pub reason: String,
    /// How many.
    pub count: f64,
}

#[derive(serde::Serialize)]
struct Status<'a> {
    broker_connected: bool,
    health: String,
    dead_letters: Vec<DeadLetters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partitions: Option<PartitionsStatus<'a>>,
}

async fn api(State(live): State<Live>) -> impl IntoResponse {
    let dead_letters = live.dead_letters.counts();
    let status = Status {
        broker_connected: live.connected.get() == 1,
        health: match live.health.get() {
            Ok(()) => "ok".to_owned(),
            Err(reason) => reason,
        },
        dead_letters,
        partitions: live
            .partitions
            .as_ref()
            .map(|(view, page)| PartitionsStatus {
                served: &view.served,
                page,
                pages: view.partitions.iter().map(|(k, _, _)| k.as_str()).collect(),
                pairs: view
                    .partitions
                    .iter()
                    .map(|(_, pairs, _)| pairs.get())
                    .sum(),
                waiting: view
                    .partitions
                    .iter()
                    .map(|(_, _, waiting)| waiting.get())
                    .sum(),
            }),
    };
    let snapshot = match live.snapshot.lock() {
        Ok(shared) => Arc::clone(&shared),
        Err(poisoned) => Arc::clone(&poisoned.into_inner()),
    };
    match serde_json::to_string(&status) {
        Ok(status) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            format!("{{\"status\":{status},\"state\":{snapshot}}}"),
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the status: {err}\n"),
        )
            .into_response(),
    }
}

/// Dead-lettered messages by queue and reason, counted where the handler refuses a message: the
/// same events `pipeline_messages_dead_lettered_total` counts (the consume loop dead-letters
/// nothing else), read without encoding the registry. Shared with the HTTP handlers.
#[derive(Clone, Debug, Default)]
pub struct DeadLetterTally(Arc<Mutex<BTreeMap<(String, &'static str), u64>>>);

impl DeadLetterTally {
    /// Counts one message (rare: a lock and, for a new queue and reason, one allocation).
    pub fn count(&self, queue: &str, reason: &'static str) {
        let mut counts = match self.0.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        };
        match counts
            .iter_mut()
            .find(|((q, r), _)| q == queue && *r == reason)
        {
            Some((_, count)) => *count += 1,
            None => {
                counts.insert((queue.to_owned(), reason), 1);
            }
        }
    }

    /// Every count so far, by queue and reason.
    pub fn counts(&self) -> Vec<DeadLetters> {
        let counts = match self.0.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts
            .iter()
            .map(|((queue, reason), count)| DeadLetters {
                queue: queue.clone(),
                reason: (*reason).to_owned(),
                count: *count as f64,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::Pair;
    use prometheus_client::registry::Registry;

    #[test]
    fn dead_letters_are_counted_by_queue_and_reason() {
        let dashboard = Dashboard::new(10, 1.25);
        let live = dashboard.dead_letters();
        assert_eq!(live.counts(), []);
        for _ in 0..3 {
            dashboard.dead_lettered("y_true", "invalid_json");
        }
        dashboard.dead_lettered("y_pred", "invalid_json");
        dashboard.dead_lettered("y_true", "wrong_shape");
        let row = |queue: &str, reason: &str, count: f64| DeadLetters {
            queue: queue.into(),
            reason: reason.into(),
            count,
        };
        assert_eq!(
            live.counts(),
            [
                row("y_pred", "invalid_json", 1.0),
                row("y_true", "invalid_json", 3.0),
                row("y_true", "wrong_shape", 1.0),
            ]
        );
    }

    #[test]
    fn the_snapshot_is_bounded_and_throttled() {
        let mut registry = Registry::default();
        let mut quality = Quality::register(&mut registry, 10, 3, 1.25);
        let mut dashboard = Dashboard::new(10, 1.25);
        let errors: Vec<f64> = (0..50).map(f64::from).collect();
        for i in 0..(RECENT_PAIRS + 100) {
            let pair = Pair {
                id: format!("p{i}"),
                y_true: i as f64,
                y_pred: i as f64 + 1.0,
                model_version: Some(format!("v{}", i % 5)),
                sent_at_us: None,
            };
            quality.observe(&pair);
            dashboard.observe(pair.y_true, pair.y_pred);
        }
        quality.update_window();
        dashboard.maybe_update(&quality, None, 7, errors.iter());
        let first = Arc::clone(&dashboard.shared().lock().unwrap());
        // A second call within the second changes nothing.
        dashboard.maybe_update(&quality, None, 8, errors.iter());
        assert!(Arc::ptr_eq(&first, &dashboard.shared().lock().unwrap()));
        let json: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(json["pairs"], (RECENT_PAIRS + 100) as u64);
        assert_eq!(json["waiting"], 7);
        assert_eq!(
            json["recent"]["y_true"].as_array().unwrap().len(),
            RECENT_PAIRS
        );
        assert_eq!(json["recent"]["y_true"][0], 100.0);
        // Three kept versions: three series, one point each.
        let series = json["history"]["series"].as_array().unwrap();
        assert_eq!(series.len(), 3);
        assert_eq!(series[0]["mae"], serde_json::json!([1.0]));
        assert_eq!(json["errors"]["count"], 50);
        assert_eq!(json["all"]["mae"], 1.0);
        // History keeps HISTORY_POINTS points.
        for _ in 0..(HISTORY_POINTS + 5) {
            dashboard.last = None;
            dashboard.maybe_update(&quality, None, 7, errors.iter());
        }
        assert_eq!(dashboard.history.len(), HISTORY_POINTS);
    }

    #[test]
    fn a_version_that_stopped_serving_ends_its_line() {
        let mut registry = Registry::default();
        let mut quality = Quality::register(&mut registry, 10, 5, 1.25);
        let mut dashboard = Dashboard::new(10, 1.25);
        dashboard.version_idle = std::time::Duration::from_millis(200);
        let mut n = 0;
        let mut serve = |quality: &mut Quality, version: &str, error: f64| {
            for _ in 0..20 {
                n += 1;
                quality.observe(&Pair {
                    id: format!("p{n}"),
                    y_true: 100.0,
                    y_pred: 100.0 + error,
                    model_version: Some(version.to_owned()),
                    sent_at_us: None,
                });
            }
            quality.update_window();
        };
        let point = |dashboard: &mut Dashboard, quality: &Quality| {
            dashboard.last = None;
            dashboard.maybe_update(quality, None, 0, [].iter());
            let json: serde_json::Value =
                serde_json::from_str(&dashboard.shared().lock().unwrap()).unwrap();
            json["history"]["series"].clone()
        };
        serve(&mut quality, "v1", 9.0);
        point(&mut dashboard, &quality);
        // v2 takes over; v1 gets no new pair from now on.
        serve(&mut quality, "v2", 3.0);
        point(&mut dashboard, &quality);
        std::thread::sleep(std::time::Duration::from_millis(300));
        serve(&mut quality, "v2", 3.0);
        let series = point(&mut dashboard, &quality);
        let mae = |version: &str| {
            series
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["version"] == version)
                .unwrap()["mae"]
                .clone()
        };
        assert_eq!(mae("v1"), serde_json::json!([9.0, 9.0, null]));
        assert_eq!(mae("v2"), serde_json::json!([null, 3.0, 3.0]));
    }
}
