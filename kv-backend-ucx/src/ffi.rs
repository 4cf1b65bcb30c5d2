//! The few UCX (`libucp.so.0` / `libucs.so.0`) functions, structs and constants this
//! crate uses, declared by hand and opened at run time.
//!
//! Every struct below mirrors UCX 1.13's `ucp/api/ucp.h` / `ucp_def.h` exactly (sizes
//! and field offsets are asserted by the unit tests at the bottom, with the numbers a C
//! compiler printed for those headers on x86-64 Linux). UCX keeps its ABI backward
//! compatible within major version 1 and grows these structs only at the end behind
//! `field_mask` bits, so a newer 1.x runtime accepts them too; [`Lib::load`] refuses any
//! other major version and anything older than 1.13.
//!
//! Note that `ucs_status_t` is a *packed* enum in UCX: one signed byte, not an `int`.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use libloading::Library;

/// `ucs_status_t` (`typedef enum UCS_S_PACKED {...}`: one byte).
pub type ucs_status_t = i8;
/// `ucs_status_ptr_t`: a request pointer, NULL (`UCS_OK`) or an error code cast to a pointer.
pub type ucs_status_ptr_t = *mut c_void;
/// `ucp_context_h`.
pub type ucp_context_h = *mut c_void;
/// `ucp_worker_h`.
pub type ucp_worker_h = *mut c_void;
/// `ucp_ep_h`.
pub type ucp_ep_h = *mut c_void;
/// `ucp_mem_h`.
pub type ucp_mem_h = *mut c_void;
/// `ucp_rkey_h` (an unpacked remote key).
pub type ucp_rkey_h = *mut c_void;
/// `ucp_config_t *`.
pub type ucp_config_p = *mut c_void;
/// `ucp_address_t *`.
pub type ucp_address_p = *mut c_void;

pub const UCS_OK: ucs_status_t = 0;
pub const UCS_INPROGRESS: ucs_status_t = 1;
pub const UCS_ERR_NO_RESOURCE: ucs_status_t = -2;
pub const UCS_ERR_IO_ERROR: ucs_status_t = -3;
pub const UCS_ERR_UNREACHABLE: ucs_status_t = -6;
pub const UCS_ERR_CANCELED: ucs_status_t = -16;
pub const UCS_ERR_TIMED_OUT: ucs_status_t = -20;
pub const UCS_ERR_NOT_CONNECTED: ucs_status_t = -24;
pub const UCS_ERR_CONNECTION_RESET: ucs_status_t = -25;
pub const UCS_ERR_FIRST_LINK_FAILURE: ucs_status_t = -40;
pub const UCS_ERR_LAST_ENDPOINT_FAILURE: ucs_status_t = -89;
/// `UCS_ERR_LAST`: status pointers at or above `(uintptr_t)UCS_ERR_LAST` are errors.
pub const UCS_ERR_LAST: ucs_status_t = -100;

/// `ucs_thread_mode_t`.
pub const UCS_THREAD_MODE_SERIALIZED: c_uint = 1;
/// `UCS_MEMORY_TYPE_HOST`.
pub const UCS_MEMORY_TYPE_HOST: c_uint = 0;

pub const UCP_PARAM_FIELD_FEATURES: u64 = 1 << 0;
pub const UCP_PARAM_FIELD_MT_WORKERS_SHARED: u64 = 1 << 5;
pub const UCP_PARAM_FIELD_NAME: u64 = 1 << 8;
pub const UCP_FEATURE_AM: u64 = 1 << 6;

pub const UCP_WORKER_PARAM_FIELD_THREAD_MODE: u64 = 1 << 0;
pub const UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER: u64 = 1 << 3;

pub const UCP_EP_PARAM_FIELD_REMOTE_ADDRESS: u64 = 1 << 0;
pub const UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE: u64 = 1 << 1;
pub const UCP_EP_PARAM_FIELD_ERR_HANDLER: u64 = 1 << 2;
/// `UCP_ERR_HANDLING_MODE_NONE`.
pub const UCP_ERR_HANDLING_MODE_NONE: c_uint = 0;
/// `UCP_ERR_HANDLING_MODE_PEER`.
pub const UCP_ERR_HANDLING_MODE_PEER: c_uint = 1;
pub const UCP_EP_CLOSE_FLAG_FORCE: u32 = 1 << 0;

