//! The trainer's own HTTP route, `POST /retrain`.

use crate::policy::Trigger;
use crate::state::Request;
use crate::state::Shared;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::sync::oneshot;

/// `POST /retrain`: retrains now and answers with the outcome as JSON (200), or 500 with the
/// error.
pub(crate) async fn post_retrain(State(shared): State<Shared>) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    let request = Request {
        trigger: Trigger::Manual,
        reply: Some(tx),
    };
    if shared.requests.send(request).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        );
    }
    match rx.await {
        Ok(Ok(outcome)) => (
            StatusCode::OK,
            serde_json::to_string(&outcome).unwrap_or_default() + "\n",
        ),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, err + "\n"),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        ),
    }
}
