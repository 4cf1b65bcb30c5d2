//! The run-time-loaded part of libfabric 1.17: the six exported functions, the
//! `#[repr(C)]` structs and ops tables this crate touches, and Rust versions of the
//! header's `static inline` wrappers (which only jump through those ops tables).
//!
//! Layouts were copied from `rdma/fabric.h`, `fi_domain.h`, `fi_endpoint.h`, `fi_cm.h`,
//! `fi_rma.h` and `fi_eq.h` of libfabric 1.17 (x86_64/aarch64 LP64) and are checked by
//! the size/offset tests at the bottom of this file. Every function here is `unsafe`:
//! the caller passes live objects opened from the same library.
#![allow(non_camel_case_types, missing_docs, dead_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

use kv_core::{Error, Result};

/// `FI_VERSION(1, 17)`: the API version this crate was written against.
pub const FI_VERSION_1_17: u32 = (1 << 16) | 17;

pub const FI_MSG: u64 = 1 << 1;
pub const FI_RMA: u64 = 1 << 2;
pub const FI_READ: u64 = 1 << 8;
pub const FI_WRITE: u64 = 1 << 9;
pub const FI_RECV: u64 = 1 << 10;
pub const FI_SEND: u64 = 1 << 11;
pub const FI_REMOTE_READ: u64 = 1 << 12;
pub const FI_REMOTE_WRITE: u64 = 1 << 13;
pub const FI_SOURCE: u64 = 1 << 57;
pub const FI_CONTEXT: u64 = 1 << 59;
pub const FI_CONTEXT2: u64 = 1 << 52;
pub const FI_TRANSMIT: u64 = FI_SEND;

pub const FI_ORDER_SAS: u64 = 1 << 8;
pub const FI_ORDER_SAW: u64 = 1 << 7;

pub const FI_MR_LOCAL: c_int = 1 << 2;
pub const FI_MR_VIRT_ADDR: c_int = 1 << 4;
pub const FI_MR_ALLOCATED: c_int = 1 << 5;
pub const FI_MR_PROV_KEY: c_int = 1 << 6;
pub const FI_MR_ENDPOINT: c_int = 1 << 9;
/// The old `FI_MR_BASIC` mode, which means VIRT_ADDR | ALLOCATED | PROV_KEY.
pub const FI_MR_BASIC: c_int = 1;

pub const FI_EP_RDM: c_int = 3;
pub const FI_AV_TABLE: c_int = 2;
pub const FI_AV_UNSPEC: c_int = 0;
pub const FI_THREAD_SAFE: c_int = 1;
pub const FI_PROGRESS_MANUAL: c_int = 2;
pub const FI_CQ_FORMAT_DATA: c_int = 3;
pub const FI_WAIT_NONE: c_int = 0;
pub const FI_CQ_COND_NONE: c_int = 0;
/// `fi_control` command that enables an endpoint or memory region.
pub const FI_ENABLE: c_int = 6;

pub const FI_EAGAIN: isize = libc::EAGAIN as isize;
pub const FI_ECANCELED: c_int = libc::ECANCELED;
pub const FI_EAVAIL: isize = 259;
pub const FI_ETRUNC: c_int = 265;
pub const FI_ETOOSMALL: c_int = 257;
pub const FI_ENOKEY: c_int = 266;

pub type fi_addr_t = u64;
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;

type Fn = Option<unsafe extern "C" fn()>;

#[repr(C)]
pub struct fid {
    pub fclass: usize,
    pub context: *mut c_void,
    pub ops: *mut fi_ops,
}

#[repr(C)]
pub struct fi_ops {
    pub size: usize,
    pub close: Option<unsafe extern "C" fn(*mut fid) -> c_int>,
    pub bind: Option<unsafe extern "C" fn(*mut fid, *mut fid, u64) -> c_int>,
    pub control: Option<unsafe extern "C" fn(*mut fid, c_int, *mut c_void) -> c_int>,
    pub ops_open: Fn,
    pub tostr: Fn,
    pub ops_set: Fn,
}

#[repr(C)]
pub struct fi_tx_attr {
    pub caps: u64,
    pub mode: u64,
    pub op_flags: u64,
    pub msg_order: u64,
    pub comp_order: u64,
    pub inject_size: usize,
    pub size: usize,
    pub iov_limit: usize,
    pub rma_iov_limit: usize,
    pub tclass: u32,
}

