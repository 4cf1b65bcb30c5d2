//! The UCP context and its one worker: UCX's configuration read and given our settings
//! ([`crate::config`]), the context (active messages only) created, the worker created
//! `UCS_THREAD_MODE_SERIALIZED`, and what the worker tells about itself (its address,
//! its largest active-message header). Creation only: the core (`worker.rs`) owns the
//! handles and destroys them.

use std::ffi::CString;

use kv_core::{Error, Result};

use crate::config;
use crate::ffi::{self, Lib};

/// The context and worker for backend `agent` with the caller's UCX settings `config`
/// and transports `tls`, and the TCP segment sizes (send, receive) the context uses.
pub fn open(
    lib: &Lib,
    agent: &str,
    config: &[(String, String)],
    tls: Option<&str>,
) -> Result<(ffi::ucp_context_h, ffi::ucp_worker_h, (u32, u32))> {
    let name = cstring(agent, "agent name")?;
    let (ctx, tcp_segs) = open_context(lib, &name, config, tls)?;
    let worker = create_worker(lib, ctx)?;
    Ok((ctx, worker, tcp_segs))
}

fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        name: "ucx".into(),
        reason,
    }
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid_argument(format!("{what} contains a NUL byte")))
}

/// Reads UCX's configuration, applies our settings ([`config::settings`] of `config`
/// and `tls`) and creates the context (active messages only) named `name`; returns it with the TCP
/// segment sizes it uses.
fn open_context(
    lib: &Lib,
    name: &CString,
    config: &[(String, String)],
    tls: Option<&str>,
) -> Result<(ffi::ucp_context_h, (u32, u32))> {
    let settings = config::settings(config, tls);
    let mut config: ffi::ucp_config_p = std::ptr::null_mut();
    // SAFETY: NULL prefix and file mean "UCX_ environment"; out-pointer valid.
    lib.check("ucp_config_read", unsafe {
        (lib.config_read)(std::ptr::null(), std::ptr::null(), &mut config)
    })
    .map_err(|e| unavailable(e.to_string()))?;
    for (k, v) in &settings {
        let (ck, cv) = (cstring(k, "UCX setting")?, cstring(v, "UCX setting")?);
        // SAFETY: `config` came from ucp_config_read; both strings are NUL-terminated.
        let s = unsafe { (lib.config_modify)(config, ck.as_ptr(), cv.as_ptr()) };
        if s != ffi::UCS_OK {
            // SAFETY: releasing the config read above, once.
            unsafe { (lib.config_release)(config) };
            return Err(Error::invalid_argument(format!(
                "UCX setting {k}={v}: {}",
                lib.status_text(s)
            )));
        }
    }
    let tcp_segs = config::tcp_segments(&settings, tls);
    let params = ffi::ucp_params_t {
        field_mask: ffi::UCP_PARAM_FIELD_FEATURES
            | ffi::UCP_PARAM_FIELD_MT_WORKERS_SHARED
            | ffi::UCP_PARAM_FIELD_NAME,
        // Active messages only: without UCP_FEATURE_RMA the worker installs no handler
        // that reads or writes memory at a peer's request (UCX 1.13's software RMA
        // writes and reads any address a peer names), so our checked operations are
        // the only way in.
        features: ffi::UCP_FEATURE_AM,
        request_size: 0,
        request_init: None,
        request_cleanup: None,
        tag_sender_mask: 0,
        mt_workers_shared: 0,
        estimated_num_eps: 0,
        estimated_num_ppn: 0,
        name: name.as_ptr(),
    };
    let mut ctx: ffi::ucp_context_h = std::ptr::null_mut();
    // SAFETY: `ucp_init` is a static inline over ucp_init_version with the header's
    // API version; params, config and out-pointer are valid for the call.
    let s = unsafe {
        (lib.init_version)(
            ffi::API_VERSION.0,
            ffi::API_VERSION.1,
            &params,
            config,
            &mut ctx,
        )
    };
    // SAFETY: the context copied what it needed; the config is released once.
    unsafe { (lib.config_release)(config) };
    if s != ffi::UCS_OK {
        return Err(unavailable(format!(
            "ucp_init failed: {} (UCX_TLS / tls = {:?}; check `ucx_info -d` for the transports this host has)",
            lib.status_text(s),
            tls
        )));
    }
    Ok((ctx, tcp_segs))
}

/// The context's one worker, `UCS_THREAD_MODE_SERIALIZED`; cleans the context up if
/// UCX refuses.
fn create_worker(lib: &Lib, ctx: ffi::ucp_context_h) -> Result<ffi::ucp_worker_h> {
    let mut wp = ffi::ucp_worker_params_t {
        field_mask: ffi::UCP_WORKER_PARAM_FIELD_THREAD_MODE,
        thread_mode: ffi::UCS_THREAD_MODE_SERIALIZED,
        cpu_mask: ffi::ucs_cpu_set_t { bits: [0; 16] },
        events: 0,
        user_data: std::ptr::null_mut(),
        event_fd: -1,
        flags: 0,
        name: std::ptr::null(),
        am_alignment: 0,
        client_id: 0,
    };
    let mut worker: ffi::ucp_worker_h = std::ptr::null_mut();
    // SAFETY: valid context, params and out-pointer.
    let s = unsafe { (lib.worker_create)(ctx, &mut wp, &mut worker) };
    if s != ffi::UCS_OK {
        // SAFETY: the context was created above and nothing else uses it.
        unsafe { (lib.cleanup)(ctx) };
        return Err(unavailable(format!(
            "ucp_worker_create failed: {}",
            lib.status_text(s)
        )));
    }
    Ok(worker)
}

/// The largest active-message header the worker sends.
pub fn max_am_header(lib: &Lib, worker: ffi::ucp_worker_h) -> Result<usize> {
    let mut attr = ffi::ucp_worker_attr_t {
        field_mask: ffi::UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER,
        thread_mode: 0,
        address_flags: 0,
        address: std::ptr::null_mut(),
        address_length: 0,
        max_am_header: 0,
        name: [0; 32],
        max_debug_string: 0,
    };
    // SAFETY: valid worker and attribute struct.
    lib.check("ucp_worker_query", unsafe {
        (lib.worker_query)(worker, &mut attr)
    })?;
    Ok(attr.max_am_header)
}

/// The worker's address (what peers' `ucp_ep_create` needs).
pub fn worker_address(lib: &Lib, worker: ffi::ucp_worker_h) -> Result<Vec<u8>> {
    let mut addr: ffi::ucp_address_p = std::ptr::null_mut();
    let mut addr_len = 0usize;
    // SAFETY: valid worker and out-pointers.
    lib.check("ucp_worker_get_address", unsafe {
        (lib.worker_get_address)(worker, &mut addr, &mut addr_len)
    })?;
    // SAFETY: UCX returned `addr_len` readable bytes at `addr`.
    let worker_address =
        unsafe { std::slice::from_raw_parts(addr as *const u8, addr_len) }.to_vec();
    // SAFETY: releasing the address obtained above, once.
    unsafe { (lib.worker_release_address)(worker, addr) };
    Ok(worker_address)
}
