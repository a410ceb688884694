//! The trainer's own POST routes, `POST /retrain` and `POST /rollback?to=VERSION` (`GET /model`
//! is in `served.rs`), behind `ADMIN_TOKEN` when one is set.

use crate::config::AdminToken;
use crate::policy::Trigger;
use crate::state::Request;
use axum::Router;
use axum::extract::{Query, Request as HttpRequest, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long `POST /retrain` waits for its retrain (queued behind others, then fitted and scored).
/// Past it the client gets 504; the retrain itself still runs and is logged and counted.
pub(crate) const RETRAIN_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the route needs: the retrainer's queue and the time limit of an answer.
#[derive(Clone)]
struct Retrain {
    requests: mpsc::Sender<Request>,
    timeout: Duration,
}

/// The POST routes: `/retrain` answering within `timeout`, `/rollback` rewriting `model_path`;
/// both need `token` when it is set (401 otherwise).
pub(crate) fn routes(
    requests: mpsc::Sender<Request>,
    timeout: Duration,
    model_path: PathBuf,
    token: AdminToken,
) -> Router {
    let retrain = Router::new()
        .route("/retrain", axum::routing::post(post_retrain))
        .with_state(Retrain { requests, timeout });
    let rollback = Router::new()
        .route("/rollback", axum::routing::post(post_rollback))
        .with_state(model_path);
    retrain
        .merge(rollback)
        .layer(axum::middleware::from_fn_with_state(token, require_token))
}

/// Lets a request through when it carries the token (or none is set); 401 otherwise.
async fn require_token(
    State(token): State<AdminToken>,
    request: HttpRequest,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if token.admits(authorization) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this route needs Authorization: Bearer <ADMIN_TOKEN>\n",
        )
            .into_response()
    }
}

/// The query of `POST /rollback`.
#[derive(serde::Deserialize)]
struct RollbackQuery {
    to: String,
}

/// `POST /rollback?to=VERSION`: puts `<VERSION>.json` (or `.onnx`) beside `MODEL_PATH` back as `MODEL_PATH`
/// (as `model rollback` does), so model replicas, on the file or on `GET /model`, swap to it.
/// 200 with what is served now, 400 when the version cannot be served.
async fn post_rollback(
    State(model_path): State<PathBuf>,
    Query(query): Query<RollbackQuery>,
) -> impl IntoResponse {
    let version = query.to.clone();
    let done =
        tokio::task::spawn_blocking(move || model::artifact::rollback(&model_path, &version)).await;
    match done {
        Ok(Ok(restored)) => {
            let version = &restored.model.version;
            tracing::warn!(%version, "rolled back on POST /rollback");
            let mut body = serde_json::json!({
                "serving_version": version,
                "family": restored.model.family(),
            });
            if let Some(artifact) = &restored.artifact {
                body["trained_at"] = artifact.trained_at.clone().into();
                body["mae"] = artifact.metrics.mae.into();
            }
            (StatusCode::OK, body.to_string() + "\n")
        }
        Ok(Err(err)) => (StatusCode::BAD_REQUEST, format!("{err:#}\n")),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the rollback did not finish: {err}\n"),
        ),
    }
}

