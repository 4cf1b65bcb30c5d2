//! A missing libucp is `BackendUnavailable` (never a panic or a link error), also when
//! named through `KV_UCX_LIB`. Its own test binary: it sets the variable for the process.

use kv_core::{Error, Params};

#[test]
fn kv_ucx_lib_pointing_nowhere_is_unavailable() {
    std::env::set_var("KV_UCX_LIB", "/nonexistent/dir/libucp.so.0");
    let created = kv_backend_ucx::create(&kv_core::BackendInit::new("a"), &Params::new());
    match &created {
        Err(Error::BackendUnavailable { name, reason }) => {
            assert_eq!(name, "ucx");
            assert!(reason.contains("/nonexistent/dir/libucp.so.0"), "{reason}");
            assert!(
                reason.contains("KV_UCX_LIB") && reason.contains("libucx0"),
                "{reason}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("created a backend from a nonexistent library"),
    }
    // The skip path: without KV_REQUIRE_BACKENDS naming ucx, tests skip (None).
    if !kv_core::backend_required("ucx") {
        assert!(kv_core::require_or_skip("ucx", created).is_none());
    }
}