#[repr(C)]
pub struct fi_rx_attr {
    pub caps: u64,
    pub mode: u64,
    pub op_flags: u64,
    pub msg_order: u64,
    pub comp_order: u64,
    pub total_buffered_recv: usize,
    pub size: usize,
    pub iov_limit: usize,
}

#[repr(C)]
pub struct fi_ep_attr {
    pub type_: c_int,
    pub protocol: u32,
    pub protocol_version: u32,
    pub max_msg_size: usize,
    pub msg_prefix_size: usize,
    pub max_order_raw_size: usize,
    pub max_order_war_size: usize,
    pub max_order_waw_size: usize,
    pub mem_tag_format: u64,
    pub tx_ctx_cnt: usize,
    pub rx_ctx_cnt: usize,
    pub auth_key_size: usize,
    pub auth_key: *mut u8,
}

#[repr(C)]
pub struct fi_domain_attr {
    pub domain: *mut fid_domain,
    pub name: *mut c_char,
    pub threading: c_int,
    pub control_progress: c_int,
    pub data_progress: c_int,
    pub resource_mgmt: c_int,
    pub av_type: c_int,
    pub mr_mode: c_int,
    pub mr_key_size: usize,
    pub cq_data_size: usize,
    pub cq_cnt: usize,
    pub ep_cnt: usize,
    pub tx_ctx_cnt: usize,
    pub rx_ctx_cnt: usize,
    pub max_ep_tx_ctx: usize,
    pub max_ep_rx_ctx: usize,
    pub max_ep_stx_ctx: usize,
    pub max_ep_srx_ctx: usize,
    pub cntr_cnt: usize,
    pub mr_iov_limit: usize,
    pub caps: u64,
    pub mode: u64,
    pub auth_key: *mut u8,
    pub auth_key_size: usize,
    pub max_err_data: usize,
    pub mr_cnt: usize,
    pub tclass: u32,
}

#[repr(C)]
pub struct fi_fabric_attr {
    pub fabric: *mut fid_fabric,
    pub name: *mut c_char,
    pub prov_name: *mut c_char,
    pub prov_version: u32,
    pub api_version: u32,
}

#[repr(C)]
pub struct fi_info {
    pub next: *mut fi_info,
    pub caps: u64,
    pub mode: u64,
    pub addr_format: u32,
    pub src_addrlen: usize,
    pub dest_addrlen: usize,
    pub src_addr: *mut c_void,
    pub dest_addr: *mut c_void,
    pub handle: *mut fid,
    pub tx_attr: *mut fi_tx_attr,
    pub rx_attr: *mut fi_rx_attr,
    pub ep_attr: *mut fi_ep_attr,
    pub domain_attr: *mut fi_domain_attr,
    pub fabric_attr: *mut fi_fabric_attr,
    pub nic: *mut c_void,
}

#[repr(C)]
pub struct fi_ops_fabric {
    pub size: usize,
    pub domain: Option<
        unsafe extern "C" fn(
            *mut fid_fabric,
            *mut fi_info,
            *mut *mut fid_domain,
            *mut c_void,
        ) -> c_int,
    >,
    pub passive_ep: Fn,
    pub eq_open: Fn,
    pub wait_open: Fn,
    pub trywait: Fn,
    pub domain2: Fn,
}

#[repr(C)]
pub struct fid_fabric {
    pub fid: fid,
    pub ops: *mut fi_ops_fabric,
    pub api_version: u32,
}

#[repr(C)]
pub struct fi_ops_domain {
    pub size: usize,
    pub av_open: Option<
        unsafe extern "C" fn(
            *mut fid_domain,
            *mut fi_av_attr,
            *mut *mut fid_av,
            *mut c_void,
        ) -> c_int,
    >,
    pub cq_open: Option<
        unsafe extern "C" fn(
            *mut fid_domain,
            *mut fi_cq_attr,
            *mut *mut fid_cq,
            *mut c_void,
        ) -> c_int,
    >,
    pub endpoint: Option<
        unsafe extern "C" fn(*mut fid_domain, *mut fi_info, *mut *mut fid_ep, *mut c_void) -> c_int,
    >,
    pub scalable_ep: Fn,
    pub cntr_open: Fn,
    pub poll_open: Fn,
    pub stx_ctx: Fn,
    pub srx_ctx: Fn,
    pub query_atomic: Fn,
    pub query_collective: Fn,
    pub endpoint2: Fn,
}

