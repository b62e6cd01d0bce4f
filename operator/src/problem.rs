//! Problems: what is wrong with a user's object, as opposed to what failed in the operator.
//!
//! An operator that returned an error for an invalid spec or a missing Secret would retry it
//! with backoff, log it as its own failure, and leave the object's status as it was: the user
//! who can fix it would see nothing, and the metric of reconcile errors would count the user's
//! mistakes as the operator's. So the two are kept apart. An [`Error`](crate::Error) is a
//! failure to act (the API server refused a write, a worker did not answer) and goes through
//! the controller frame ([`crate::controller::reconcile_with`]). A [`Problem`] is observed state:
//! the reconcile that finds it succeeds, the status shows it as conditions, and it is reported
//! once, the same way by every controller ([`Problem::report`]): a Warning Event that names
//! what to fix, and the `object_problems` metric labelled with the same reason.

use kube::Resource;
use kube::runtime::events::EventType;

use crate::Context;
use crate::conditions::Cond;

/// The Event action under which problems are published.
pub const ACTION: &str = "Validate";

/// Something wrong with an object or what it refers to, found without acting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase: the conditions' reason, the Warning Event's reason and the metric label.
    pub reason: &'static str,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl Problem {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// Condition `type_` with `status`, saying this problem.
    pub fn cond(&self, type_: &'static str, status: bool) -> Cond {
        Cond::new(type_, status, self.reason, self.message.clone())
    }

    /// Counts the problem for `controller` and publishes it as a Warning Event on `obj`.
    pub async fn report<K: Resource<DynamicType = ()>>(
        &self,
        ctx: &Context,
        obj: &K,
        controller: &str,
    ) {
        ctx.metrics.problem(controller, self.reason);
        ctx.event(
            obj,
            EventType::Warning,
            self.reason,
            ACTION,
            self.message.clone(),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problems_condition_carries_its_reason_and_message() {
        let p = Problem::new("SecretNotFound", "Secret ml/creds does not exist");
        let c = p.cond("Ready", false);
        assert_eq!(
            c,
            Cond::new(
                "Ready",
                false,
                "SecretNotFound",
                "Secret ml/creds does not exist"
            )
        );
    }
}