pub const UCP_MEM_MAP_PARAM_FIELD_ADDRESS: u64 = 1 << 0;
pub const UCP_MEM_MAP_PARAM_FIELD_LENGTH: u64 = 1 << 1;
pub const UCP_MEM_MAP_PARAM_FIELD_FLAGS: u64 = 1 << 2;
pub const UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE: u64 = 1 << 4;
/// `UCP_MEM_MAP_ALLOCATE`: UCX allocates the memory (shared memory where it can).
pub const UCP_MEM_MAP_ALLOCATE: c_uint = 1 << 1;
pub const UCP_MEM_ATTR_FIELD_ADDRESS: u64 = 1 << 0;
pub const UCP_MEM_ATTR_FIELD_LENGTH: u64 = 1 << 1;

pub const UCP_OP_ATTR_FIELD_CALLBACK: u32 = 1 << 1;
pub const UCP_OP_ATTR_FIELD_USER_DATA: u32 = 1 << 2;
pub const UCP_OP_ATTR_FIELD_FLAGS: u32 = 1 << 4;
pub const UCP_OP_ATTR_FIELD_MEMORY_TYPE: u32 = 1 << 6;
/// `UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL`: complete at once or fail with `UCS_ERR_NO_RESOURCE`.
pub const UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL: u32 = 1 << 18;
pub const UCP_AM_SEND_FLAG_REPLY: u32 = 1 << 0;
pub const UCP_AM_SEND_FLAG_EAGER: u32 = 1 << 1;
pub const UCP_AM_SEND_FLAG_RNDV: u32 = 1 << 2;

pub const UCP_AM_HANDLER_PARAM_FIELD_ID: u64 = 1 << 0;
pub const UCP_AM_HANDLER_PARAM_FIELD_FLAGS: u64 = 1 << 1;
pub const UCP_AM_HANDLER_PARAM_FIELD_CB: u64 = 1 << 2;
pub const UCP_AM_HANDLER_PARAM_FIELD_ARG: u64 = 1 << 3;
pub const UCP_AM_FLAG_WHOLE_MSG: u32 = 1 << 0;
pub const UCP_AM_RECV_ATTR_FIELD_REPLY_EP: u64 = 1 << 0;
pub const UCP_AM_RECV_ATTR_FLAG_RNDV: u64 = 1 << 17;

/// `ucp_send_nbx_callback_t`.
pub type ucp_send_nbx_callback_t =
    unsafe extern "C" fn(request: *mut c_void, status: ucs_status_t, user_data: *mut c_void);
/// `ucp_am_recv_data_nbx_callback_t`.
pub type ucp_am_recv_data_nbx_callback_t = unsafe extern "C" fn(
    request: *mut c_void,
    status: ucs_status_t,
    length: usize,
    user_data: *mut c_void,
);
/// `ucp_err_handler_cb_t`.
pub type ucp_err_handler_cb_t =
    unsafe extern "C" fn(arg: *mut c_void, ep: ucp_ep_h, status: ucs_status_t);
/// `ucp_am_recv_callback_t`.
pub type ucp_am_recv_callback_t = unsafe extern "C" fn(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const ucp_am_recv_param_t,
) -> ucs_status_t;

/// `ucp_params_t`.
#[repr(C)]
pub struct ucp_params_t {
    pub field_mask: u64,
    pub features: u64,
    pub request_size: usize,
    pub request_init: Option<unsafe extern "C" fn(*mut c_void)>,
    pub request_cleanup: Option<unsafe extern "C" fn(*mut c_void)>,
    pub tag_sender_mask: u64,
    pub mt_workers_shared: c_int,
    pub estimated_num_eps: usize,
    pub estimated_num_ppn: usize,
    pub name: *const c_char,
}

/// `ucs_cpu_set_t`: 1024 bits.
#[repr(C)]
pub struct ucs_cpu_set_t {
    pub bits: [u64; 16],
}

/// `ucp_worker_params_t`.
#[repr(C)]
pub struct ucp_worker_params_t {
    pub field_mask: u64,
    pub thread_mode: c_uint,
    pub cpu_mask: ucs_cpu_set_t,
    pub events: c_uint,
    pub user_data: *mut c_void,
    pub event_fd: c_int,
    pub flags: u64,
    pub name: *const c_char,
    pub am_alignment: usize,
    pub client_id: u64,
}

