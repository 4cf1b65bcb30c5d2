//! `KV_FABRIC_LIB` naming a file that does not exist gives `BackendUnavailable`, and
//! `require_or_skip` turns that into a skip. Its own test binary, because it sets an
//! environment variable the other tests must not see.

use kv_core::{Error, Params};

#[test]
fn kv_fabric_lib_pointing_nowhere_is_backend_unavailable() {
    std::env::set_var("KV_FABRIC_LIB", "/nonexistent/libfabric.so.1");
    let created = kv_backend_libfabric::create(&kv_core::BackendInit::new("x"), &Params::new());
    match &created {
        Err(Error::BackendUnavailable { name, reason }) => {
            assert_eq!(name, "libfabric");
            assert!(
                reason.contains("/nonexistent/libfabric.so.1") && reason.contains("libfabric1"),
                "{reason}"
            );
        }
        Err(e) => panic!("want BackendUnavailable, got {e}"),
        Ok(_) => panic!("a nonexistent library loaded"),
    }
    if !kv_core::backend_required("libfabric") {
        assert!(kv_core::require_or_skip("libfabric", created).is_none());
    }
}