#[repr(C)]
pub struct fi_ops_mr {
    pub size: usize,
    #[allow(clippy::type_complexity)]
    pub reg: Option<
        unsafe extern "C" fn(
            *mut fid,
            *const c_void,
            usize,
            u64,
            u64,
            u64,
            u64,
            *mut *mut fid_mr,
            *mut c_void,
        ) -> c_int,
    >,
    pub regv: Fn,
    pub regattr: Fn,
}

#[repr(C)]
pub struct fid_domain {
    pub fid: fid,
    pub ops: *mut fi_ops_domain,
    pub mr: *mut fi_ops_mr,
}

#[repr(C)]
pub struct fid_mr {
    pub fid: fid,
    pub mem_desc: *mut c_void,
    pub key: u64,
}

#[repr(C)]
pub struct fi_av_attr {
    pub type_: c_int,
    pub rx_ctx_bits: c_int,
    pub count: usize,
    pub ep_per_node: usize,
    pub name: *const c_char,
    pub map_addr: *mut c_void,
    pub flags: u64,
}

#[repr(C)]
pub struct fi_ops_av {
    pub size: usize,
    pub insert: Option<
        unsafe extern "C" fn(
            *mut fid_av,
            *const c_void,
            usize,
            *mut fi_addr_t,
            u64,
            *mut c_void,
        ) -> c_int,
    >,
    pub insertsvc: Fn,
    pub insertsym: Fn,
    pub remove: Option<unsafe extern "C" fn(*mut fid_av, *mut fi_addr_t, usize, u64) -> c_int>,
    pub lookup: Fn,
    pub straddr: Fn,
    pub av_set: Fn,
}

#[repr(C)]
pub struct fid_av {
    pub fid: fid,
    pub ops: *mut fi_ops_av,
}

