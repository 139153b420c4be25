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
    /// Adaptive replication: a trusted worker may get a work unit's first replica alone (see
    /// [`spot_check_probability`]); its result then validates with a quorum of one.
    pub adaptive: bool,
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
            adaptive: false,
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
    /// Issued unreplicated to a trusted worker: if it is the only success, it validates alone.
    pub solo: bool,
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

    // An unreplicated replica validates alone, unless other successes are there to compare.
    if successes == 1
        && let Some(only) = replicas
            .iter()
            .find(|r| r.solo && matches!(r.outcome, ReplicaOutcome::Success(_)))
    {
        return Decision::Validate {
            canonical: only.id,
            valid: vec![only.id],
            invalid: vec![],
        };
    }

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

// ---------------------------------------------------------------------------------------------
// Reputation, quotas, adaptive replication and confidence (ARCHITECTURE.md, "Trust engine").

/// Beta prior on a worker's rate of wrong (invalid) results: Beta(1, 9), mean 0.1, worth ten
/// observations. A new worker is assumed wrong one time in ten until its results say otherwise.
pub const PRIOR_WRONG: f64 = 1.0;
pub const PRIOR_RIGHT: f64 = 9.0;

/// A worker's estimated rate of wrong results: the mean of the Beta posterior after `valid`
/// results that agreed with a quorum and `invalid` ones that did not. Errors and timeouts are
/// not wrong results (they never become findings); they cost quota instead.
pub fn error_rate(valid: i64, invalid: i64) -> f64 {
    (invalid as f64 + PRIOR_WRONG) / ((valid + invalid) as f64 + PRIOR_WRONG + PRIOR_RIGHT)
}

/// BOINC's rule: a worker is trusted with unreplicated work after this many consecutive valid
/// results (any invalid or error result starts the count again).
pub const TRUST_AFTER_CONSECUTIVE_VALID: i64 = 10;
/// ... and, beyond BOINC, only while its estimated error rate is at most this (40 valid results
/// and no invalid one): a worker with a history of invalid results stays quarantined to
/// replicated work until many valid results outweigh it. At 0.05 the simulation let workers
/// that are wrong 10% of the time earn trust by luck and get about 1% wrong findings through;
/// at 0.02 none (BENCHMARKS.md).
pub const TRUST_MAX_ERROR_RATE: f64 = 0.02;

/// Whether a worker may run unreplicated work.
pub fn trusted(consecutive_valid: i64, valid: i64, invalid: i64) -> bool {
    consecutive_valid >= TRUST_AFTER_CONSECUTIVE_VALID
        && error_rate(valid, invalid) <= TRUST_MAX_ERROR_RATE
}

/// The chance a trusted worker's first replica of an adaptive work unit is still replicated
/// (a spot check: a second replica goes to another worker): `1 / consecutive_valid`, as BOINC
/// does, so checks grow rarer as unbroken agreement grows. Untrusted workers: always.
pub fn spot_check_probability(consecutive_valid: i64, valid: i64, invalid: i64) -> f64 {
    if trusted(consecutive_valid, valid, invalid) {
        1.0 / consecutive_valid as f64
    } else {
        1.0
    }
}

/// The most replicas a worker may take in one UTC day, and how much a valid result gives back.
/// The quota halves (never below 1) on every error, invalid result or timeout.
pub const QUOTA_MAX: i32 = 1000;
pub const QUOTA_STEP: i32 = 10;

/// The daily quota after one more result (`Some(true)` valid, `Some(false)` invalid, error or
/// timeout).
pub fn next_quota(quota: i32, good: bool) -> i32 {
    if good {
        (quota + QUOTA_STEP).min(QUOTA_MAX)
    } else {
        (quota / 2).max(1)
    }
}

/// The chance that a runtime or platform bug makes every replica on one platform agree on the
/// same wrong output (deterministic replicas share their bugs). Agreement across `m` distinct
/// platforms needs `m` independent bugs that happen to agree: `PLATFORM_BUG^m`.
pub const PLATFORM_BUG: f64 = 1e-3;

/// One worker whose output agreed with the canonical one.
#[derive(Debug, Clone)]
pub struct Voter {
    /// Its estimated error rate ([`error_rate`]) when the work unit validated.
    pub error_rate: f64,
    /// "arch/os" of the replica.
    pub platform: String,
}

