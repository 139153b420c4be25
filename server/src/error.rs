//! The server's error type, and its one mapping onto gRPC status codes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something unacceptable; the message says what.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A name that is taken (a volunteer account's).
    #[error("{0}")]
    AlreadyExists(String),
    /// A worker (or its account) over its daily quota: it should come back later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A blocked worker.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the database is unreachable (restarting, network) or gave up on the statement
    /// (class 57: shut down, or cancelled at the hot path's `statement_timeout`) rather than
    /// refusing the query: worth retrying later.
    fn is_unavailable(e: &sqlx::Error) -> bool {
        matches!(
            e,
            sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
        ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("57") || c.starts_with("08")))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            Error::NotFound(m) => Status::not_found(m.clone()),
            Error::Unauthenticated(m) => Status::unauthenticated(m.clone()),
            Error::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            Error::AlreadyExists(m) => Status::already_exists(m.clone()),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m.clone()),
            Error::PermissionDenied(m) => Status::permission_denied(m.clone()),
            // Data exceptions and constraint violations: the request carried something the
            // schema refuses. Clear to the caller, and never retried as if it were transient.
            Error::Database(sqlx::Error::Database(d))
                if d.code()
                    .is_some_and(|c| c.starts_with("22") || c.starts_with("23")) =>
            {
                tracing::warn!(error = %e, "request refused by the schema");
                Status::invalid_argument(format!("refused by the database: {}", d.message()))
            }
            Error::Database(db) if Error::is_unavailable(db) => {
                tracing::warn!(error = %e, "database unavailable");
                Status::new(Code::Unavailable, "database unavailable, retry later")
            }
            Error::Database(_) | Error::Internal(_) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "internal error");
                Status::internal("internal error")
            }
        }
    }
}
