//! Whether the members waiting for a quorum form one now, and what must happen first: a pure
//! function of counts, steps, histories and times, so every branch is tested without a machine
//! (the shape of TorchFT's lighthouse `quorum_compute`).

use std::time::{Duration, Instant};

/// One member's waiting request, as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Asking {
    /// The step it is about to run.
    pub step: u64,
    /// The quorum id under which its last applied step committed (0: unknown).
    pub commit_quorum: u64,
    /// When it asked.
    pub since: Instant,
}

/// The coordinator's side of the decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Position {
    /// Steps committed.
    pub step: u64,
    /// The quorum id of the last commit (0: unknown, any history matches).
    pub commit_quorum: u64,
    /// The last commit is step `step - 1` of the current epoch and can be taken back.
    pub undoable: bool,
}

/// The configuration the decision follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// No quorum with fewer members.
    pub min_workers: usize,
    /// How long the first request waits for members that have not asked before a quorum forms
    /// without them.
    pub step_timeout: Duration,
}

/// Why no quorum forms yet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum NotYet {
    /// Fewer live members than `min_workers`.
    BelowMinWorkers,
    /// Some live members have not asked, and the step timeout has not passed (or too few asked).
    WaitingForMembers,
    /// Nobody asking is up to date, but a member that has not asked may be.
    StragglerMayBeUpToDate,
}

/// The decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Formation {
    /// No quorum yet.
    NotYet(NotYet),
    /// Form at the coordinator's step.
    Form,
    /// Everyone is one step behind a commit nobody alive applied (it was persisted but never
    /// answered): take it back, then form at the step before it.
    Undo,
    /// No member is at the coordinator's step and history: adopt the most advanced member's,
    /// then form.
    Reset {
        /// The step to adopt.
        to: u64,
        /// The history (commit quorum id) that goes with it.
        commit_quorum: u64,
    },
    /// Every member is fresh while the run has trained: nobody holds the model.
    Fail(String),
}

/// Whether a member at `step` with history `commit_quorum` holds the coordinator's state.
pub(crate) fn up_to_date(at: Position, step: u64, commit_quorum: u64) -> bool {
    step == at.step && (at.commit_quorum == 0 || commit_quorum == 0 || commit_quorum == at.commit_quorum)
}

/// The cheap part of the decision, on counts alone: no quorum forms while fewer than all `live`
/// members asked, unless at least `min_workers` did and the oldest request is overdue. The
/// machine asks this on every request before it builds the list for [`decide`].
pub(crate) fn waiting_for_members(live: usize, asked: usize, oldest: Option<Instant>, rules: Rules, now: Instant) -> bool {
    if asked >= live {
        return false;
    }
    let overdue = oldest.is_some_and(|t| now.saturating_duration_since(t) > rules.step_timeout);
    asked < rules.min_workers || !overdue
}