/// `ucp_worker_attr_t`.
#[repr(C)]
pub struct ucp_worker_attr_t {
    pub field_mask: u64,
    pub thread_mode: c_uint,
    pub address_flags: u32,
    pub address: ucp_address_p,
    pub address_length: usize,
    pub max_am_header: usize,
    pub name: [c_char; 32],
    pub max_debug_string: usize,
}

/// `ucp_err_handler_t`.
#[repr(C)]
pub struct ucp_err_handler_t {
    pub cb: Option<ucp_err_handler_cb_t>,
    pub arg: *mut c_void,
}

/// `ucs_sock_addr_t`.
#[repr(C)]
pub struct ucs_sock_addr_t {
    pub addr: *const c_void,
    pub addrlen: u32,
}

/// `ucp_ep_params_t`.
#[repr(C)]
pub struct ucp_ep_params_t {
    pub field_mask: u64,
    pub address: *const c_void,
    pub err_mode: c_uint,
    pub err_handler: ucp_err_handler_t,
    pub user_data: *mut c_void,
    pub flags: c_uint,
    pub sockaddr: ucs_sock_addr_t,
    pub conn_request: *mut c_void,
    pub name: *const c_char,
    pub local_sockaddr: ucs_sock_addr_t,
}

/// `ucp_mem_map_params_t`.
#[repr(C)]
pub struct ucp_mem_map_params_t {
    pub field_mask: u64,
    pub address: *mut c_void,
    pub length: usize,
    pub flags: c_uint,
    pub prot: c_uint,
    pub memory_type: c_uint,
}

/// `ucp_mem_attr_t`.
#[repr(C)]
pub struct ucp_mem_attr_t {
    pub field_mask: u64,
    pub address: *mut c_void,
    pub length: usize,
    pub mem_type: c_uint,
}

/// The callback union of `ucp_request_param_t` (only the members this crate uses; all
/// are one function pointer wide).
#[repr(C)]
#[derive(Clone, Copy)]
pub union ucp_request_cb_t {
    /// `ucp_send_nbx_callback_t send`.
    pub send: Option<ucp_send_nbx_callback_t>,
    /// `ucp_am_recv_data_nbx_callback_t recv_am`.
    pub recv_am: Option<ucp_am_recv_data_nbx_callback_t>,
}

/// `ucp_request_param_t`.
#[repr(C)]
pub struct ucp_request_param_t {
    pub op_attr_mask: u32,
    pub flags: u32,
    pub request: *mut c_void,
    pub cb: ucp_request_cb_t,
    pub datatype: u64,
    pub user_data: *mut c_void,
    pub reply_buffer: *mut c_void,
    pub memory_type: c_uint,
    pub recv_info: *mut c_void,
    pub memh: ucp_mem_h,
}

impl ucp_request_param_t {
    /// Parameters with nothing set (UCX reads only fields named in `op_attr_mask`).
    pub fn empty() -> Self {
        ucp_request_param_t {
            op_attr_mask: 0,
            flags: 0,
            request: std::ptr::null_mut(),
            cb: ucp_request_cb_t { send: None },
            datatype: 0,
            user_data: std::ptr::null_mut(),
            reply_buffer: std::ptr::null_mut(),
            memory_type: 0,
            recv_info: std::ptr::null_mut(),
            memh: std::ptr::null_mut(),
        }
    }
}

/// `ucp_am_handler_param_t`.
#[repr(C)]
pub struct ucp_am_handler_param_t {
    pub field_mask: u64,
    pub id: c_uint,
    pub flags: u32,
    pub cb: Option<ucp_am_recv_callback_t>,
    pub arg: *mut c_void,
}

/// `ucp_am_recv_param_t`.
#[repr(C)]
pub struct ucp_am_recv_param_t {
    pub recv_attr: u64,
    pub reply_ep: ucp_ep_h,
}

/// True when a `ucs_status_ptr_t` is a live request (`UCS_PTR_IS_PTR`).
pub fn ptr_is_request(p: ucs_status_ptr_t) -> bool {
    (p as usize).wrapping_sub(1) < (UCS_ERR_LAST as isize as usize).wrapping_sub(1)
}

/// The status a non-request `ucs_status_ptr_t` carries (`UCS_PTR_RAW_STATUS`).
pub fn ptr_status(p: ucs_status_ptr_t) -> ucs_status_t {
    if ptr_is_request(p) {
        UCS_INPROGRESS
    } else {
        p as isize as ucs_status_t
    }
}

