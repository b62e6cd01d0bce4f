//! Conditions with correct transition times: a condition's `lastTransitionTime` moves only when
//! its status changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition as computed from observed state, before transition times are settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Turns computed conditions into API conditions, keeping each one's transition time from
/// `previous` when its status did not change.
pub fn settle(
    computed: Vec<Cond>,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    computed
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" }.to_string();
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.into(),
                status,
                reason: c.reason.into(),
                message: crate::truncate(&c.message, 32 * 1024),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// Whether condition `type_` is True in `conds`.
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    conds.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::t;

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let first = settle(
            vec![Cond::new("Ready", false, "WorkersNotReady", "0/2")],
            &[],
            Some(1),
            &t(100),
        );
        assert_eq!(first[0].last_transition_time, t(100));
        // Same status, new message: the time stays.
        let second = settle(
            vec![Cond::new("Ready", false, "WorkersNotReady", "1/2")],
            &first,
            Some(1),
            &t(200),
        );
        assert_eq!(second[0].last_transition_time, t(100));
        assert_eq!(second[0].message, "1/2");
        // New status: the time moves.
        let third = settle(
            vec![Cond::new("Ready", true, "AllWorkersReady", "2/2")],
            &second,
            Some(2),
            &t(300),
        );
        assert_eq!(third[0].last_transition_time, t(300));
        assert_eq!(third[0].observed_generation, Some(2));
        assert!(is_true(&third, "Ready"));
    }
}