/// Confidence that a canonical output is right, from the distinct workers that agreed on it.
///
/// Two independent ways to be wrong:
/// - every agreeing worker was wrong, and wrong the same way (the worst case, collusion): with
///   a 1:1 prior on the answer, Bayes gives `Π ε / (Π ε + Π (1 - ε))`, ε each worker's
///   estimated error rate. One worker (unreplicated) gives exactly its ε.
/// - a platform bug shared by every replica on a platform: `PLATFORM_BUG ^ distinct platforms`.
///
/// Confidence is the chance neither happened. Agreement by more workers, by workers with long
/// valid histories and across platforms all raise it; an unreplicated result is only as good
/// as its one worker.
pub fn confidence(agreeing: &[Voter]) -> f64 {
    if agreeing.is_empty() {
        return 0.0;
    }
    let (mut all_wrong, mut all_right) = (1.0, 1.0);
    for v in agreeing {
        let e = v.error_rate.clamp(1e-9, 1.0 - 1e-9);
        all_wrong *= e;
        all_right *= 1.0 - e;
    }
    let collusion = all_wrong / (all_wrong + all_right);
    let mut platforms: Vec<&str> = agreeing.iter().map(|v| v.platform.as_str()).collect();
    platforms.sort_unstable();
    platforms.dedup();
    let platform_bug = PLATFORM_BUG.powi(platforms.len() as i32);
    ((1.0 - collusion) * (1.0 - platform_bug)).clamp(0.0, 1.0)
}

/// A study's numeric tolerance: metric name -> (absolute, relative) allowed difference.
pub type Tolerance = BTreeMap<String, (f64, f64)>;

/// Whether two outputs' metrics agree under `tol`: the same metric names; each named metric
/// within `abs` or within `rel` of the larger magnitude; every other metric bit-equal. Payloads
/// are not compared (a study declaring a tolerance says its metrics are what it trusts).
pub fn within_tolerance(
    tol: &Tolerance,
    a: &BTreeMap<String, f64>,
    b: &BTreeMap<String, f64>,
) -> bool {
    a.len() == b.len()
        && a.iter().all(|(name, x)| {
            let Some(y) = b.get(name) else { return false };
            match tol.get(name) {
                Some((abs, rel)) => {
                    let d = (x - y).abs();
                    d <= *abs || d <= rel * x.abs().max(y.abs())
                }
                None => x.to_bits() == y.to_bits(),
            }
        })
}