/// `POST /retrain`: retrains now and answers with the outcome as JSON (200), 500 with the error,
/// 503 when the trainer is shutting down, or 504 when no outcome came within the time limit.
async fn post_retrain(State(retrain): State<Retrain>) -> impl IntoResponse {
    let shutting_down = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        )
    };
    let (tx, rx) = oneshot::channel();
    let request = Request {
        trigger: Trigger::Manual,
        reply: Some(tx),
    };
    // Queueing counts against the limit too: a full queue means retrains are already waiting.
    let answer = tokio::time::timeout(retrain.timeout, async {
        if retrain.requests.send(request).await.is_err() {
            return None;
        }
        rx.await.ok()
    })
    .await;
    match answer {
        Ok(Some(Ok(outcome))) => (
            StatusCode::OK,
            serde_json::to_string(&outcome).unwrap_or_default() + "\n",
        ),
        Ok(Some(Err(err))) => (StatusCode::INTERNAL_SERVER_ERROR, err + "\n"),
        Ok(None) => shutting_down(),
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the retrain did not finish within {} s; once it runs, its outcome is in the \
                 trainer's log and in pipeline_trainer_retrains_total\n",
                retrain.timeout.as_secs_f64()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrain::Outcome;

    /// Serves the route on a free local port; returns its URL.
    async fn serve(requests: mpsc::Sender<Request>, timeout: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = routes(
            requests,
            timeout,
            PathBuf::from("unused/model.json"),
            AdminToken::default(),
        );
        tokio::spawn(async move { axum::serve(listener, routes).await });
        format!("http://{addr}/retrain")
    }

    async fn post(url: &str) -> (u16, String) {
        let response = reqwest::Client::new().post(url).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    #[tokio::test]
    async fn a_retrain_that_does_not_answer_in_time_is_a_504() {
        let (tx, mut rx) = mpsc::channel(4);
        let url = serve(tx, Duration::from_millis(200)).await;
        // A retrainer stuck in a long retrain: it takes the request and keeps it.
        let stuck = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(request) = rx.recv().await {
                held.push(request);
            }
        });
        let started = std::time::Instant::now();
        let (status, body) = post(&url).await;
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("did not finish within 0.2 s"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(5));
        stuck.abort();
    }

    #[tokio::test]
    async fn a_full_queue_counts_against_the_limit() {
        // Nobody takes requests and the queue holds one, already taken: the send itself waits.
        let (tx, _rx) = mpsc::channel(1);
        tx.try_send(Request {
            trigger: Trigger::Labels,
            reply: None,
        })
        .unwrap_or_else(|_| panic!("the queue has room"));
        let url = serve(tx, Duration::from_millis(200)).await;
        assert_eq!(post(&url).await.0, 504);
    }

    #[tokio::test]
    async fn outcomes_errors_and_shutdown_are_answered() {
        let (tx, mut rx) = mpsc::channel::<Request>(4);
        let url = serve(tx, Duration::from_secs(10)).await;
        let retrainer = tokio::spawn(async move {
            let mut n = 0;
            while let Some(request) = rx.recv().await {
                n += 1;
                let reply = if n == 1 {
                    Ok(Outcome {
                        result: "skipped",
                        trigger: "manual",
                        serving_version: "ols-1".to_owned(),
                        candidate_version: None,
                        serving_mae: None,
                        candidate_mae: None,
                        serving_log_loss: None,
                        candidate_log_loss: None,
                        serving_accuracy: None,
                        candidate_accuracy: None,
                        train_rows: 0,
                        holdout_rows: 0,
                        detail: "too few samples".to_owned(),
                    })
                } else {
                    Err("cannot fit".to_owned())
                };
                let _ = request.reply.unwrap().send(reply);
                if n == 2 {
                    // The retrainer ends (shutdown): later requests find the queue closed.
                    return;
                }
            }
        });
        let (status, body) = post(&url).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"skipped\""), "{body}");
        let (status, body) = post(&url).await;
        assert_eq!((status, body.as_str()), (500, "cannot fit\n"));
        retrainer.await.unwrap();
        let (status, body) = post(&url).await;
        assert_eq!((status, body.as_str()), (503, "shutting down\n"));
    }

    #[tokio::test]
    async fn with_a_token_the_post_routes_need_it_and_rollback_puts_a_version_back() {
        let dir = tempfile::tempdir().unwrap();
        let model_path = dir.path().join("model.json");
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
        let v1 = model::artifact::Artifact::train(&data, None, Some("v1".to_owned())).unwrap();
        v1.write(&dir.path().join("v1.json")).unwrap();
        let v2 = model::artifact::Artifact::train(&data, None, Some("v2".to_owned())).unwrap();
        v2.write(&model_path).unwrap();

        let (tx, _rx) = mpsc::channel(4);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = routes(
            tx,
            Duration::from_secs(1),
            model_path.clone(),
            AdminToken::new("t0k"),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let post = |path: &str, token: Option<&str>| {
            let mut request = client.post(format!("http://{addr}{path}"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send()
        };

        for (path, token) in [
            ("/retrain", None),
            ("/retrain", Some("wrong")),
            ("/rollback?to=v1", None),
            ("/rollback?to=v1", Some("t0")),
        ] {
            let response = post(path, token).await.unwrap();
            assert_eq!(response.status().as_u16(), 401, "{path} {token:?}");
        }
        let served = |path: &std::path::Path| {
            model::artifact::Artifact::parse(&std::fs::read_to_string(path).unwrap())
                .unwrap()
                .version
        };
        assert_eq!(served(&model_path), "v2", "refused requests change nothing");

        let response = post("/rollback?to=v9", Some("t0k")).await.unwrap();
        assert_eq!(response.status().as_u16(), 400);
        assert!(
            response
                .text()
                .await
                .unwrap()
                .contains("no artifact of version v9")
        );
        let response = post("/rollback?to=v1", Some("t0k")).await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["serving_version"], "v1");
        assert_eq!(served(&model_path), "v1");
    }
}