/// True for the codes UCX uses when a link or an endpoint failed.
pub fn is_disconnect_status(s: ucs_status_t) -> bool {
    matches!(
        s,
        UCS_ERR_IO_ERROR
            | UCS_ERR_UNREACHABLE
            | UCS_ERR_NOT_CONNECTED
            | UCS_ERR_CONNECTION_RESET
            | UCS_ERR_TIMED_OUT
    ) || (UCS_ERR_LAST_ENDPOINT_FAILURE..=UCS_ERR_FIRST_LINK_FAILURE).contains(&s)
}

/// The UCX functions this crate calls, resolved from the run-time-loaded libraries.
///
/// `Send + Sync`: plain function pointers and library handles kept open for as long as
/// the struct lives.
pub struct Lib {
    pub config_read:
        unsafe extern "C" fn(*const c_char, *const c_char, *mut ucp_config_p) -> ucs_status_t,
    pub config_modify:
        unsafe extern "C" fn(ucp_config_p, *const c_char, *const c_char) -> ucs_status_t,
    pub config_release: unsafe extern "C" fn(ucp_config_p),
    pub init_version: unsafe extern "C" fn(
        c_uint,
        c_uint,
        *const ucp_params_t,
        ucp_config_p,
        *mut ucp_context_h,
    ) -> ucs_status_t,
    pub cleanup: unsafe extern "C" fn(ucp_context_h),
    pub worker_create: unsafe extern "C" fn(
        ucp_context_h,
        *const ucp_worker_params_t,
        *mut ucp_worker_h,
    ) -> ucs_status_t,
    pub worker_destroy: unsafe extern "C" fn(ucp_worker_h),
    pub worker_query: unsafe extern "C" fn(ucp_worker_h, *mut ucp_worker_attr_t) -> ucs_status_t,
    pub worker_get_address:
        unsafe extern "C" fn(ucp_worker_h, *mut ucp_address_p, *mut usize) -> ucs_status_t,
    pub worker_release_address: unsafe extern "C" fn(ucp_worker_h, ucp_address_p),
    pub worker_progress: unsafe extern "C" fn(ucp_worker_h) -> c_uint,
    pub worker_set_am_recv_handler:
        unsafe extern "C" fn(ucp_worker_h, *const ucp_am_handler_param_t) -> ucs_status_t,
    pub ep_create:
        unsafe extern "C" fn(ucp_worker_h, *const ucp_ep_params_t, *mut ucp_ep_h) -> ucs_status_t,
    pub ep_close_nbx:
        unsafe extern "C" fn(ucp_ep_h, *const ucp_request_param_t) -> ucs_status_ptr_t,
    pub ep_print_info: unsafe extern "C" fn(ucp_ep_h, *mut libc::FILE),
    pub mem_map: unsafe extern "C" fn(
        ucp_context_h,
        *const ucp_mem_map_params_t,
        *mut ucp_mem_h,
    ) -> ucs_status_t,
    pub mem_unmap: unsafe extern "C" fn(ucp_context_h, ucp_mem_h) -> ucs_status_t,
    pub mem_query: unsafe extern "C" fn(ucp_mem_h, *mut ucp_mem_attr_t) -> ucs_status_t,
    pub rkey_pack: unsafe extern "C" fn(
        ucp_context_h,
        ucp_mem_h,
        *mut *mut c_void,
        *mut usize,
    ) -> ucs_status_t,
    pub rkey_buffer_release: unsafe extern "C" fn(*mut c_void),
    pub ep_rkey_unpack:
        unsafe extern "C" fn(ucp_ep_h, *const c_void, *mut ucp_rkey_h) -> ucs_status_t,
    pub rkey_ptr: unsafe extern "C" fn(ucp_rkey_h, u64, *mut *mut c_void) -> ucs_status_t,
    pub rkey_destroy: unsafe extern "C" fn(ucp_rkey_h),
    pub am_send_nbx: unsafe extern "C" fn(
        ucp_ep_h,
        c_uint,
        *const c_void,
        usize,
        *const c_void,
        usize,
        *const ucp_request_param_t,
    ) -> ucs_status_ptr_t,
    pub am_recv_data_nbx: unsafe extern "C" fn(
        ucp_worker_h,
        *mut c_void,
        *mut c_void,
        usize,
        *const ucp_request_param_t,
    ) -> ucs_status_ptr_t,
    pub request_check_status: unsafe extern "C" fn(*mut c_void) -> ucs_status_t,
    pub request_free: unsafe extern "C" fn(*mut c_void),
    pub status_string: unsafe extern "C" fn(ucs_status_t) -> *const c_char,
    /// The runtime's version (major, minor, release).
    pub version: (u32, u32, u32),
    /// Where libucp was opened from.
    pub path: PathBuf,
    // Kept last so the handles outlive every pointer above while the struct drops.
    _ucs: Library,
    _ucp: Library,
}

