//! The trainer's own HTTP route, `POST /retrain` (`GET /model` is in `served.rs`).

use crate::policy::Trigger;
use crate::state::Request;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
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

/// The `POST /retrain` route, answering within `timeout`.
pub(crate) fn routes(requests: mpsc::Sender<Request>, timeout: Duration) -> Router {
    Router::new()
        .route("/retrain", axum::routing::post(post_retrain))
        .with_state(Retrain { requests, timeout })
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
        tokio::spawn(async move { axum::serve(listener, routes(requests, timeout)).await });
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
}
