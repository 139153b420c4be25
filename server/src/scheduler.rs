//! The transitioner: given a work unit's policy and its replicas, decide whether it validates,
//! fails, or needs more replicas. Pure functions, so every rule is tested without a database;
//! `store` applies the decision under the work unit's row lock.

use std::collections::BTreeMap;

/// A work unit's replication policy, with BOINC's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Agreeing successful replicas needed to validate.
    pub min_quorum: i32,
    /// Replicas issued at submission.
    pub target_nresults: i32,
    /// Error results after which the work unit fails.
    pub max_error_results: i32,
    /// Replicas ever issued; the scheduler never creates more.
    pub max_total_results: i32,
    /// Successful results without a quorum after which the work unit fails.
    pub max_success_results: i32,
    /// Seconds a worker has to report before its replica is reissued.
    pub delay_bound_secs: i32,
}

impl Policy {
    /// The policy with every unset (zero) field filled by its default, checked for consistency.
    pub fn with_defaults(
        min_quorum: u32,
        target_nresults: u32,
        max_error_results: u32,
        max_total_results: u32,
        max_success_results: u32,
        delay_bound_secs: u32,
    ) -> Result<Policy, String> {
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        let min_quorum = or(min_quorum, 2);
        // Range checks on the u32s before any arithmetic or narrowing.
        let fields = [
            min_quorum,
            target_nresults,
            max_error_results,
            max_total_results,
            max_success_results,
        ];
        if min_quorum > 64 || fields.iter().any(|&v| v > 256) || delay_bound_secs > 30 * 86_400 {
            return Err(
                "replication policy out of range (min_quorum <= 64, counts <= 256, delay_bound_secs <= 30 days)"
                    .into(),
            );
        }
        let target_nresults = or(target_nresults, min_quorum);
        let p = Policy {
            min_quorum: min_quorum as i32,
            target_nresults: target_nresults as i32,
            max_error_results: or(max_error_results, 3) as i32,
            max_total_results: or(max_total_results, (2 * min_quorum + 2).max(target_nresults))
                as i32,
            max_success_results: or(max_success_results, min_quorum + 3) as i32,
            delay_bound_secs: or(delay_bound_secs, 600) as i32,
        };
        if p.target_nresults < p.min_quorum {
            return Err("target_nresults must be at least min_quorum".into());
        }
        if p.max_total_results < p.target_nresults {
            return Err("max_total_results must be at least target_nresults".into());
        }
        if p.max_success_results < p.min_quorum {
            return Err("max_success_results must be at least min_quorum".into());
        }
        Ok(p)
    }
}

/// Where one replica stands, as far as the transitioner cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaOutcome {
    /// Handed to a worker, not yet reported, deadline not passed.
    InFlight,
    /// Reported successfully with this output hash.
    Success([u8; 32]),
    /// Reported as an error (trap, out of fuel, bad output, ...).
    Error(String),
    /// Deadline passed or handed back; it may still report late, but nothing waits for it.
    Lost,
}

#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub id: i64,
    pub outcome: ReplicaOutcome,
}

/// What to do with a pending work unit.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A quorum agrees: `canonical` is the earliest agreeing replica.
    Validate {
        canonical: i64,
        valid: Vec<i64>,
        invalid: Vec<i64>,
    },
    /// The work unit can never validate.
    Fail { reason: String },
    /// Keep waiting, with this many replicas waiting to be handed out.
    Wait { unsent: i32 },
}

/// Decides the next state of a pending work unit. `n_issued` counts replicas ever created and
/// `unsent` those wanted but not yet handed out.
pub fn decide(policy: &Policy, n_issued: i32, unsent: i32, replicas: &[ReplicaView]) -> Decision {
    // Agreeing groups by output hash; each group's replicas in id order.
    let mut groups: BTreeMap<[u8; 32], Vec<i64>> = BTreeMap::new();
    let (mut errors, mut in_flight, mut successes) = (0, 0, 0);
    let mut last_error = None;
    for r in replicas {
        match &r.outcome {
            ReplicaOutcome::Success(hash) => {
                successes += 1;
                groups.entry(*hash).or_default().push(r.id);
            }
            ReplicaOutcome::Error(msg) => {
                errors += 1;
                last_error = Some(msg.as_str());
            }
            ReplicaOutcome::InFlight => in_flight += 1,
            ReplicaOutcome::Lost => {}
        }
    }
    for ids in groups.values_mut() {
        ids.sort_unstable();
    }
    // The largest group wins; among equals, the one reported first.
    let best = groups
        .values()
        .max_by(|a, b| a.len().cmp(&b.len()).then(b[0].cmp(&a[0])));
    let largest = best.map_or(0, |g| g.len() as i32);

    if let Some(group) = best.filter(|g| g.len() as i32 >= policy.min_quorum) {
        let invalid = groups
            .values()
            .filter(|g| g[0] != group[0])
            .flatten()
            .copied()
            .collect();
        return Decision::Validate {
            canonical: group[0],
            valid: group.clone(),
            invalid,
        };
    }
    if errors >= policy.max_error_results {
        return Decision::Fail {
            reason: format!(
                "{errors} error results (max_error_results {}); last: {}",
                policy.max_error_results,
                last_error.unwrap_or("")
            ),
        };
    }
    if successes >= policy.max_success_results {
        return Decision::Fail {
            reason: format!(
                "{successes} successful results without a quorum of {} (max_success_results {})",
                policy.min_quorum, policy.max_success_results
            ),
        };
    }
    // At least this many more agreeing results are needed; keep that many replicas out there.
    let needed = policy.min_quorum - largest;
    let room = policy.max_total_results - n_issued;
    let want = unsent.max(needed - in_flight).clamp(0, room.max(0));
    if want + in_flight == 0 {
        return Decision::Fail {
            reason: format!(
                "max_total_results ({}) issued without a quorum of {}",
                policy.max_total_results, policy.min_quorum
            ),
        };
    }
    Decision::Wait { unsent: want }
}