#[repr(C)]
pub struct fi_cq_attr {
    pub size: usize,
    pub flags: u64,
    pub format: c_int,
    pub wait_obj: c_int,
    pub signaling_vector: c_int,
    pub wait_cond: c_int,
    pub wait_set: *mut c_void,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct fi_cq_data_entry {
    pub op_context: *mut c_void,
    pub flags: u64,
    pub len: usize,
    pub buf: *mut c_void,
    pub data: u64,
}

#[repr(C)]
pub struct fi_cq_err_entry {
    pub op_context: *mut c_void,
    pub flags: u64,
    pub len: usize,
    pub buf: *mut c_void,
    pub data: u64,
    pub tag: u64,
    pub olen: usize,
    pub err: c_int,
    pub prov_errno: c_int,
    pub err_data: *mut c_void,
    pub err_data_size: usize,
}

#[repr(C)]
pub struct fi_ops_cq {
    pub size: usize,
    pub read: Option<unsafe extern "C" fn(*mut fid_cq, *mut c_void, usize) -> isize>,
    pub readfrom: Fn,
    pub readerr: Option<unsafe extern "C" fn(*mut fid_cq, *mut fi_cq_err_entry, u64) -> isize>,
    pub sread: Fn,
    pub sreadfrom: Fn,
    pub signal: Fn,
    pub strerror: Option<
        unsafe extern "C" fn(
            *mut fid_cq,
            c_int,
            *const c_void,
            *mut c_char,
            usize,
        ) -> *const c_char,
    >,
}

#[repr(C)]
pub struct fid_cq {
    pub fid: fid,
    pub ops: *mut fi_ops_cq,
}

#[repr(C)]
pub struct fi_ops_ep {
    pub size: usize,
    pub cancel: Option<unsafe extern "C" fn(*mut fid, *mut c_void) -> isize>,
    pub getopt: Fn,
    pub setopt: Fn,
    pub tx_ctx: Fn,
    pub rx_ctx: Fn,
    pub rx_size_left: Fn,
    pub tx_size_left: Fn,
}

#[repr(C)]
pub struct fi_ops_cm {
    pub size: usize,
    pub setname: Fn,
    pub getname: Option<unsafe extern "C" fn(*mut fid, *mut c_void, *mut usize) -> c_int>,
    pub getpeer: Fn,
    pub connect: Fn,
    pub listen: Fn,
    pub accept: Fn,
    pub reject: Fn,
    pub shutdown: Fn,
    pub join: Fn,
}

#[repr(C)]
pub struct fi_ops_msg {
    pub size: usize,
    pub recv: Option<
        unsafe extern "C" fn(
            *mut fid_ep,
            *mut c_void,
            usize,
            *mut c_void,
            fi_addr_t,
            *mut c_void,
        ) -> isize,
    >,
    pub recvv: Fn,
    pub recvmsg: Fn,
    pub send: Option<
        unsafe extern "C" fn(
            *mut fid_ep,
            *const c_void,
            usize,
            *mut c_void,
            fi_addr_t,
            *mut c_void,
        ) -> isize,
    >,
    pub sendv: Fn,
    pub sendmsg: Fn,
    pub inject: Fn,
    pub senddata: Fn,
    pub injectdata: Fn,
}

/// One RMA function: `(ep, buf, len, desc, peer, remote addr, key, context)`.
pub type RmaFn = unsafe extern "C" fn(
    *mut fid_ep,
    *mut c_void,
    usize,
    *mut c_void,
    fi_addr_t,
    u64,
    u64,
    *mut c_void,
) -> isize;

#[repr(C)]
pub struct fi_ops_rma {
    pub size: usize,
    pub read: Option<RmaFn>,
    pub readv: Fn,
    pub readmsg: Fn,
    /// `write` takes a `const void *buf`; same ABI as [`RmaFn`].
    pub write: Option<RmaFn>,
    pub writev: Fn,
    pub writemsg: Fn,
    pub inject: Fn,
    pub writedata: Fn,
    pub injectdata: Fn,
}

#[repr(C)]
pub struct fid_ep {
    pub fid: fid,
    pub ops: *mut fi_ops_ep,
    pub cm: *mut fi_ops_cm,
    pub msg: *mut fi_ops_msg,
    pub rma: *mut fi_ops_rma,
    pub tagged: *mut c_void,
    pub atomic: *mut c_void,
    pub collective: *mut c_void,
}

#[repr(C)]
pub struct fi_rma_iov {
    pub addr: u64,
    pub len: usize,
    pub key: u64,
}

#[repr(C)]
pub struct fi_msg_rma {
    pub msg_iov: *const libc::iovec,
    pub desc: *mut *mut c_void,
    pub iov_count: usize,
    pub addr: fi_addr_t,
    pub rma_iov: *const fi_rma_iov,
    pub rma_iov_count: usize,
    pub context: *mut c_void,
    pub data: u64,
}

type GetinfoFn = unsafe extern "C" fn(
    u32,
    *const c_char,
    *const c_char,
    u64,
    *const fi_info,
    *mut *mut fi_info,
) -> c_int;
type FabricFn =
    unsafe extern "C" fn(*mut fi_fabric_attr, *mut *mut fid_fabric, *mut c_void) -> c_int;

/// `libfabric.so.1`, opened at run time, with the exported functions this crate calls.
/// `Send + Sync`: the library is immutable once loaded.
pub struct Lib {
    pub getinfo: GetinfoFn,
    pub fabric: FabricFn,
    pub freeinfo: unsafe extern "C" fn(*mut fi_info),
    pub dupinfo: unsafe extern "C" fn(*const fi_info) -> *mut fi_info,
    pub strerror_fn: unsafe extern "C" fn(c_int) -> *const c_char,
    pub version_fn: unsafe extern "C" fn() -> u32,
    /// Keeps the code above mapped; dropped last.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Lib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lib")
            .field("version", &self.version())
            .finish()
    }
}

/// The default library name and the variable that overrides it.
pub const DEFAULT_LIB: &str = "libfabric.so.1";
/// Environment variable naming another `libfabric.so.1` to open.
pub const LIB_ENV: &str = "KV_FABRIC_LIB";

fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        name: "libfabric".into(),
        reason,
    }
}