/// The API version this crate's declarations were checked against (`UCP_API_MAJOR/MINOR`).
pub const API_VERSION: (u32, u32) = (1, 13);

fn unavailable(reason: String) -> kv_core::Error {
    kv_core::Error::BackendUnavailable {
        name: "ucx".into(),
        reason,
    }
}

impl Lib {
    /// The process-wide [`Lib`] for `path` (see [`Lib::load`]): UCX must not be unloaded
    /// and loaded again in one process (its global state and loaded modules would
    /// dangle), so a loaded library is kept until the process exits.
    pub fn shared(path: Option<&Path>) -> kv_core::Result<std::sync::Arc<Lib>> {
        static LOADED: parking_lot::Mutex<Vec<(Option<PathBuf>, std::sync::Arc<Lib>)>> =
            parking_lot::Mutex::new(Vec::new());
        let key = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("KV_UCX_LIB").map(PathBuf::from));
        let mut loaded = LOADED.lock();
        if let Some((_, lib)) = loaded.iter().find(|(k, _)| *k == key) {
            return Ok(lib.clone());
        }
        let lib = std::sync::Arc::new(Lib::load(key.as_deref())?);
        loaded.push((key, lib.clone()));
        Ok(lib)
    }

    /// Opens `libucp` (from `path`, else `KV_UCX_LIB`, else `libucp.so.0` on the loader's
    /// search path) and `libucs` beside it, resolves every function and checks the version.
    pub fn load(path: Option<&Path>) -> kv_core::Result<Lib> {
        let env = std::env::var_os("KV_UCX_LIB").map(PathBuf::from);
        let ucp_path = path
            .map(Path::to_path_buf)
            .or(env)
            .unwrap_or_else(|| PathBuf::from("libucp.so.0"));
        // libucs sits next to an explicitly named libucp; otherwise the loader finds it.
        let ucs_path = match ucp_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("libucs.so.0"),
            _ => PathBuf::from("libucs.so.0"),
        };
        // SAFETY: opening a shared library runs its initialisers; UCX's have no
        // preconditions beyond a working libc.
        let ucp = unsafe { Library::new(&ucp_path) }.map_err(|e| {
            unavailable(format!(
                "cannot open {} ({e}); install libucx0 (Debian/Ubuntu: apt-get install libucx0) \
                 or set KV_UCX_LIB to the path of libucp.so.0",
                ucp_path.display()
            ))
        })?;
        // SAFETY: as above; libucp already pulled libucs in, this only takes a handle.
        let ucs = unsafe { Library::new(&ucs_path) }
            .or_else(|_| {
                // SAFETY: as above.
                unsafe { Library::new("libucs.so.0") }
            })
            .map_err(|e| {
                unavailable(format!(
                    "cannot open libucs.so.0 next to {} ({e}); install libucx0",
                    ucp_path.display()
                ))
            })?;
        macro_rules! sym {
            ($lib:expr, $name:literal) => {{
                // SAFETY: the Rust type of the field this initialises is the C prototype
                // from UCX 1.13's headers for this symbol.
                let s = unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| {
                    unavailable(format!(
                        "{} lacks {} ({e}); UCX {}.{} or newer is required",
                        ucp_path.display(),
                        $name,
                        API_VERSION.0,
                        API_VERSION.1
                    ))
                })?;
                *s
            }};
        }
        let get_version: unsafe extern "C" fn(*mut c_uint, *mut c_uint, *mut c_uint) =
            sym!(ucp, "ucp_get_version");
        let (mut major, mut minor, mut release) = (0, 0, 0);
        // SAFETY: three valid out-pointers.
        unsafe { get_version(&mut major, &mut minor, &mut release) };
        if major != API_VERSION.0 || minor < API_VERSION.1 {
            return Err(unavailable(format!(
                "{} is UCX {major}.{minor}.{release}; this backend needs UCX 1.x with x >= {} \
                 (install libucx0 >= 1.13 or point KV_UCX_LIB at one)",
                ucp_path.display(),
                API_VERSION.1
            )));
        }
        Ok(Lib {
            config_read: sym!(ucp, "ucp_config_read"),
            config_modify: sym!(ucp, "ucp_config_modify"),
            config_release: sym!(ucp, "ucp_config_release"),
            init_version: sym!(ucp, "ucp_init_version"),
            cleanup: sym!(ucp, "ucp_cleanup"),
            worker_create: sym!(ucp, "ucp_worker_create"),
            worker_destroy: sym!(ucp, "ucp_worker_destroy"),
            worker_query: sym!(ucp, "ucp_worker_query"),
            worker_get_address: sym!(ucp, "ucp_worker_get_address"),
            worker_release_address: sym!(ucp, "ucp_worker_release_address"),
            worker_progress: sym!(ucp, "ucp_worker_progress"),
            worker_set_am_recv_handler: sym!(ucp, "ucp_worker_set_am_recv_handler"),
            ep_create: sym!(ucp, "ucp_ep_create"),
            ep_close_nbx: sym!(ucp, "ucp_ep_close_nbx"),
            ep_print_info: sym!(ucp, "ucp_ep_print_info"),
            mem_map: sym!(ucp, "ucp_mem_map"),
            mem_unmap: sym!(ucp, "ucp_mem_unmap"),
            mem_query: sym!(ucp, "ucp_mem_query"),
            rkey_pack: sym!(ucp, "ucp_rkey_pack"),
            rkey_buffer_release: sym!(ucp, "ucp_rkey_buffer_release"),
            ep_rkey_unpack: sym!(ucp, "ucp_ep_rkey_unpack"),
            rkey_ptr: sym!(ucp, "ucp_rkey_ptr"),
            rkey_destroy: sym!(ucp, "ucp_rkey_destroy"),
            am_send_nbx: sym!(ucp, "ucp_am_send_nbx"),
            am_recv_data_nbx: sym!(ucp, "ucp_am_recv_data_nbx"),
            request_check_status: sym!(ucp, "ucp_request_check_status"),
            request_free: sym!(ucp, "ucp_request_free"),
            status_string: sym!(ucs, "ucs_status_string"),
            version: (major, minor, release),
            path: ucp_path.clone(),
            _ucs: ucs,
            _ucp: ucp,
        })
    }

    /// UCX's text for a status code.
    pub fn status_text(&self, s: ucs_status_t) -> String {
        // SAFETY: ucs_status_string returns a static NUL-terminated string for any code.
        let p = unsafe { (self.status_string)(s) };
        if p.is_null() {
            return format!("status {s}");
        }
        // SAFETY: non-null, static, NUL-terminated (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// A `kv_core::Error::Backend` for a failed call.
    pub fn error(&self, what: &str, s: ucs_status_t) -> kv_core::Error {
        kv_core::Error::Backend {
            name: "ucx".into(),
            code: i64::from(s),
            message: format!("{what}: {}", self.status_text(s)),
        }
    }

    /// `Ok` for `UCS_OK`, else [`Lib::error`].
    pub fn check(&self, what: &str, s: ucs_status_t) -> kv_core::Result<()> {
        if s == UCS_OK {
            Ok(())
        } else {
            Err(self.error(what, s))
        }
    }
}