/// Groups outputs under a tolerance: for each output (in replica id order), the index of the
/// first earlier output it agrees with, or its own. The store then compares replicas by their
/// group's representative, so `decide` stays the one rule for exact and tolerant comparison.
pub fn tolerance_groups(tol: &Tolerance, metrics: &[BTreeMap<String, f64>]) -> Vec<usize> {
    let mut reps: Vec<usize> = Vec::new();
    let mut out = Vec::with_capacity(metrics.len());
    for (i, m) in metrics.iter().enumerate() {
        match reps
            .iter()
            .find(|&&r| within_tolerance(tol, &metrics[r], m))
        {
            Some(&r) => out.push(r),
            None => {
                reps.push(i);
                out.push(i);
            }
        }
    }
    out
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
            solo: false,
        }
    }

    fn with(id: i64, outcome: ReplicaOutcome) -> ReplicaView {
        ReplicaView {
            id,
            outcome,
            solo: false,
        }
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

    fn voter(e: f64, platform: &str) -> Voter {
        Voter {
            error_rate: e,
            platform: platform.into(),
        }
    }

    #[test]
    fn confidence_grows_with_agreement_reputation_and_platforms() {
        let new = error_rate(0, 0);
        assert!((new - 0.1).abs() < 1e-12);
        let one = confidence(&[voter(new, "x86_64/linux")]);
        assert!((one - 0.9 * 0.999).abs() < 1e-9, "{one}");
        let two = confidence(&[voter(new, "x86_64/linux"), voter(new, "x86_64/linux")]);
        let three = confidence(&[voter(new, "a"), voter(new, "a"), voter(new, "a")]);
        assert!(two > one && three > two);
        // Two platforms beat one; seasoned workers beat new ones.
        let mixed = confidence(&[voter(new, "x86_64/linux"), voter(new, "aarch64/linux")]);
        assert!(mixed > two);
        let seasoned = error_rate(200, 0);
        assert!(confidence(&[voter(seasoned, "a"), voter(seasoned, "a")]) > two);
        // A cheater's agreement is worth little.
        let cheat = error_rate(5, 50);
        assert!(confidence(&[voter(cheat, "a"), voter(cheat, "a")]) < 0.1);
        assert_eq!(confidence(&[]), 0.0);
    }

    #[test]
    fn trust_needs_a_streak_and_a_clean_record() {
        assert!(!trusted(9, 100, 0), "a streak of 10 is needed");
        assert!(!trusted(10, 10, 0), "and a clean record of 40");
        assert!(trusted(40, 40, 0));
        assert!(
            !trusted(40, 80, 1),
            "one invalid needs many valid results to outweigh it"
        );
        assert!(trusted(40, 90, 1));
        assert_eq!(spot_check_probability(5, 5, 0), 1.0);
        assert_eq!(spot_check_probability(50, 50, 0), 0.02);
    }

    #[test]
    fn quota_halves_on_bad_results_and_grows_back() {
        assert_eq!(next_quota(1000, false), 500);
        assert_eq!(next_quota(1, false), 1);
        assert_eq!(next_quota(995, true), QUOTA_MAX);
        assert_eq!(next_quota(500, true), 510);
    }

    #[test]
    fn a_solo_success_validates_alone_but_not_against_others() {
        let solo = |id, h: u8| ReplicaView {
            id,
            outcome: ReplicaOutcome::Success([h; 32]),
            solo: true,
        };
        assert_eq!(
            decide(&policy(), 1, 0, &[solo(1, 1)]),
            Decision::Validate {
                canonical: 1,
                valid: vec![1],
                invalid: vec![]
            }
        );
        // The solo replica failed and the unit went back to replication: normal rules apply.
        assert_eq!(
            decide(&policy(), 3, 0, &[solo(1, 1), ok(2, 2)]),
            Decision::Wait { unsent: 1 }
        );
        let err = ReplicaView {
            id: 1,
            outcome: ReplicaOutcome::Error("trap".into()),
            solo: true,
        };
        assert_eq!(
            decide(&policy(), 1, 0, &[err]),
            Decision::Wait { unsent: 2 }
        );
    }

    #[test]
    fn tolerance_groups_close_metrics_and_keeps_others_exact() {
        let m = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let tol: Tolerance = [("loss".to_string(), (0.0, 1e-6))].into();
        let a = m(&[("loss", 1.0), ("steps", 10.0)]);
        let b = m(&[("loss", 1.0 + 1e-9), ("steps", 10.0)]);
        let c = m(&[("loss", 1.1), ("steps", 10.0)]);
        let d = m(&[("loss", 1.0), ("steps", 11.0)]);
        assert_eq!(tolerance_groups(&tol, &[a, b, c, d]), vec![0, 0, 2, 3]);
    }

    /// Random event orders against the transitioner: replicas are issued when it asks, and
    /// each in-flight replica then succeeds (right or one of two wrong answers), errs, or is
    /// lost, in random order. Whatever happens: never more than `max_total_results` replicas,
    /// a terminal decision within that budget, and a validation whose canonical replica leads
    /// an agreeing group of at least `min_quorum` (or is a lone solo replica), with every
    /// success marked valid or invalid exactly once.
    #[test]
    fn random_event_orders_keep_the_invariants() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20_000 {
            let q = 1 + next(3) as u32;
            let p =
                Policy::with_defaults(q, q + next(2) as u32, 1 + next(4) as u32, 0, 0, 60).unwrap();
            let mut replicas: Vec<ReplicaView> = Vec::new();
            let (mut n_issued, mut unsent) = (0, p.target_nresults);
            let solo_first = next(4) == 0;
            let decision = loop {
                // Hand out what is wanted, one at a time, sometimes late.
                if unsent > 0 && next(2) == 0 {
                    n_issued += 1;
                    unsent -= 1;
                    let solo = solo_first && n_issued == 1;
                    if solo {
                        unsent = 0;
                    }
                    assert!(n_issued <= p.max_total_results);
                    replicas.push(ReplicaView {
                        id: n_issued as i64,
                        outcome: ReplicaOutcome::InFlight,
                        solo,
                    });
                    continue;
                }
                let in_flight: Vec<usize> = (0..replicas.len())
                    .filter(|&i| replicas[i].outcome == ReplicaOutcome::InFlight)
                    .collect();
                if in_flight.is_empty() && unsent == 0 {
                    panic!("stuck: nothing in flight, nothing wanted: {replicas:?}");
                }
                if in_flight.is_empty() {
                    continue;
                }
                let i = in_flight[next(in_flight.len() as u64) as usize];
                replicas[i].outcome = match next(6) {
                    0 => ReplicaOutcome::Error("e".into()),
                    1 => ReplicaOutcome::Lost,
                    2 => ReplicaOutcome::Success([2 + next(2) as u8; 32]),
                    _ => ReplicaOutcome::Success([1; 32]),
                };
                match decide(&p, n_issued, unsent, &replicas) {
                    Decision::Wait { unsent: u } => {
                        assert!(n_issued + u <= p.max_total_results);
                        unsent = u;
                    }
                    d => break d,
                }
            };
            if let Decision::Validate {
                canonical,
                valid,
                invalid,
            } = decision
            {
                let hash = |id: i64| match &replicas[id as usize - 1].outcome {
                    ReplicaOutcome::Success(h) => *h,
                    o => panic!("not a success: {o:?}"),
                };
                assert_eq!(valid.iter().min(), Some(&canonical));
                assert!(valid.iter().all(|&v| hash(v) == hash(canonical)));
                assert!(invalid.iter().all(|&v| hash(v) != hash(canonical)));
                let lone_solo = valid.len() == 1 && replicas[canonical as usize - 1].solo;
                assert!(valid.len() as i32 >= p.min_quorum || lone_solo);
                let successes = replicas
                    .iter()
                    .filter(|r| matches!(r.outcome, ReplicaOutcome::Success(_)))
                    .count();
                assert_eq!(valid.len() + invalid.len(), successes);
            }
        }
    }
}