impl Lib {
    /// Opens `path` (or `KV_FABRIC_LIB`, or `libfabric.so.1`) and resolves the exports.
    pub fn open(path: Option<&str>) -> Result<Arc<Lib>> {
        let env = std::env::var(LIB_ENV).ok().filter(|s| !s.is_empty());
        let path = path
            .map(str::to_string)
            .or(env)
            .unwrap_or_else(|| DEFAULT_LIB.into());
        // SAFETY: loading libfabric runs its constructors, which only initialise the
        // library's own globals; the path is the user's choice.
        let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| {
            unavailable(format!(
                "cannot open {path}: {e}; install libfabric1 (apt-get install libfabric1) \
                 or set {LIB_ENV} to the library's path"
            ))
        })?;
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the symbol's type is the one declared in rdma/fabric.h of
                // libfabric 1.x, which these signatures copy.
                let s = unsafe { lib.get($name) }.map_err(|e| {
                    unavailable(format!(
                        "{path} lacks {}: {e}; it is not libfabric 1.x",
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    ))
                })?;
                *s
            }};
        }
        let l = Lib {
            getinfo: sym!(b"fi_getinfo\0"),
            fabric: sym!(b"fi_fabric\0"),
            freeinfo: sym!(b"fi_freeinfo\0"),
            dupinfo: sym!(b"fi_dupinfo\0"),
            strerror_fn: sym!(b"fi_strerror\0"),
            version_fn: sym!(b"fi_version\0"),
            _lib: lib,
        };
        let v = l.version();
        if v < FI_VERSION_1_17 {
            return Err(unavailable(format!(
                "{path} is libfabric {}.{}; this backend needs 1.17 or newer",
                v >> 16,
                v & 0xffff
            )));
        }
        Ok(Arc::new(l))
    }

    /// `fi_version()`, as `(major << 16) | minor`.
    pub fn version(&self) -> u32 {
        // SAFETY: fi_version takes nothing and returns a constant.
        unsafe { (self.version_fn)() }
    }

    /// `fi_strerror(code)` for a positive `FI_E*` code.
    pub fn strerror(&self, code: c_int) -> String {
        // SAFETY: fi_strerror returns a pointer to a static string (never NULL).
        let p = unsafe { (self.strerror_fn)(code.abs()) };
        if p.is_null() {
            return format!("libfabric error {code}");
        }
        // SAFETY: non-NULL, NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// An error for a negative return code of the call `what`.
    pub fn error(&self, what: &str, code: i64) -> Error {
        Error::Backend {
            name: "libfabric".into(),
            code,
            message: format!("{what}: {}", self.strerror(code as c_int)),
        }
    }
}

fn missing(op: &str) -> isize {
    tracing::warn!("libfabric provider does not implement {op}");
    -(libc::ENOSYS as isize)
}

// ---- the header's static inline wrappers, over the ops tables ----

/// `fi_close(fid)`.
///
/// # Safety
/// `f` is an open libfabric object; it is invalid afterwards.
pub unsafe fn fi_close(f: *mut fid) -> c_int {
    match (*(*f).ops).close {
        Some(close) => close(f),
        None => missing("close") as c_int,
    }
}

/// `fi_control(fid, FI_ENABLE, NULL)`: `fi_enable` / `fi_mr_enable`.
///
/// # Safety
/// `f` is an open endpoint or memory region.
pub unsafe fn fi_enable(f: *mut fid) -> c_int {
    match (*(*f).ops).control {
        Some(control) => control(f, FI_ENABLE, std::ptr::null_mut()),
        None => missing("control") as c_int,
    }
}

/// `fi_ep_bind` / `fi_mr_bind`: `fid->ops->bind(fid, bfid, flags)`.
///
/// # Safety
/// Both are open objects of the same domain.
pub unsafe fn fi_bind(f: *mut fid, to: *mut fid, flags: u64) -> c_int {
    match (*(*f).ops).bind {
        Some(bind) => bind(f, to, flags),
        None => missing("bind") as c_int,
    }
}

/// `fi_domain`.
///
/// # Safety
/// `fabric` is open and `info` one of the infos `fi_getinfo` returned for it.
pub unsafe fn fi_domain(
    fabric: *mut fid_fabric,
    info: *mut fi_info,
    out: *mut *mut fid_domain,
) -> c_int {
    match (*(*fabric).ops).domain {
        Some(f) => f(fabric, info, out, std::ptr::null_mut()),
        None => missing("domain") as c_int,
    }
}

/// `fi_av_open`.
///
/// # Safety
/// `domain` is open.
pub unsafe fn fi_av_open(
    domain: *mut fid_domain,
    attr: *mut fi_av_attr,
    out: *mut *mut fid_av,
) -> c_int {
    match (*(*domain).ops).av_open {
        Some(f) => f(domain, attr, out, std::ptr::null_mut()),
        None => missing("av_open") as c_int,
    }
}

/// `fi_cq_open`.
///
/// # Safety
/// `domain` is open.
pub unsafe fn fi_cq_open(
    domain: *mut fid_domain,
    attr: *mut fi_cq_attr,
    out: *mut *mut fid_cq,
) -> c_int {
    match (*(*domain).ops).cq_open {
        Some(f) => f(domain, attr, out, std::ptr::null_mut()),
        None => missing("cq_open") as c_int,
    }
}

/// `fi_endpoint`.
///
/// # Safety
/// `domain` is open and `info` the info it was opened with.
pub unsafe fn fi_endpoint(
    domain: *mut fid_domain,
    info: *mut fi_info,
    out: *mut *mut fid_ep,
) -> c_int {
    match (*(*domain).ops).endpoint {
        Some(f) => f(domain, info, out, std::ptr::null_mut()),
        None => missing("endpoint") as c_int,
    }
}

