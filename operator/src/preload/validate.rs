//! Validate: a CachePreload's spec into its parsed schedule, or a [`Problem`] (no I/O).
//!
//! The API server checks most of the spec (CEL rules in the CRD), but an object stored before a
//! rule existed, or a cron expression that has five fields and still means nothing (`61 3 * * *`)
//! gets through. Such a preload can never run until it is changed, so it is Failed for its
//! generation, with the field to fix in the message.

use lakecache_api::CachePreload;

use super::schedule::parse_schedule;
use crate::Problem;

/// `cp`'s schedule (`None`: it runs once per generation), or what is wrong with its spec.
pub fn validate(cp: &CachePreload) -> Result<Option<croner::Cron>, Problem> {
    cp.spec
        .validate()
        .map_err(|e| Problem::new("InvalidSpec", e.to_string()))?;
    cp.spec
        .schedule
        .as_deref()
        .map(parse_schedule)
        .transpose()
        .map_err(|e| Problem::new("InvalidSchedule", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preload(paths: &[&str], schedule: Option<&str>) -> CachePreload {
        crate::fixtures::preload(paths, schedule, None)
    }

    #[test]
    fn a_valid_spec_gives_its_schedule() {
        assert!(validate(&preload(&["train/**"], None)).unwrap().is_none());
        assert!(
            validate(&preload(&["train/**"], Some("0 3 * * *")))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_bad_spec_or_schedule_is_a_problem_naming_the_field() {
        let p = validate(&preload(&["/etc/passwd"], None)).unwrap_err();
        assert_eq!(p.reason, "InvalidSpec");
        assert!(p.message.contains("spec.paths[0]"), "{}", p.message);
        // The spec is checked before the schedule.
        let p = validate(&preload(&[], Some("61 3 * * *"))).unwrap_err();
        assert_eq!(p.reason, "InvalidSpec");
        let p = validate(&preload(&["train/**"], Some("61 3 * * *"))).unwrap_err();
        assert_eq!(p.reason, "InvalidSchedule");
        assert!(p.message.contains("spec.schedule"), "{}", p.message);
    }
}