/// The name of the interface that has address `ip` (`getifaddrs`).
pub fn interface_of(ip: IpAddr) -> Option<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned (not freed yet).
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null sockaddr of the family it names.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(a.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if addr == Some(ip) {
            // SAFETY: a NUL-terminated interface name owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: freeing the list getifaddrs returned, once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// One of this process's sockets, held by a duplicate fd of our own (so the fd number
/// the owner uses is never touched and cannot be reused under us).
pub struct HeldSocket {
    fd: std::os::fd::OwnedFd,
    /// Its inode (as in `/proc/net/tcp`).
    pub inode: u64,
    /// Bytes the kernel received on it so far (`TCP_INFO`).
    pub bytes_received: u64,
}

impl HeldSocket {
    /// `shutdown(2)` both directions: the owner's fd stays valid and sees the end.
    pub fn shutdown(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown of a socket fd we own; it releases no fd.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) == 0 }
    }
}

/// This process's TCP sockets whose inode is in `inodes`, each `dup`ed and checked
/// (`fstat`) to still be that socket, with what `TCP_INFO` says it received.
pub fn hold_sockets(inodes: &std::collections::HashSet<u64>) -> Vec<HeldSocket> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        let Some(ino) = t
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|r| r.parse::<u64>().ok())
        else {
            continue;
        };
        if !inodes.contains(&ino) || out.iter().any(|h: &HeldSocket| h.inode == ino) {
            continue;
        }
        let Some(fd) = e.file_name().to_str().and_then(|f| f.parse::<c_int>().ok()) else {
            continue;
        };
        // SAFETY: dup of an fd number; the copy is ours.
        let d = unsafe { libc::dup(fd) };
        if d < 0 {
            continue;
        }
        // SAFETY: `d` is a fresh fd nobody else owns; OwnedFd closes it once.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(d) };
        // SAFETY: plain structs the kernel fills; `fd` is open.
        let (same, bytes_received) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            let same = libc::fstat(fd.as_raw_fd(), &mut st) == 0 && st.st_ino == ino;
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let ok = libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut info as *mut libc::tcp_info as *mut c_void,
                &mut len,
            ) == 0;
            (same, if ok { info.tcpi_bytes_received } else { 0 })
        };
        if same {
            out.push(HeldSocket {
                fd,
                inode: ino,
                bytes_received,
            });
        }
    }
    out
}