/// `fi_mr_reg`.
///
/// # Safety
/// `domain` is open; `buf..buf+len` stays valid until the region is closed.
#[allow(clippy::too_many_arguments)]
pub unsafe fn fi_mr_reg(
    domain: *mut fid_domain,
    buf: *const c_void,
    len: usize,
    access: u64,
    requested_key: u64,
    out: *mut *mut fid_mr,
) -> c_int {
    match (*(*domain).mr).reg {
        Some(f) => f(
            &mut (*domain).fid,
            buf,
            len,
            access,
            0,
            requested_key,
            0,
            out,
            std::ptr::null_mut(),
        ),
        None => missing("mr_reg") as c_int,
    }
}

/// `fi_getname`.
///
/// # Safety
/// `ep` is an open, enabled endpoint; `addr` has `*len` writable bytes.
pub unsafe fn fi_getname(ep: *mut fid_ep, addr: *mut c_void, len: *mut usize) -> c_int {
    match (*(*ep).cm).getname {
        Some(f) => f(&mut (*ep).fid, addr, len),
        None => missing("getname") as c_int,
    }
}

/// `fi_av_insert` of one address.
///
/// # Safety
/// `av` is open; `addr` points to an address in the provider's format.
pub unsafe fn fi_av_insert(av: *mut fid_av, addr: *const c_void, out: *mut fi_addr_t) -> c_int {
    match (*(*av).ops).insert {
        Some(f) => f(av, addr, 1, out, 0, std::ptr::null_mut()),
        None => missing("av_insert") as c_int,
    }
}

/// `fi_av_remove` of one address.
///
/// # Safety
/// `av` is open.
pub unsafe fn fi_av_remove(av: *mut fid_av, addr: *mut fi_addr_t) -> c_int {
    match (*(*av).ops).remove {
        Some(f) => f(av, addr, 1, 0),
        None => missing("av_remove") as c_int,
    }
}

/// `fi_cq_read` of up to `count` `fi_cq_data_entry`s.
///
/// # Safety
/// `cq` is open with `FI_CQ_FORMAT_DATA`; `buf` holds `count` entries.
pub unsafe fn fi_cq_read(cq: *mut fid_cq, buf: *mut fi_cq_data_entry, count: usize) -> isize {
    match (*(*cq).ops).read {
        Some(f) => f(cq, buf.cast(), count),
        None => missing("cq_read"),
    }
}

/// `fi_cq_readerr`.
///
/// # Safety
/// `cq` is open; `buf` is zeroed (err_data_size 0: the provider's own buffer).
pub unsafe fn fi_cq_readerr(cq: *mut fid_cq, buf: *mut fi_cq_err_entry) -> isize {
    match (*(*cq).ops).readerr {
        Some(f) => f(cq, buf, 0),
        None => missing("cq_readerr"),
    }
}

/// `fi_cq_strerror`, as an owned string.
///
/// # Safety
/// `cq` is open; `err_data` is what the last `fi_cq_readerr` returned.
pub unsafe fn fi_cq_strerror(
    cq: *mut fid_cq,
    prov_errno: c_int,
    err_data: *const c_void,
) -> String {
    let Some(f) = (*(*cq).ops).strerror else {
        return format!("provider error {prov_errno}");
    };
    let mut buf = [0 as c_char; 256];
    let p = f(cq, prov_errno, err_data, buf.as_mut_ptr(), buf.len());
    // The provider returns either `buf` (terminated here to be sure) or a static string.
    if p.is_null() || p == buf.as_ptr() {
        let last = buf.len() - 1;
        buf[last] = 0;
        return CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
    }
    CStr::from_ptr(p).to_string_lossy().into_owned()
}

/// `fi_cancel(&ep->fid, context)`.
///
/// # Safety
/// `ep` is open; `context` is the context of an operation posted on it.
pub unsafe fn fi_cancel(ep: *mut fid_ep, context: *mut c_void) -> isize {
    match (*(*ep).ops).cancel {
        Some(f) => f(&mut (*ep).fid, context),
        None => missing("cancel"),
    }
}