/// Prior probability that one worker returns a wrong result. A first, deliberately simple model:
/// the trust engine replaces it with per-worker estimated error rates.
pub const PRIOR_WORKER_ERROR: f64 = 0.1;

/// Confidence that a canonical result is right when `agreeing` distinct workers produced it:
/// `1 - ε^k`, the chance that not all of them were wrong in the same way, with ε the prior
/// per-worker error rate. k = 1 gives 0.9, k = 2 gives 0.99, k = 3 gives 0.999.
pub fn confidence(agreeing: usize) -> f64 {
    1.0 - PRIOR_WORKER_ERROR.powi(agreeing as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::with_defaults(2, 0, 0, 0, 0, 60).unwrap()
    }

    fn ok(id: i64, h: u8) -> ReplicaView {
        ReplicaView {
            id,
            outcome: ReplicaOutcome::Success([h; 32]),
        }
    }

    fn with(id: i64, outcome: ReplicaOutcome) -> ReplicaView {
        ReplicaView { id, outcome }
    }

    #[test]
    fn defaults_follow_min_quorum() {
        let p = policy();
        assert_eq!(
            (
                p.target_nresults,
                p.max_total_results,
                p.max_success_results
            ),
            (2, 6, 5)
        );
        assert!(Policy::with_defaults(3, 2, 0, 0, 0, 0).is_err());
        assert!(Policy::with_defaults(u32::MAX, 0, 0, 0, 0, 0).is_err());
        assert!(Policy::with_defaults(2, 0, u32::MAX, 0, 0, 0).is_err());
        assert!(Policy::with_defaults(2, 0, 0, 0, 0, u32::MAX).is_err());
    }

    #[test]
    fn two_equal_outputs_validate_with_the_first_as_canonical() {
        let d = decide(&policy(), 2, 0, &[ok(7, 1), ok(5, 1)]);
        assert_eq!(
            d,
            Decision::Validate {
                canonical: 5,
                valid: vec![5, 7],
                invalid: vec![]
            }
        );
    }

    #[test]
    fn disagreement_asks_for_one_more_and_the_tie_break_marks_the_odd_one_invalid() {
        assert_eq!(
            decide(&policy(), 2, 0, &[ok(1, 1), ok(2, 2)]),
            Decision::Wait { unsent: 1 }
        );
        assert_eq!(
            decide(&policy(), 3, 0, &[ok(1, 1), ok(2, 2), ok(3, 2)]),
            Decision::Validate {
                canonical: 2,
                valid: vec![2, 3],
                invalid: vec![1]
            }
        );
    }

    #[test]
    fn in_flight_replicas_count_towards_what_is_needed() {
        let d = decide(
            &policy(),
            2,
            0,
            &[ok(1, 1), with(2, ReplicaOutcome::InFlight)],
        );
        assert_eq!(d, Decision::Wait { unsent: 0 });
    }

    #[test]
    fn lost_replicas_are_replaced() {
        let d = decide(&policy(), 2, 0, &[ok(1, 1), with(2, ReplicaOutcome::Lost)]);
        assert_eq!(d, Decision::Wait { unsent: 1 });
    }

    #[test]
    fn too_many_errors_fail_with_the_last_error() {
        let e = |id| with(id, ReplicaOutcome::Error("out of fuel".into()));
        match decide(&policy(), 3, 0, &[e(1), e(2), e(3)]) {
            Decision::Fail { reason } => assert!(reason.contains("out of fuel"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn never_issues_past_max_total_results() {
        let lost = |id| with(id, ReplicaOutcome::Lost);
        // 6 issued, all lost: nothing more may be issued, so the unit fails.
        let rs: Vec<_> = (1..=6).map(lost).collect();
        assert!(matches!(
            decide(&policy(), 6, 0, &rs),
            Decision::Fail { .. }
        ));
        // 5 issued, one success: one more may go out.
        let mut rs: Vec<_> = (1..=4).map(lost).collect();
        rs.push(ok(5, 1));
        assert_eq!(decide(&policy(), 5, 0, &rs), Decision::Wait { unsent: 1 });
    }

    #[test]
    fn too_many_successes_without_consensus_fail() {
        let rs: Vec<_> = (1..=5).map(|i| ok(i, i as u8)).collect();
        assert!(matches!(
            decide(&policy(), 5, 0, &rs),
            Decision::Fail { .. }
        ));
    }

    #[test]
    fn confidence_grows_with_agreement() {
        assert!((confidence(2) - 0.99).abs() < 1e-12);
        assert!(confidence(3) > confidence(2));
    }
}
