//! Where the served artifact comes from: a file (`MODEL_PATH`, shared with the trainer on one
//! host) or a URL (`MODEL_URL`, the trainer's `GET /model`, when replicas run on other machines),
//! read the same way by the watcher, and how an unreachable URL is reported: once per cause in
//! the log and as a `/healthz` note, cleared when it answers again.

use pipeline::health::Health;
use std::path::PathBuf;
use std::time::Duration;

/// Longest wait for the artifact over HTTP.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The `/healthz` note of an artifact source that cannot be read.
const NOTE: &str = "model source";

/// Where the artifact is read from.
#[derive(Debug, Clone)]
pub enum ArtifactSource {
    /// `MODEL_PATH`.
    File(PathBuf),
    /// `MODEL_URL`, with the ETag of the last answer (sent as `If-None-Match`).
    Url {
        /// The URL.
        url: String,
        /// The last ETag received.
        etag: Option<String>,
    },
}

/// What one reading of the source gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// The artifact's bytes (maybe the same as before: the watcher compares hashes).
    Bytes(Vec<u8>),
    /// Nothing new (304, or no file yet).
    Unchanged,
    /// The source cannot be read now: why, for the operator.
    Unavailable(String),
}

/// What an HTTP answer means for the watcher: 200 is a candidate artifact, 304 nothing new,
/// anything else the source not being available (with the status and the start of the body).
pub fn reading_of(url: &str, answer: &pipeline::http::Fetched) -> Reading {
    match answer.status {
        200 => Reading::Bytes(answer.body.clone()),
        304 => Reading::Unchanged,
        _ => {
            let body = String::from_utf8_lossy(&answer.body);
            let first = body.lines().next().unwrap_or("").trim();
            Reading::Unavailable(format!("GET {url}: {}: {first}", answer.status_line))
        }
    }
}

impl ArtifactSource {
    /// The source of the settings: `MODEL_URL` or `MODEL_PATH` (they exclude each other).
    pub fn of(model_path: Option<&PathBuf>, model_url: Option<&String>) -> Option<Self> {
        match (model_url, model_path) {
            (Some(url), _) => Some(Self::Url {
                url: url.clone(),
                etag: None,
            }),
            (None, Some(path)) => Some(Self::File(path.clone())),
            (None, None) => None,
        }
    }

    /// For the log: the path or the URL.
    pub fn describe(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Url { url, .. } => url.clone(),
        }
    }

    /// Reads the source once. A file that does not exist (yet) is [`Reading::Unchanged`].
    pub async fn read(&mut self) -> Reading {
        match self {
            Self::File(path) => match std::fs::read(&*path) {
                Ok(bytes) => Reading::Bytes(bytes),
                Err(_) => Reading::Unchanged,
            },
            Self::Url { url, etag } => {
                match pipeline::http::get_if_changed(url, etag.as_deref(), FETCH_TIMEOUT).await {
                    Ok(answer) => {
                        if answer.status == 200 {
                            etag.clone_from(&answer.etag);
                        }
                        reading_of(url, &answer)
                    }
                    // anyhow's `{:#}`: the error and its causes on one line.
                    Err(err) => Reading::Unavailable(format!("{:#}", anyhow::Error::new(err))),
                }
            }
        }
    }
}

/// Follows whether the source can be read, and says when that changes: one WARN (and a
/// `/healthz` note) per cause, one INFO when it answers again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outage {
    cause: Option<String>,
}

/// A change [`Outage::observe`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutageChange {
    /// Not readable, for this (new) cause.
    Down(String),
    /// Readable again.
    Up,
}

impl Outage {
    /// Records one reading; `Some` when it is news.
    pub fn observe(&mut self, reading: &Reading) -> Option<OutageChange> {
        match reading {
            Reading::Unavailable(cause) if self.cause.as_ref() != Some(cause) => {
                self.cause = Some(cause.clone());
                Some(OutageChange::Down(cause.clone()))
            }
            Reading::Unavailable(_) => None,
            _ => self.cause.take().map(|_| OutageChange::Up),
        }
    }
}

/// Says a change in the log and in `/healthz`.
pub fn announce(change: &OutageChange, source: &ArtifactSource, version: &str, health: &Health) {
    match change {
        OutageChange::Down(cause) => {
            tracing::warn!(source = %source.describe(), %version, error = %cause, "cannot fetch the model artifact; still serving the current model, trying again");
            health.set_note(
                NOTE,
                Some(format!(
                    "cannot fetch the model artifact from {} ({cause}); serving {version}",
                    source.describe()
                )),
            );
        }
        OutageChange::Up => {
            tracing::info!(source = %source.describe(), "the model artifact's source answers again");
            health.set_note(NOTE, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::http::Fetched;

    fn answer(status: u16, body: &str) -> Fetched {
        Fetched {
            status,
            status_line: format!("HTTP/1.1 {status}"),
            etag: None,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn answers_are_read_as_artifact_unchanged_or_unavailable() {
        let url = "http://trainer:9104/model";
        assert_eq!(
            reading_of(url, &answer(200, "{}")),
            Reading::Bytes(b"{}".to_vec())
        );
        assert_eq!(reading_of(url, &answer(304, "")), Reading::Unchanged);
        assert_eq!(
            reading_of(
                url,
                &answer(503, "MODEL_PATH is not a valid artifact\nmore")
            ),
            Reading::Unavailable(
                "GET http://trainer:9104/model: HTTP/1.1 503: MODEL_PATH is not a valid artifact"
                    .to_owned()
            )
        );
    }

    #[test]
    fn an_outage_is_reported_once_per_cause_and_its_end_once() {
        let mut outage = Outage::default();
        let down = Reading::Unavailable("connection refused".into());
        assert_eq!(outage.observe(&Reading::Unchanged), None);
        assert_eq!(
            outage.observe(&down),
            Some(OutageChange::Down("connection refused".into()))
        );
        assert_eq!(outage.observe(&down), None);
        let other = Reading::Unavailable("503".into());
        assert_eq!(
            outage.observe(&other),
            Some(OutageChange::Down("503".into()))
        );
        assert_eq!(outage.observe(&Reading::Unchanged), Some(OutageChange::Up));
        assert_eq!(outage.observe(&Reading::Bytes(vec![1])), None);
    }

    #[test]
    fn the_url_wins_and_neither_is_no_source() {
        let path = PathBuf::from("models/model.json");
        let url = "http://trainer:9104/model".to_owned();
        assert!(matches!(
            ArtifactSource::of(Some(&path), None),
            Some(ArtifactSource::File(_))
        ));
        assert!(matches!(
            ArtifactSource::of(None, Some(&url)),
            Some(ArtifactSource::Url { .. })
        ));
        assert!(ArtifactSource::of(None, None).is_none());
    }
}
