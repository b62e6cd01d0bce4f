//! The operator's errors, translated once into an Event reason and a metric label.
//!
//! Only failures to act are errors (the API server refused a write, a worker did not answer).
//! What is wrong with a user's object (an invalid spec, a missing Secret) is observed state, a
//! [`Problem`](crate::Problem): it shows as a condition and a Warning Event, and the reconcile
//! succeeds.

use lakecache_api::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes API refused {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0} has no namespace")]
    NoNamespace(String),
    /// Not a failure: a step waits for something that takes time (worker pods stopping, node
    /// directories being removed) and is tried again; no Warning Event.
    #[error("waiting: {0}")]
    Waiting(String),
}

impl Error {
    /// A short CamelCase reason: the Event reason and the `reason` label of the error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(s) if s.code == 403 => "Forbidden",
                kube::Error::Api(s) if s.code == 409 => "Conflict",
                kube::Error::Api(s) if s.code == 422 => "Invalid",
                kube::Error::Api(_) => "ApiError",
                _ => "ApiUnreachable",
            },
            Error::Finalizer(_) => "FinalizerFailed",
            Error::Spec(_) => "InvalidSpec",
            Error::NoNamespace(_) => "NoNamespace",
            Error::Waiting(_) => "Waiting",
        }
    }
}

/// Wraps a kube error with what was being done.
pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}
