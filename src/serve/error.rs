//! [`ServeError`]: why a request failed, with its HTTP status. Every error answers JSON
//! `{"error": "<message>", "status": <code>}`; the message is the CLI's for the same problem.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::segmenter::SegmentError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Malformed request: not JSON, bad query parameters, a broken multipart body (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong bearer token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// No such route (404).
    #[error("{0}")]
    NotFound(String),
    /// An image path or URL outside what the operator allows (403).
    #[error("{0}")]
    Forbidden(String),
    /// The upload is larger than `--max-upload-mb`, or the image cannot fit the memory budget (413).
    #[error("{0}")]
    TooLarge(String),
    /// A content type the endpoint does not take (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed but impossible: prompts, a corrupt or 4-D image, points outside it (422).
    #[error("{0}")]
    Unprocessable(String),
    /// The image URL could not be fetched (502).
    #[error("{0}")]
    BadGateway(String),
    /// Not ready, draining, or the queue is full: try again after `retry_after` seconds (503).
    #[error("{message}")]
    Unavailable { message: String, retry_after: u64 },
    /// The request took longer than `--timeout` (504).
    #[error("{0}")]
    Timeout(String),
    /// A bug or a failure of the machine (500); the server goes on serving.
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ServeError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ServeError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ServeError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A segmentation error as the client sees it. `precision_from_client`: the request chose its method, so a
    /// method that cannot run under `precision_fallback = deny` is the client's to change (422), not a fault of
    /// the server (500).
    pub fn from_segment(e: SegmentError, precision_from_client: bool) -> Self {
        match e {
            SegmentError::InvalidRequest(m) => ServeError::Unprocessable(m),
            SegmentError::FallbackDenied(m) if precision_from_client => {
                ServeError::Unprocessable(m)
            }
            other => ServeError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({"error": self.to_string(), "status": status.as_u16()});
        let mut r = (status, axum::Json(body)).into_response();
        match &self {
            ServeError::Unavailable { retry_after, .. } => {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ServeError::Unauthorized(_) => {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"vista3d\""),
                );
            }
            _ => {}
        }
        r
    }
}
