//! The loopback backend passes the public conformance suite.

kv_core::conformance_tests!(kv_core::conformance::LoopbackHarness);

#[test]
fn run_all_passes() {
    kv_core::conformance::run_all(&kv_core::conformance::LoopbackHarness).unwrap();
}