/// Decide on the requests of the members that asked (`asked`, in rank order) out of `live`.
pub(crate) fn decide(live: usize, asked: &[Asking], at: Position, rules: Rules, now: Instant) -> Formation {
    if live < rules.min_workers {
        return Formation::NotYet(NotYet::BelowMinWorkers);
    }
    let oldest = asked.iter().map(|a| a.since).min();
    if waiting_for_members(live, asked.len(), oldest, rules, now) {
        return Formation::NotYet(NotYet::WaitingForMembers);
    }
    if asked.iter().any(|a| up_to_date(at, a.step, a.commit_quorum)) {
        return Formation::Form;
    }
    if asked.len() < live {
        return Formation::NotYet(NotYet::StragglerMayBeUpToDate);
    }
    let all_one_behind = at.step > 0 && asked.iter().all(|a| a.step == at.step - 1);
    if all_one_behind && at.undoable {
        return Formation::Undo;
    }
    if at.step > 1 && asked.iter().all(|a| a.step == 0) {
        // Going on would train a new model from initialisation over the rest of the data and
        // overwrite the run's metrics and checkpoints: stop and say how to continue instead.
        return Formation::Fail(format!(
            "the run is at step {} but every live worker is fresh (step 0): no worker holds the trained model. \
             Restart the coordinator with --resume latest to continue from the newest checkpoint \
             (set log.checkpoint_every), or start a new run directory",
            at.step
        ));
    }
    let to = asked.iter().map(|a| a.step).max().unwrap_or(0);
    let commit_quorum = asked.iter().find(|a| a.step == to).map_or(0, |a| a.commit_quorum);
    Formation::Reset { to, commit_quorum }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules { min_workers: 2, step_timeout: Duration::from_secs(30) };

    fn at(step: u64, commit_quorum: u64, undoable: bool) -> Position {
        Position { step, commit_quorum, undoable }
    }

    fn asking(t: Instant, requests: &[(u64, u64)]) -> Vec<Asking> {
        requests.iter().map(|&(step, commit_quorum)| Asking { step, commit_quorum, since: t }).collect()
    }

    #[test]
    fn forms_when_every_live_member_asked_and_one_is_up_to_date() {
        let t = Instant::now();
        assert_eq!(decide(1, &asking(t, &[(0, 0)]), at(0, 0, false), RULES, t), Formation::NotYet(NotYet::BelowMinWorkers));
        assert_eq!(decide(3, &asking(t, &[(4, 7), (4, 7)]), at(4, 7, false), RULES, t), Formation::NotYet(NotYet::WaitingForMembers));
        // A member behind heals; one up to date is enough.
        assert_eq!(decide(3, &asking(t, &[(4, 7), (2, 5), (0, 0)]), at(4, 7, false), RULES, t), Formation::Form);
        // Unknown histories (0) match any.
        assert_eq!(decide(2, &asking(t, &[(4, 0), (4, 0)]), at(4, 7, false), RULES, t), Formation::Form);
    }

    #[test]
    fn past_the_step_timeout_the_members_that_asked_form_without_a_straggler() {
        let t = Instant::now();
        let later = t + Duration::from_secs(31);
        let two = asking(t, &[(4, 7), (4, 7)]);
        assert_eq!(decide(3, &two, at(4, 7, false), RULES, t + Duration::from_secs(29)), Formation::NotYet(NotYet::WaitingForMembers));
        assert_eq!(decide(3, &two, at(4, 7, false), RULES, later), Formation::Form);
        // ... but not below min_workers, and not when the straggler may be the one up to date.
        assert_eq!(decide(3, &asking(t, &[(4, 7)]), at(4, 7, false), RULES, later), Formation::NotYet(NotYet::WaitingForMembers));
        assert_eq!(
            decide(3, &asking(t, &[(3, 6), (3, 6)]), at(4, 7, true), RULES, later),
            Formation::NotYet(NotYet::StragglerMayBeUpToDate)
        );
        assert!(waiting_for_members(3, 2, Some(t), RULES, t) && !waiting_for_members(3, 2, Some(t), RULES, later));
    }

    #[test]
    fn nobody_up_to_date_undoes_resets_or_fails() {
        let t = Instant::now();
        // Everyone one step behind an undoable commit: take it back.
        assert_eq!(decide(2, &asking(t, &[(3, 6), (3, 6)]), at(4, 7, true), RULES, t), Formation::Undo);
        // The same commit, not undoable (another epoch): adopt the members' step.
        assert_eq!(decide(2, &asking(t, &[(3, 6), (3, 6)]), at(4, 7, false), RULES, t), Formation::Reset { to: 3, commit_quorum: 6 });
        // At the step but of another history: reset to it with the members' history.
        assert_eq!(decide(2, &asking(t, &[(4, 9), (2, 5)]), at(4, 7, false), RULES, t), Formation::Reset { to: 4, commit_quorum: 9 });
        // Everyone fresh after training: nobody holds the model.
        match decide(2, &asking(t, &[(0, 0), (0, 0)]), at(5, 7, false), RULES, t) {
            Formation::Fail(why) => assert!(why.contains("--resume latest") && why.contains("step 5"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Fresh members at step 1 of a run: adopt step 0 (nothing trained is lost).
        assert_eq!(decide(2, &asking(t, &[(0, 0), (0, 0)]), at(1, 7, false), RULES, t), Formation::Reset { to: 0, commit_quorum: 0 });
    }
}
