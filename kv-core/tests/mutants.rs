//! The conformance suite fails on broken backends: every deliberately broken variant of
//! the loopback backend (one per bug class) must fail `run_all`, in the case named for
//! it and for the reason that case checks — while the unmutated loopback passes.

use kv_core::conformance::{run_all, LoopbackHarness, MutantHarness};
use kv_core::loopback::Mutation;

/// Each mutant, the case that must catch it, and words of that case's failure message.
const EXPECTED: &[(Mutation, &str, &str)] = &[
    (
        Mutation::ReadWrongDirection,
        "read_sizes",
        "READ of 1 bytes: destination",
    ),
    (
        Mutation::NotifyBeforeData,
        "notification_after_data",
        "notification before its data",
    ),
    (
        Mutation::DeregisterNeverBusy,
        "deregister_busy",
        "it must be Busy",
    ),
    (
        Mutation::TargetSkipsBoundsCheck,
        "bounds_forged",
        "WRITE past the registration",
    ),
    (
        Mutation::CancelLeavesCopyQueued,
        "cancel_stops_copies",
        "a copy kept running",
    ),
    (
        Mutation::DeadlineIgnored,
        "expired_deadline",
        "want TimedOut",
    ),
    (
        Mutation::DisconnectEndsNotRegistered,
        "disconnect_inflight",
        "NotRegistered",
    ),
    (
        Mutation::PollAfterReleaseIdle,
        "poll_after_release",
        "gave Idle",
    ),
    (
        Mutation::ZeroLengthEndsList,
        "zero_length_descriptors",
        "with zero-length descriptors",
    ),
    (
        Mutation::NoLivenessCheck,
        "post_after_peer_deregister",
        "the peer deregistered gave Done",
    ),
    (
        Mutation::ReadOnlyNotEnforced,
        "read_only",
        "WRITE into a read-only registration succeeded",
    ),
    (
        Mutation::UnauthenticatedAccepted,
        "unauthenticated_peer_refused",
        "another cluster secret moved data",
    ),
    (
        Mutation::SelectionIgnored,
        "prepared_lists",
        "WRITE of selected items: remote memory",
    ),
    (
        Mutation::ListNotChecked,
        "prepared_lists",
        "naming memory outside the registrations was accepted",
    ),
];

/// The case named in a `run_all` error, and the rest of its message.
fn failing_case(msg: &str) -> Option<(&str, &str)> {
    msg.split_once("conformance case ")?.1.split_once(": ")
}

#[test]
fn every_mutant_is_caught_by_its_case() {
    run_all(&LoopbackHarness).expect("the unmutated loopback must pass the whole suite");
    for m in Mutation::ALL {
        assert!(
            EXPECTED.iter().any(|(x, ..)| *x == m),
            "{m:?} has no expected case"
        );
    }
    // Each mutant's suite on its own thread: they share nothing.
    let results: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = EXPECTED
            .iter()
            .map(|(m, ..)| s.spawn(move || run_all(&MutantHarness(*m))))
            .collect();
        runs.into_iter()
            .map(|r| match r.join() {
                Ok(Ok(())) => "conformance case (none): the suite passed".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "conformance case (panic): a case panicked".to_string(),
            })
            .collect()
    });
    let mut wrong = Vec::new();
    println!("{:<30} {:<30} message", "mutant", "caught by");
    for ((m, want_case, want_words), msg) in EXPECTED.iter().zip(&results) {
        let (case, why) = failing_case(msg).unwrap_or(("?", msg));
        println!("{:<30} {:<30} {why}", format!("{m:?}"), case);
        if case != *want_case || !why.contains(want_words) {
            wrong.push(format!(
                "{m:?}: want {want_case} ({want_words:?}), got {case}: {why}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "mutants not caught as expected:\n{}",
        wrong.join("\n")
    );
}
