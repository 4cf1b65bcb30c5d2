//! `describe()` reports the transports UCX chose for each endpoint.

use kv_backend_ucx::{Options, UcxBackend};
use kv_core::Backend;

fn pair(tls: &str) -> Option<(UcxBackend, UcxBackend)> {
    let opts = Options {
        tls: Some(tls.into()),
        ..Default::default()
    };
    let a = kv_core::require_or_skip(
        "ucx",
        UcxBackend::new(&kv_core::BackendInit::new("a"), opts.clone()),
    )?;
    let b = UcxBackend::new(&kv_core::BackendInit::new("b"), opts).expect("second backend");
    Some((a, b))
}

#[test]
fn describe_names_the_transports() {
    for (tls, want) in [("tcp", "tcp"), ("posix,cma,self", "posix")] {
        let Some((a, b)) = pair(tls) else { return };
        let info = b.connection_info().unwrap();
        a.connect("b", &info).unwrap();
        let d = a.describe();
        eprintln!("{d}");
        assert!(d.contains(&format!("tls={tls}")), "{d}");
        assert!(d.contains("endpoint") && d.contains(want), "{d}");
    }
}
