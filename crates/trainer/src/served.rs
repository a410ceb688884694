//! `GET /model`: the artifact this trainer promoted, for model replicas that cannot share its
//! folder (`MODEL_URL` on another machine). The bytes of `MODEL_PATH`, JSON or ONNX (the
//! `DATA_PATH` baseline while it does not exist), with a strong ETag so replicas poll with `If-None-Match` and get 304
//! while nothing changed; 503 while `MODEL_PATH` is not a valid artifact, so replicas keep what
//! they serve. A rollback (`model rollback`) writes `MODEL_PATH`, so it is served too.

use crate::model_file::ModelFile;
use crate::retrain::Promoter;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use model::served::ArtifactKind;
use sha2::{Digest as _, Sha256};

/// `application/json` for the JSON artifact, `application/octet-stream` for an ONNX graph.
fn content_type(bytes: &[u8]) -> &'static str {
    match ArtifactKind::of(bytes) {
        ArtifactKind::LinearJson => "application/json",
        ArtifactKind::Onnx => "application/octet-stream",
    }
}

/// The route `GET /model`.
pub(crate) fn routes(promoter: Promoter) -> Router {
    Router::new()
        .route("/model", axum::routing::get(get_model))
        .with_state(promoter)
}

/// What `GET /model` answers, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// 200 with the artifact's bytes and their ETag.
    Artifact { etag: String, bytes: Vec<u8> },
    /// 304: the client has these bytes.
    NotModified { etag: String },
    /// 503: no valid artifact to serve, and why.
    Unavailable(String),
}

/// The artifact served now and the answer to a client that has `if_none_match`.
pub(crate) fn answer(promoter: &Promoter, if_none_match: Option<&str>) -> Answer {
    let path = promoter.model_path.display();
    let bytes = match promoter.checked.read(&promoter.model_path) {
        (ModelFile::Valid(_), Some(bytes)) => bytes,
        (ModelFile::Absent, _) => promoter.baseline.bytes.clone(),
        (ModelFile::Unreadable(cause), _) => {
            return Answer::Unavailable(format!(
                "MODEL_PATH {path} is not a valid model artifact ({cause}); replicas keep \
                 serving what they have"
            ));
        }
        (ModelFile::Valid(_), None) => {
            return Answer::Unavailable(format!("cannot read MODEL_PATH {path}"));
        }
    };
    let etag = format!("\"{}\"", model::regression::hex(&Sha256::digest(&bytes)));
    if if_none_match.is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag)) {
        Answer::NotModified { etag }
    } else {
        Answer::Artifact { etag, bytes }
    }
}

async fn get_model(State(promoter): State<Promoter>, headers: HeaderMap) -> Response {
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let answer = tokio::task::spawn_blocking(move || answer(&promoter, if_none_match.as_deref()))
        .await
        .unwrap_or_else(|err| Answer::Unavailable(format!("cannot read the artifact: {err}")));
    match answer {
        Answer::Artifact { etag, bytes } => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, content_type(&bytes).to_owned()),
                (header::ETAG, etag),
                (header::CACHE_CONTROL, "no-cache".to_owned()),
            ],
            bytes,
        )
            .into_response(),
        Answer::NotModified { etag } => {
            (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response()
        }
        Answer::Unavailable(why) => (StatusCode::SERVICE_UNAVAILABLE, why + "\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrain::Baseline;
    use model::artifact::Artifact;
    use std::path::Path;

    fn promoter(dir: &Path) -> Promoter {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
        Promoter {
            model_path: dir.join("model.json"),
            holdout: 0.2,
            min_gain: 0.05,
            baseline: Baseline::linear(&Artifact::train(&data, None, None).unwrap()).unwrap(),
            replicas_serve: Default::default(),
            train_command: None,
            checked: Default::default(),
            task: pipeline::classes::Task::Regression,
        }
    }

    #[test]
    fn the_served_artifact_with_its_etag_then_304_then_503_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        let promoter = promoter(dir.path());
        // No MODEL_PATH yet: the baseline, the same bytes (and tag) every time.
        let Answer::Artifact { etag, bytes } = answer(&promoter, None) else {
            panic!()
        };
        let served = Artifact::parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
        assert_eq!(served.version, promoter.baseline.version);
        assert!(etag.starts_with('"') && etag.len() == 66, "{etag}");
        assert_eq!(
            answer(&promoter, Some(&etag)),
            Answer::NotModified { etag: etag.clone() }
        );
        // A promotion: new bytes, a new tag, so a client with the old one gets them.
        let mut v2 =
            Artifact::parse(std::str::from_utf8(&promoter.baseline.bytes).unwrap()).unwrap();
        v2.version = "v2".into();
        v2.write(&promoter.model_path).unwrap();
        let Answer::Artifact { etag: tag2, bytes } = answer(&promoter, Some(&etag)) else {
            panic!()
        };
        assert_ne!(tag2, etag);
        assert_eq!(bytes, std::fs::read(&promoter.model_path).unwrap());
        // Broken by hand: 503, so replicas keep v2.
        std::fs::write(&promoter.model_path, b"{\"format\": tru").unwrap();
        let Answer::Unavailable(why) = answer(&promoter, Some(&tag2)) else {
            panic!()
        };
        assert!(why.contains("is not a valid model artifact"), "{why}");
    }
}