/// Runs `f` with a `FILE *` that writes into memory and returns what it wrote
/// (for `ucp_ep_print_info`).
pub fn capture_file(f: impl FnOnce(*mut libc::FILE)) -> Option<String> {
    let mut buf: *mut c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream stores the buffer and length through valid pointers that
    // outlive the stream (closed below).
    let file = unsafe { libc::open_memstream(&mut buf, &mut len) };
    if file.is_null() {
        return None;
    }
    f(file);
    // SAFETY: `file` is the open stream from above; fclose flushes it into `buf`.
    unsafe { libc::fclose(file) };
    if buf.is_null() {
        return None;
    }
    // SAFETY: after fclose `buf` holds `len` bytes (plus a NUL) allocated with malloc.
    let text = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
    let s = String::from_utf8_lossy(text).into_owned();
    // SAFETY: open_memstream's buffer is malloc'ed and now ours to free.
    unsafe { libc::free(buf.cast()) };
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    // Numbers printed by gcc for UCX 1.13.1's headers (x86-64 Linux, LP64).
    #[test]
    fn struct_layouts_match_ucx_1_13() {
        assert_eq!(size_of::<ucs_status_t>(), 1);
        assert_eq!(size_of::<ucp_params_t>(), 80);
        assert_eq!(offset_of!(ucp_params_t, features), 8);
        assert_eq!(offset_of!(ucp_params_t, request_size), 16);
        assert_eq!(offset_of!(ucp_params_t, tag_sender_mask), 40);
        assert_eq!(offset_of!(ucp_params_t, mt_workers_shared), 48);
        assert_eq!(offset_of!(ucp_params_t, estimated_num_eps), 56);
        assert_eq!(offset_of!(ucp_params_t, name), 72);

        assert_eq!(size_of::<ucp_worker_params_t>(), 200);
        assert_eq!(offset_of!(ucp_worker_params_t, thread_mode), 8);
        assert_eq!(offset_of!(ucp_worker_params_t, cpu_mask), 16);
        assert_eq!(offset_of!(ucp_worker_params_t, events), 144);
        assert_eq!(offset_of!(ucp_worker_params_t, user_data), 152);
        assert_eq!(offset_of!(ucp_worker_params_t, event_fd), 160);
        assert_eq!(offset_of!(ucp_worker_params_t, flags), 168);
        assert_eq!(offset_of!(ucp_worker_params_t, name), 176);
        assert_eq!(offset_of!(ucp_worker_params_t, am_alignment), 184);
        assert_eq!(offset_of!(ucp_worker_params_t, client_id), 192);

        assert_eq!(size_of::<ucp_worker_attr_t>(), 80);
        assert_eq!(offset_of!(ucp_worker_attr_t, thread_mode), 8);
        assert_eq!(offset_of!(ucp_worker_attr_t, address_flags), 12);
        assert_eq!(offset_of!(ucp_worker_attr_t, address), 16);
        assert_eq!(offset_of!(ucp_worker_attr_t, address_length), 24);
        assert_eq!(offset_of!(ucp_worker_attr_t, max_am_header), 32);
        assert_eq!(offset_of!(ucp_worker_attr_t, name), 40);
        assert_eq!(offset_of!(ucp_worker_attr_t, max_debug_string), 72);

        assert_eq!(size_of::<ucp_ep_params_t>(), 104);
        assert_eq!(offset_of!(ucp_ep_params_t, address), 8);
        assert_eq!(offset_of!(ucp_ep_params_t, err_mode), 16);
        assert_eq!(offset_of!(ucp_ep_params_t, err_handler), 24);
        assert_eq!(offset_of!(ucp_ep_params_t, user_data), 40);
        assert_eq!(offset_of!(ucp_ep_params_t, flags), 48);
        assert_eq!(offset_of!(ucp_ep_params_t, sockaddr), 56);
        assert_eq!(offset_of!(ucp_ep_params_t, conn_request), 72);
        assert_eq!(offset_of!(ucp_ep_params_t, name), 80);
        assert_eq!(offset_of!(ucp_ep_params_t, local_sockaddr), 88);

        assert_eq!(size_of::<ucp_mem_map_params_t>(), 40);
        assert_eq!(offset_of!(ucp_mem_map_params_t, address), 8);
        assert_eq!(offset_of!(ucp_mem_map_params_t, length), 16);
        assert_eq!(offset_of!(ucp_mem_map_params_t, flags), 24);
        assert_eq!(offset_of!(ucp_mem_map_params_t, prot), 28);
        assert_eq!(offset_of!(ucp_mem_map_params_t, memory_type), 32);

        assert_eq!(size_of::<ucp_mem_attr_t>(), 32);
        assert_eq!(offset_of!(ucp_mem_attr_t, address), 8);
        assert_eq!(offset_of!(ucp_mem_attr_t, length), 16);
        assert_eq!(offset_of!(ucp_mem_attr_t, mem_type), 24);

        assert_eq!(size_of::<ucp_request_param_t>(), 72);
        assert_eq!(offset_of!(ucp_request_param_t, flags), 4);
        assert_eq!(offset_of!(ucp_request_param_t, request), 8);
        assert_eq!(offset_of!(ucp_request_param_t, cb), 16);
        assert_eq!(offset_of!(ucp_request_param_t, datatype), 24);
        assert_eq!(offset_of!(ucp_request_param_t, user_data), 32);
        assert_eq!(offset_of!(ucp_request_param_t, reply_buffer), 40);
        assert_eq!(offset_of!(ucp_request_param_t, memory_type), 48);
        assert_eq!(offset_of!(ucp_request_param_t, recv_info), 56);
        assert_eq!(offset_of!(ucp_request_param_t, memh), 64);

        assert_eq!(size_of::<ucp_request_cb_t>(), 8);

        assert_eq!(size_of::<ucp_am_handler_param_t>(), 32);
        assert_eq!(offset_of!(ucp_am_handler_param_t, id), 8);
        assert_eq!(offset_of!(ucp_am_handler_param_t, flags), 12);
        assert_eq!(offset_of!(ucp_am_handler_param_t, cb), 16);
        assert_eq!(offset_of!(ucp_am_handler_param_t, arg), 24);

        assert_eq!(size_of::<ucp_am_recv_param_t>(), 16);
        assert_eq!(offset_of!(ucp_am_recv_param_t, reply_ep), 8);
    }

    #[test]
    fn status_pointers_decode_like_ucs_ptr_macros() {
        assert!(!ptr_is_request(std::ptr::null_mut()));
        assert_eq!(ptr_status(std::ptr::null_mut()), UCS_OK);
        let err = UCS_ERR_CANCELED as isize as usize as *mut c_void;
        assert!(!ptr_is_request(err));
        assert_eq!(ptr_status(err), UCS_ERR_CANCELED);
        let req = 0x7f00_1234_5678usize as *mut c_void;
        assert!(ptr_is_request(req));
        assert_eq!(ptr_status(req), UCS_INPROGRESS);
        assert!(is_disconnect_status(-80));
        assert!(!is_disconnect_status(UCS_ERR_CANCELED));
    }

    #[test]
    fn missing_library_is_backend_unavailable() {
        let e = Lib::load(Some(Path::new("/nonexistent/libucp.so.0")))
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("backend ucx unavailable"), "{e}");
        assert!(e.contains("KV_UCX_LIB") && e.contains("libucx0"), "{e}");
    }
}
