//! The errors of `sluice-ingest`: [`Error`] for the service, [`PublishError`] for one
//! event that could not be stored, which decides the forge's answer.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::ErrorCode;
use axum::http::StatusCode;

/// Why ingest could not start or keep running. Per-request failures are not errors of
/// the service: they are answered with a status code (see `http.rs`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    #[error("cannot listen on {addr} for {what}: {source}{}", sluice_core::error::in_use_hint(.source))]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },

    #[error("cannot read the webhook secrets file {path}: {source}")]
    SecretsFile {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The parser's own error is left out on purpose: it can quote the offending line,
    /// which may be a secret.
    #[error("the webhook secrets file {path} is not valid: {reason}")]
    SecretsFormat { path: PathBuf, reason: String },

    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),

    #[error("invalid ingest settings: {setting} {requirement}")]
    InvalidSetting {
        setting: &'static str,
        requirement: &'static str,
    },
}

impl Error {
    /// A short, fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Core(e) => e.metric_label(),
            Error::Bind { .. } => "bind",
            Error::SecretsFile { .. } => "secrets_file",
            Error::SecretsFormat { .. } => "secrets_format",
            Error::Serve(_) => "serve",
            Error::InvalidSetting { .. } => "config",
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an event was not stored. A retryable one is answered 503 with `Retry-After`, so
/// the forge delivers it again; a permanent one with the status that says why a retry
/// cannot succeed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("NATS is not connected")]
    Disconnected,

    #[error("JetStream did not acknowledge within {0:?}")]
    Timeout(Duration),

    /// Refused before publishing: the events ahead would not be stored in time.
    #[error("JetStream is behind: {waiting} events waiting, this one would be answered about {wait:?} after it arrived")]
    Behind {
        waiting: usize,
        /// The predicted time from the request's arrival to its answer.
        wait: Duration,
    },

    /// Refused before publishing: the request took so long to arrive (a wait for a
    /// connection slot, a slow body) that no time is left to wait for JetStream before
    /// the answer is due.
    #[error("the request arrived {0:?} ago: no time left to store it before the answer is due")]
    Late(Duration),

    /// JetStream did not store the event now (no stream yet, no leader, too many in
    /// flight, a lost connection).
    #[error("JetStream did not store the event: {0}")]
    Refused(#[source] async_nats::jetstream::context::PublishError),

    /// The event is larger than the server or the events stream takes: a retry would
    /// be refused the same way.
    #[error("the event is larger than the events stream accepts: {0}")]
    TooLarge(#[source] async_nats::jetstream::context::PublishError),

    #[error("cannot open the payload object store: {0}")]
    PayloadStore(#[source] sluice_core::Error),

    #[error("cannot store the payload in the object store: {0}")]
    Payload(#[source] async_nats::jetstream::object_store::PutError),

    /// A bug, not the client's doing: an envelope always encodes.
    #[error("cannot encode the event: {0}")]
    Encode(#[source] serde_json::Error),
}

impl PublishError {
    /// Sorts JetStream's answer to a publish: a message too large for the server's
    /// `max_payload` or the stream's `max_msg_size` is permanent, anything else may pass
    /// on a retry.
    pub fn from_publish(e: async_nats::jetstream::context::PublishError) -> Self {
        let too_large = match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => true,
            PublishErrorKind::Other => std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                .is_some_and(|js| js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM),
            _ => false,
        };
        if too_large {
            PublishError::TooLarge(e)
        } else {
            PublishError::Refused(e)
        }
    }

    /// Whether the same delivery can be stored if the forge sends it again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, PublishError::TooLarge(_) | PublishError::Encode(_))
    }

    /// The status the forge is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            PublishError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            PublishError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
            PublishError::Disconnected
            | PublishError::Timeout(_)
            | PublishError::Behind { .. }
            | PublishError::Late(_)
            | PublishError::Refused(_)
            | PublishError::PayloadStore(_)
            | PublishError::Payload(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the forge is told: what to do, never the internal detail (that is logged).
    pub fn message(&self) -> &'static str {
        match self {
            PublishError::TooLarge(_) => "the event is larger than the events stream accepts",
            PublishError::Encode(_) => "the event could not be encoded",
            PublishError::Behind { .. } => {
                "too many events are waiting to be stored; this one was not stored, retry later"
            }
            PublishError::Late(_) => {
                "the request took too long to arrive; this one was not stored, retry later"
            }
            _ => "the event could not be stored; retry later",
        }
    }

    /// A short, fixed label for metrics: the request's outcome.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PublishError::Timeout(_) | PublishError::Late(_) => "timeout",
            PublishError::Behind { .. } => "shed",
            PublishError::TooLarge(_) => "too_large",
            PublishError::Encode(_) => "internal",
            PublishError::Disconnected
            | PublishError::Refused(_)
            | PublishError::PayloadStore(_)
            | PublishError::Payload(_) => "unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::PublishError as JsPublishError;

    use super::*;

    #[test]
    fn publish_errors_map_to_their_answers() {
        let refused =
            PublishError::from_publish(JsPublishError::new(PublishErrorKind::StreamNotFound));
        assert!(matches!(refused, PublishError::Refused(_)));
        assert!(refused.is_retryable());
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.metric_label(), "unavailable");

        let timeout = PublishError::Timeout(Duration::from_secs(4));
        assert!(timeout.is_retryable());
        assert_eq!(timeout.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(timeout.metric_label(), "timeout");

        let too_large =
            PublishError::from_publish(JsPublishError::new(PublishErrorKind::MaxPayloadExceeded));
        assert!(matches!(too_large, PublishError::TooLarge(_)));
        assert!(!too_large.is_retryable());
        assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(too_large.metric_label(), "too_large");

        let encode = PublishError::Encode(serde_json::Error::io(std::io::Error::other("x")));
        assert!(!encode.is_retryable());
        assert_eq!(encode.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn causes_are_kept() {
        let e = PublishError::from_publish(JsPublishError::new(PublishErrorKind::BrokenPipe));
        let cause = std::error::Error::source(&e).expect("a source");
        assert_eq!(cause.to_string(), "broken pipe");
    }
}
