//! The one place where failures become HTTP responses: an OCI error body with the status the
//! specification gives. docs/errors.md lists the mapping.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pier_mirror::fill::FillError;
use pier_mirror::MirrorError;
use pier_oci::{ErrorCode, RouteError};
use pier_registry::RegistryError;
use pier_store::{Blame, StoreError};
use pier_upstream::UpstreamError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Extra headers (`Range` for an out-of-order chunk, `Content-Range` for a bad range).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> ApiError {
        self.headers.push((name, value));
        self
    }

    pub fn digest_invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, message)
    }

    pub fn upload_invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BlobUploadInvalid,
            message,
        )
    }

    pub fn unsupported_method() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "method not allowed on this route",
        )
    }

    pub fn range(size: u64, message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::RangeInvalid,
            message,
        )
        .with_header("content-range", format!("bytes */{size}"))
    }

    pub fn pagination(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::PaginationNumberInvalid,
            message,
        )
    }
}

impl ApiError {
    /// A mirror failure. Upstream "not found" becomes a fast 404 (containerd then tries its next
    /// host); outages and corrupt answers are the upstream's fault (502), rate limits 429.
    pub fn from_mirror(e: MirrorError) -> ApiError {
        let msg = e.to_string();
        match e {
            MirrorError::NotAllowed(_) => {
                ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, msg)
            }
            MirrorError::Upstream(UpstreamError::NotFound)
            | MirrorError::Fill(FillError::NotFound) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, msg)
            }
            MirrorError::Upstream(UpstreamError::Denied(_))
            | MirrorError::Fill(FillError::Denied(_)) => {
                ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, msg)
            }
            MirrorError::Upstream(UpstreamError::TooManyRequests)
            | MirrorError::Fill(FillError::TooManyRequests) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                msg,
            ),
            // A full cache disk is pier's trouble, not the upstream's: 507, like a push.
            MirrorError::Fill(FillError::NoSpace(_)) => no_space(msg),
            MirrorError::Upstream(_) | MirrorError::Corrupt(_) | MirrorError::Fill(_) => {
                tracing::warn!(error = %msg, "upstream failure answered with 502");
                ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, msg)
            }
            MirrorError::Store(e) => ApiError::from(RegistryError::from(e)),
        }
    }

    /// Give a 404 the code of the thing that was not found.
    pub fn not_found_as(mut self, code: ErrorCode) -> ApiError {
        if self.status == StatusCode::NOT_FOUND {
            self.code = code;
        }
        self
    }
}

/// The disk is full (or below its free-space floor): `507 Insufficient Storage`, retryable
/// once space is freed. Reads keep working.
fn no_space(msg: String) -> ApiError {
    tracing::warn!(error = %msg, "write refused: no space left on device");
    ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::Unavailable,
        msg,
    )
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let msg = e.to_string();
        match e {
            RouteError::NotFound | RouteError::UploadId => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, msg)
            }
            RouteError::Name(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, msg)
            }
            RouteError::Reference(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, msg)
            }
            RouteError::Digest(_) => ApiError::digest_invalid(msg),
        }
    }
}

impl From<pier_sync::SyncError> for ApiError {
    fn from(e: pier_sync::SyncError) -> ApiError {
        use pier_sync::SyncError;
        let msg = e.to_string();
        match e {
            SyncError::UnknownRule(_) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, msg)
            }
            SyncError::Config(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, msg)
            }
            // A rule's upstream could not be listed: its fault, as for a mirrored read.
            SyncError::Upstream { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, msg)
            }
            SyncError::Store(e) => ApiError::from(e),
        }
    }
}

impl From<pier_store::StoreError> for ApiError {
    fn from(e: pier_store::StoreError) -> ApiError {
        ApiError::from(RegistryError::from(e))
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let code = e.code();
        let msg = e.to_string();
        let status = match &e {
            RegistryError::BlobUnknown
            | RegistryError::ManifestUnknown
            | RegistryError::NameUnknown
            | RegistryError::UploadUnknown => StatusCode::NOT_FOUND,
            RegistryError::ChunkOutOfOrder { current } => {
                let range = if *current == 0 {
                    "0-0".to_string()
                } else {
                    format!("0-{}", current - 1)
                };
                return ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, code, msg)
                    .with_header("range", range);
            }
            RegistryError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::TooManyUploads(_) => StatusCode::TOO_MANY_REQUESTS,
            RegistryError::UploadInvalid(_)
            | RegistryError::DigestInvalid(_)
            | RegistryError::ManifestInvalid(_)
            | RegistryError::ManifestBlobUnknown(_) => StatusCode::BAD_REQUEST,
            RegistryError::Store(StoreError::NoSpace(_)) => return no_space(msg),
            RegistryError::Store(StoreError::Unsupported(_)) => {
                return ApiError::new(StatusCode::NOT_IMPLEMENTED, ErrorCode::Unsupported, msg)
            }
            RegistryError::Store(_) => match e.blame() {
                Blame::Client => StatusCode::BAD_REQUEST,
                Blame::Internal if e.retryable() => StatusCode::SERVICE_UNAVAILABLE,
                Blame::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed inside pier");
        }
        ApiError::new(status, code, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message }]
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
        resp
    }
}
