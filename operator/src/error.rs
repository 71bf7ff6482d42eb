//! Reconcile errors. Each has a short stable label for the failure metric and Events.

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),

    /// A referenced Secret or key does not exist (yet).
    #[error("{0}")]
    MissingSecret(String),

    /// The spec passed the schema but is still unusable.
    #[error("invalid spec: {0}")]
    Invalid(String),

    /// Reading a referenced object failed.
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },

    /// Server-side apply of an owned object failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },

    /// Deleting an object that is no longer wanted failed.
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },

    /// A watch cache the reconcile reads from has not synced.
    #[error("the {0} cache has not synced yet")]
    CacheNotReady(&'static str),

    /// Writing status failed.
    #[error("patching status: {0}")]
    Status(#[source] Box<kube::Error>),

    /// Rendering the gateway config failed.
    #[error("rendering gateway config: {0}")]
    Render(#[from] toml::ser::Error),

    /// Issuing the gRPC certificates failed.
    #[error("issuing the session gRPC certificates: {0}")]
    Certificate(#[from] crate::certs::CertError),

    /// Adding or removing the finalizer failed, or the wrapped step failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Stable label for `mtproto_operator_reconcile_errors_total{error=...}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingField(_) => "missing_field",
            Self::MissingSecret(_) => "missing_secret",
            Self::Invalid(_) => "invalid_spec",
            Self::Read { .. } => "read",
            Self::Apply { .. } => "apply",
            Self::Delete { .. } => "delete",
            Self::CacheNotReady(_) => "cache_not_ready",
            Self::Status(_) => "status",
            Self::Render(_) => "render",
            Self::Certificate(_) => "certificate",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::finalizer::Error as FinalizerError;

    #[test]
    fn finalizer_wrapping_keeps_the_inner_label() {
        let wrapped = Error::Finalizer(Box::new(FinalizerError::ApplyFailed(
            Error::MissingSecret("x".into()),
        )));
        assert_eq!(wrapped.metric_label(), "missing_secret");
        let bare = Error::Finalizer(Box::new(FinalizerError::UnnamedObject));
        assert_eq!(bare.metric_label(), "finalizer");
    }
}