/// `fi_send`.
///
/// # Safety
/// `buf..buf+len` stays valid until the completion for `context` is read.
pub unsafe fn fi_send(
    ep: *mut fid_ep,
    buf: *const c_void,
    len: usize,
    desc: *mut c_void,
    dest: fi_addr_t,
    context: *mut c_void,
) -> isize {
    match (*(*ep).msg).send {
        Some(f) => f(ep, buf, len, desc, dest, context),
        None => missing("send"),
    }
}

/// `fi_recv`.
///
/// # Safety
/// `buf..buf+len` stays valid until the completion for `context` is read.
pub unsafe fn fi_recv(
    ep: *mut fid_ep,
    buf: *mut c_void,
    len: usize,
    desc: *mut c_void,
    context: *mut c_void,
) -> isize {
    match (*(*ep).msg).recv {
        Some(f) => f(ep, buf, len, desc, FI_ADDR_UNSPEC, context),
        None => missing("recv"),
    }
}

/// `fi_write` (`write == true`) or `fi_read`.
///
/// # Safety
/// The local buffer stays valid until the completion for `context` is read; the
/// remote range lies in a region the peer registered under `key`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn fi_rma(
    ep: *mut fid_ep,
    write: bool,
    buf: *mut c_void,
    len: usize,
    desc: *mut c_void,
    peer: fi_addr_t,
    addr: u64,
    key: u64,
    context: *mut c_void,
) -> isize {
    let ops = &*(*ep).rma;
    match if write { ops.write } else { ops.read } {
        Some(f) => f(ep, buf, len, desc, peer, addr, key, context),
        None => missing(if write { "write" } else { "read" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Sizes and offsets printed by a C program compiled against the libfabric 1.17
    /// headers (`gcc` with `offsetof`/`sizeof`) on x86_64.
    #[test]
    fn layouts_match_the_1_17_headers() {
        assert_eq!(size_of::<fi_info>(), 120);
        assert_eq!(offset_of!(fi_info, caps), 8);
        assert_eq!(offset_of!(fi_info, addr_format), 24);
        assert_eq!(offset_of!(fi_info, src_addrlen), 32);
        assert_eq!(offset_of!(fi_info, handle), 64);
        assert_eq!(offset_of!(fi_info, tx_attr), 72);
        assert_eq!(offset_of!(fi_info, ep_attr), 88);
        assert_eq!(offset_of!(fi_info, domain_attr), 96);
        assert_eq!(offset_of!(fi_info, fabric_attr), 104);
        assert_eq!(offset_of!(fi_info, nic), 112);
        assert_eq!(size_of::<fi_tx_attr>(), 80);
        assert_eq!(offset_of!(fi_tx_attr, inject_size), 40);
        assert_eq!(offset_of!(fi_tx_attr, rma_iov_limit), 64);
        assert_eq!(offset_of!(fi_tx_attr, tclass), 72);
        assert_eq!(size_of::<fi_rx_attr>(), 64);
        assert_eq!(offset_of!(fi_rx_attr, iov_limit), 56);
        assert_eq!(size_of::<fi_ep_attr>(), 96);
        assert_eq!(offset_of!(fi_ep_attr, max_msg_size), 16);
        assert_eq!(offset_of!(fi_ep_attr, auth_key), 88);
        assert_eq!(size_of::<fi_domain_attr>(), 192);
        assert_eq!(offset_of!(fi_domain_attr, threading), 16);
        assert_eq!(offset_of!(fi_domain_attr, av_type), 32);
        assert_eq!(offset_of!(fi_domain_attr, mr_mode), 36);
        assert_eq!(offset_of!(fi_domain_attr, mr_key_size), 40);
        assert_eq!(offset_of!(fi_domain_attr, caps), 136);
        assert_eq!(offset_of!(fi_domain_attr, auth_key), 152);
        assert_eq!(offset_of!(fi_domain_attr, mr_cnt), 176);
        assert_eq!(offset_of!(fi_domain_attr, tclass), 184);
        assert_eq!(size_of::<fi_fabric_attr>(), 32);
        assert_eq!(offset_of!(fi_fabric_attr, prov_name), 16);
        assert_eq!(offset_of!(fi_fabric_attr, prov_version), 24);
        assert_eq!(offset_of!(fi_fabric_attr, api_version), 28);
        assert_eq!(size_of::<fi_cq_attr>(), 40);
        assert_eq!(offset_of!(fi_cq_attr, format), 16);
        assert_eq!(offset_of!(fi_cq_attr, wait_obj), 20);
        assert_eq!(offset_of!(fi_cq_attr, wait_cond), 28);
        assert_eq!(offset_of!(fi_cq_attr, wait_set), 32);
        assert_eq!(size_of::<fi_av_attr>(), 48);
        assert_eq!(offset_of!(fi_av_attr, count), 8);
        assert_eq!(offset_of!(fi_av_attr, name), 24);
        assert_eq!(offset_of!(fi_av_attr, flags), 40);
        assert_eq!(size_of::<fi_cq_data_entry>(), 40);
        assert_eq!(offset_of!(fi_cq_data_entry, data), 32);
        assert_eq!(size_of::<fi_cq_err_entry>(), 80);
        assert_eq!(offset_of!(fi_cq_err_entry, olen), 48);
        assert_eq!(offset_of!(fi_cq_err_entry, err), 56);
        assert_eq!(offset_of!(fi_cq_err_entry, prov_errno), 60);
        assert_eq!(offset_of!(fi_cq_err_entry, err_data), 64);
        assert_eq!(offset_of!(fi_cq_err_entry, err_data_size), 72);
        assert_eq!(size_of::<fi_msg_rma>(), 64);
        assert_eq!(offset_of!(fi_msg_rma, addr), 24);
        assert_eq!(offset_of!(fi_msg_rma, rma_iov), 32);
        assert_eq!(offset_of!(fi_msg_rma, context), 48);
        assert_eq!(offset_of!(fi_msg_rma, data), 56);
        assert_eq!(size_of::<fi_rma_iov>(), 24);
        assert_eq!(size_of::<fid>(), 24);
        assert_eq!(size_of::<fi_ops>(), 56);
        assert_eq!(offset_of!(fi_ops, close), 8);
        assert_eq!(offset_of!(fi_ops, bind), 16);
        assert_eq!(offset_of!(fi_ops, control), 24);
        assert_eq!(size_of::<fid_fabric>(), 40);
        assert_eq!(offset_of!(fid_fabric, ops), 24);
        assert_eq!(offset_of!(fi_ops_fabric, domain), 8);
        assert_eq!(size_of::<fid_domain>(), 40);
        assert_eq!(offset_of!(fid_domain, ops), 24);
        assert_eq!(offset_of!(fid_domain, mr), 32);
        assert_eq!(offset_of!(fi_ops_domain, av_open), 8);
        assert_eq!(offset_of!(fi_ops_domain, cq_open), 16);
        assert_eq!(offset_of!(fi_ops_domain, endpoint), 24);
        assert_eq!(offset_of!(fi_ops_mr, reg), 8);
        assert_eq!(size_of::<fid_mr>(), 40);
        assert_eq!(offset_of!(fid_mr, mem_desc), 24);
        assert_eq!(offset_of!(fid_mr, key), 32);
        assert_eq!(size_of::<fid_av>(), 32);
        assert_eq!(offset_of!(fid_av, ops), 24);
        assert_eq!(offset_of!(fi_ops_av, insert), 8);
        assert_eq!(offset_of!(fi_ops_av, remove), 32);
        assert_eq!(size_of::<fid_cq>(), 32);
        assert_eq!(offset_of!(fi_ops_cq, read), 8);
        assert_eq!(offset_of!(fi_ops_cq, readerr), 24);
        assert_eq!(offset_of!(fi_ops_cq, strerror), 56);
        assert_eq!(size_of::<fid_ep>(), 80);
        assert_eq!(offset_of!(fid_ep, ops), 24);
        assert_eq!(offset_of!(fid_ep, cm), 32);
        assert_eq!(offset_of!(fid_ep, msg), 40);
        assert_eq!(offset_of!(fid_ep, rma), 48);
        assert_eq!(offset_of!(fi_ops_ep, cancel), 8);
        assert_eq!(offset_of!(fi_ops_cm, getname), 16);
        assert_eq!(offset_of!(fi_ops_msg, recv), 8);
        assert_eq!(offset_of!(fi_ops_msg, send), 32);
        assert_eq!(offset_of!(fi_ops_rma, read), 8);
        assert_eq!(offset_of!(fi_ops_rma, write), 32);
        assert_eq!(offset_of!(fi_ops_rma, writemsg), 48);
    }

    #[test]
    fn missing_library_is_backend_unavailable() {
        match Lib::open(Some("/nonexistent/libfabric.so.1")) {
            Err(Error::BackendUnavailable { name, reason }) => {
                assert_eq!(name, "libfabric");
                assert!(
                    reason.contains("libfabric1") && reason.contains(LIB_ENV),
                    "{reason}"
                );
            }
            other => panic!("want BackendUnavailable, got {other:?}"),
        }
    }
}
