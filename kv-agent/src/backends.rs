//! Backends the agent creates by name, one cargo feature each.

use kv_core::BackendFactory;

/// The factory for `name`, if this build has that backend.
pub(crate) fn factory(name: &str) -> Option<BackendFactory> {
    FACTORIES.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Names of the backends this build can create.
pub(crate) fn known() -> Vec<&'static str> {
    FACTORIES.iter().map(|(n, _)| *n).collect()
}

const FACTORIES: &[(&str, BackendFactory)] = &[
    #[cfg(feature = "tcp")]
    ("tcp", kv_backend_tcp::create),
    #[cfg(feature = "ucx")]
    ("ucx", kv_backend_ucx::create),
    #[cfg(feature = "libfabric")]
    ("libfabric", kv_backend_libfabric::create),
    #[cfg(feature = "gds")]
    ("gds", kv_backend_gds::create),
];
