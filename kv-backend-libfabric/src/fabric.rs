//! The opened libfabric objects: one `FI_EP_RDM` endpoint and everything it needs
//! (fabric, domain, address vector, one completion queue), opened from a provider
//! chosen at run time, with safe wrappers for registering memory, posting operations
//! and reading completions; and how libfabric's error codes map to `kv_core::Error`.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::Arc;

use kv_core::{Error, Result};

use crate::ffi::{self, fi_addr_t, Lib};

/// Capabilities asked of every provider.
const CAPS: u64 = ffi::FI_MSG
    | ffi::FI_RMA
    | ffi::FI_READ
    | ffi::FI_WRITE
    | ffi::FI_REMOTE_READ
    | ffi::FI_REMOTE_WRITE
    | ffi::FI_SEND
    | ffi::FI_RECV;

/// What a memory region may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MrUse {
    /// User memory peers may read and write (and local transfers use either way).
    ReadWrite,
    /// User memory peers may only read; locally only the source of a WRITE.
    ReadOnly,
    /// Our notification send buffers.
    Send,
    /// Our posted receive buffers.
    Recv,
    /// The byte flush reads land in.
    FlushTarget,
}

impl MrUse {
    /// The `fi_mr_reg` access flags: nothing beyond what the use needs, so that no
    /// peer can write into memory it should only read (a provider adds what its own
    /// protocol needs, e.g. ofi_rxm's rendezvous reads of send buffers).
    fn access(self) -> u64 {
        match self {
            MrUse::ReadWrite => {
                ffi::FI_READ | ffi::FI_WRITE | ffi::FI_REMOTE_READ | ffi::FI_REMOTE_WRITE
            }
            MrUse::ReadOnly => ffi::FI_WRITE | ffi::FI_REMOTE_READ,
            MrUse::Send => ffi::FI_SEND,
            MrUse::Recv => ffi::FI_RECV,
            MrUse::FlushTarget => ffi::FI_READ,
        }
    }
}

/// The memory-registration modes this crate knows how to honour.
const MR_MODES: c_int = ffi::FI_MR_LOCAL
    | ffi::FI_MR_VIRT_ADDR
    | ffi::FI_MR_ALLOCATED
    | ffi::FI_MR_PROV_KEY
    | ffi::FI_MR_ENDPOINT;

/// The ordering bits whose presence turns off the shm provider's fast RMA path
/// (`SMR_RMA_ORDER` in libfabric's `prov/shm/src/smr.h`).
const SHM_RMA_ORDER: u64 = 0x1ff & !ffi::FI_ORDER_SAS;

/// Providers tried in order when neither the options nor `FI_PROVIDER` name one.
/// `sockets` is never chosen by default: it hangs on libfabric 1.17.
pub const DEFAULT_PROVIDERS: &[&str] = &["verbs;ofi_rxm", "efa", "tcp;ofi_rxm"];

/// The open fabric, domain, AV, CQ and endpoint. Raw pointers into libfabric; `Send` (see below), not `Sync`.
pub struct Fabric {
    pub lib: Arc<Lib>,
    infos: *mut ffi::fi_info,
    info: *mut ffi::fi_info,
    fabric: *mut ffi::fid_fabric,
    domain: *mut ffi::fid_domain,
    av: *mut ffi::fid_av,
    cq: *mut ffi::fid_cq,
    ep: *mut ffi::fid_ep,
    /// `domain_attr->mr_mode` as the provider returned it.
    pub mr_mode: c_int,
    /// `fabric_attr->prov_name`, e.g. `tcp;ofi_rxm`.
    pub provider: String,
    /// Largest single RMA or message the endpoint takes.
    pub max_msg_size: usize,
    /// `fi_getname`: what a peer inserts into its address vector.
    pub address: Vec<u8>,
    /// `domain_attr->mr_key_size`: how many bytes of a key we choose are significant.
    pub key_bytes: usize,
    /// Address-vector entries by endpoint name, with how many users each has.
    av_refs: HashMap<Vec<u8>, (fi_addr_t, usize)>,
    /// Memory regions open now (registered and not yet closed).
    pub open_mrs: usize,
    /// Test hook: the registration with this (0-based) number fails like a provider
    /// error would.
    #[cfg(test)]
    pub fail_registration: Option<usize>,
    #[cfg(test)]
    registrations: usize,
    /// Test hook: the next completion-queue read fails as a broken queue would.
    #[cfg(test)]
    pub fail_cq: bool,
    /// Test hook: this many next `close_mr` calls fail as `fi_close` refusing would
    /// (`-FI_EBUSY`), leaving the region open.
    #[cfg(test)]
    pub fail_close_mr: usize,
}

// SAFETY: the pointers are only used through `&mut self`/`&self` by the one owner, which
// keeps the endpoint behind a mutex; the domain is opened with FI_THREAD_DOMAIN, whose
// contract (calls serialised by the user) that mutex fulfils. libfabric objects are not
// tied to the thread that opened them.
unsafe impl Send for Fabric {}

fn check(lib: &Lib, what: &str, rc: c_int) -> Result<()> {
    if rc < 0 {
        Err(lib.error(what, rc as i64))
    } else {
        Ok(())
    }
}

fn prov_name(info: *const ffi::fi_info) -> String {
    // SAFETY: `info` comes from fi_getinfo; fabric_attr and prov_name are set by every
    // provider (NULL checked anyway).
    unsafe {
        let fa = (*info).fabric_attr;
        if fa.is_null() || (*fa).prov_name.is_null() {
            return String::new();
        }
        CStr::from_ptr((*fa).prov_name)
            .to_string_lossy()
            .into_owned()
    }
}

impl Fabric {
    /// Opens an endpoint on the first provider that offers RDM + RMA + MSG.
    ///
    /// `provider` forces one (`tcp;ofi_rxm`, `shm`, …); without it `FI_PROVIDER` is
    /// honoured, else [`DEFAULT_PROVIDERS`] are tried in order. `node` binds the local
    /// address (e.g. `127.0.0.1`) of providers that listen on an IP address (not `shm`,
    /// whose names are not addresses, nor `efa`).
    pub fn open(lib: Arc<Lib>, provider: Option<&str>, node: Option<&str>) -> Result<Fabric> {
        let env = std::env::var("FI_PROVIDER").ok().filter(|s| !s.is_empty());
        let attempts: Vec<Option<&str>> = match (provider, env.as_deref()) {
            (Some(p), _) => vec![Some(p)],
            (None, Some(_)) => vec![None],
            (None, None) => DEFAULT_PROVIDERS.iter().map(|p| Some(*p)).collect(),
        };
        let allow_sockets = provider.is_some_and(|p| p.contains("sockets"))
            || env.as_deref().is_some_and(|p| p.contains("sockets"));
        let mut errors = Vec::new();
        for p in attempts {
            let name = p.or(env.as_deref()).unwrap_or_default();
            let ip_based = !name.split(';').any(|x| x == "shm" || x == "efa");
            let node = node.filter(|_| ip_based);
            match Self::open_one(lib.clone(), p, node, allow_sockets) {
                Ok(ep) => return Ok(ep),
                Err(e) => errors.push(format!("{}: {e}", p.unwrap_or("FI_PROVIDER"))),
            }
        }
        Err(Error::BackendUnavailable {
            name: "libfabric".into(),
            reason: format!(
                "no provider offers FI_EP_RDM with FI_RMA|FI_MSG ({}); check `fi_info -t FI_EP_RDM -c FI_RMA`, \
                 set the `provider` option or FI_PROVIDER",
                errors.join("; ")
            ),
        })
    }

    fn open_one(
        lib: Arc<Lib>,
        provider: Option<&str>,
        node: Option<&str>,
        allow_sockets: bool,
    ) -> Result<Fabric> {
        let mut e = Fabric {
            lib: lib.clone(),
            infos: std::ptr::null_mut(),
            info: std::ptr::null_mut(),
            fabric: std::ptr::null_mut(),
            domain: std::ptr::null_mut(),
            av: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            ep: std::ptr::null_mut(),
            mr_mode: 0,
            provider: String::new(),
            max_msg_size: 0,
            address: Vec::new(),
            key_bytes: 8,
            av_refs: HashMap::new(),
            open_mrs: 0,
            #[cfg(test)]
            fail_registration: None,
            #[cfg(test)]
            registrations: 0,
            #[cfg(test)]
            fail_cq: false,
            #[cfg(test)]
            fail_close_mr: 0,
        };
        let node_c = node
            .map(CString::new)
            .transpose()
            .map_err(|_| Error::invalid_argument("node contains a NUL byte"))?;
        let prov_c = provider
            .map(CString::new)
            .transpose()
            .map_err(|_| Error::invalid_argument("provider contains a NUL byte"))?;
        let env = std::env::var("FI_PROVIDER").unwrap_or_default();
        let shm_requested = provider.unwrap_or(&env).split(';').any(|p| p == "shm");
        // SAFETY: fi_dupinfo(NULL) is fi_allocinfo: a zeroed info with every attr allocated.
        let hints = unsafe { (lib.dupinfo)(std::ptr::null()) };
        if hints.is_null() {
            return Err(Error::Backend {
                name: "libfabric".into(),
                code: -(libc::ENOMEM as i64),
                message: "fi_allocinfo failed".into(),
            });
        }
        // SAFETY: `hints` and its attrs were allocated by fi_allocinfo above; strings put
        // into it are strdup'ed because fi_freeinfo frees them.
        let rc = unsafe {
            (*hints).caps = CAPS;
            (*hints).mode = ffi::FI_CONTEXT | ffi::FI_CONTEXT2;
            (*(*hints).ep_attr).type_ = ffi::FI_EP_RDM;
            let d = &mut *(*hints).domain_attr;
            d.mr_mode = MR_MODES;
            d.threading = 3; // FI_THREAD_DOMAIN: our mutex serialises every call
                             // Sends in order; for shm also "send after write", which is what turns off
                             // its fast RMA path: that path writes into the peer with process_vm_writev
                             // from this side and never checks the peer's key (a WRITE after the peer
                             // deregistered landed). With it off the target checks key, bounds and
                             // access of every operation.
            (*(*hints).tx_attr).msg_order = if shm_requested {
                ffi::FI_ORDER_SAS | ffi::FI_ORDER_SAW
            } else {
                ffi::FI_ORDER_SAS
            };
            if let Some(p) = &prov_c {
                (*(*hints).fabric_attr).prov_name = libc::strdup(p.as_ptr());
            }
            let mut out = std::ptr::null_mut();
            let rc = (lib.getinfo)(
                ffi::FI_VERSION_1_17,
                node_c.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()),
                std::ptr::null(),
                if node_c.is_some() { ffi::FI_SOURCE } else { 0 },
                hints,
                &mut out,
            );
            (lib.freeinfo)(hints);
            e.infos = out;
            rc
        };
        check(&lib, "fi_getinfo", rc)?;
        let mut cur = e.infos;
        while !cur.is_null() {
            let name = prov_name(cur);
            if allow_sockets || !name.split(';').any(|p| p == "sockets") {
                e.info = cur;
                e.provider = name;
                break;
            }
            // SAFETY: walking the list fi_getinfo returned.
            cur = unsafe { (*cur).next };
        }
        if e.info.is_null() {
            return Err(Error::BackendUnavailable {
                name: "libfabric".into(),
                reason: "only the sockets provider matched, and it is not used by default".into(),
            });
        }
        // SAFETY: each call gets objects opened just before from the same info; results
        // are checked before use and everything opened is closed by Drop on failure.
        unsafe {
            let info = e.info;
            e.mr_mode = (*(*info).domain_attr).mr_mode;
            if e.mr_mode == ffi::FI_MR_BASIC {
                e.mr_mode = ffi::FI_MR_VIRT_ADDR | ffi::FI_MR_ALLOCATED | ffi::FI_MR_PROV_KEY;
            }
            e.max_msg_size = (*(*info).ep_attr).max_msg_size.max(4096);
            e.key_bytes = match (*(*info).domain_attr).mr_key_size {
                0 => 8,
                n => n.min(8),
            };
            if e.provider == "shm"
                && e.mr_mode & ffi::FI_MR_VIRT_ADDR != 0
                && (*(*info).tx_attr).msg_order & SHM_RMA_ORDER == 0
            {
                return Err(Error::BackendUnavailable {
                    name: "libfabric".into(),
                    reason: "the shm provider offered only its unchecked fast RMA path \
                             (no FI_ORDER_SAW); refusing it"
                        .into(),
                });
            }
            check(
                &lib,
                "fi_fabric",
                (lib.fabric)((*info).fabric_attr, &mut e.fabric, std::ptr::null_mut()),
            )?;
            check(
                &lib,
                "fi_domain",
                ffi::fi_domain(e.fabric, info, &mut e.domain),
            )?;
            let mut cq_attr = ffi::fi_cq_attr {
                size: 0,
                flags: 0,
                format: ffi::FI_CQ_FORMAT_DATA,
                wait_obj: ffi::FI_WAIT_NONE,
                signaling_vector: 0,
                wait_cond: ffi::FI_CQ_COND_NONE,
                wait_set: std::ptr::null_mut(),
            };
            check(
                &lib,
                "fi_cq_open",
                ffi::fi_cq_open(e.domain, &mut cq_attr, &mut e.cq),
            )?;
            let mut av_attr = ffi::fi_av_attr {
                type_: ffi::FI_AV_UNSPEC,
                rx_ctx_bits: 0,
                count: 64,
                ep_per_node: 0,
                name: std::ptr::null(),
                map_addr: std::ptr::null_mut(),
                flags: 0,
            };
            check(
                &lib,
                "fi_av_open",
                ffi::fi_av_open(e.domain, &mut av_attr, &mut e.av),
            )?;
            check(
                &lib,
                "fi_endpoint",
                ffi::fi_endpoint(e.domain, info, &mut e.ep),
            )?;
            let epf = &mut (*e.ep).fid as *mut ffi::fid;
            check(
                &lib,
                "fi_ep_bind(av)",
                ffi::fi_bind(epf, &mut (*e.av).fid, 0),
            )?;
            check(
                &lib,
                "fi_ep_bind(cq)",
                ffi::fi_bind(epf, &mut (*e.cq).fid, ffi::FI_TRANSMIT | ffi::FI_RECV),
            )?;
            check(&lib, "fi_enable", ffi::fi_enable(epf))?;
            let mut buf = vec![0u8; 256];
            let mut len = buf.len();
            let mut rc = ffi::fi_getname(e.ep, buf.as_mut_ptr().cast(), &mut len);
            if rc == -ffi::FI_ETOOSMALL || (rc < 0 && len > buf.len()) {
                buf.resize(len, 0);
                rc = ffi::fi_getname(e.ep, buf.as_mut_ptr().cast(), &mut len);
            }
            check(&lib, "fi_getname", rc)?;
            buf.truncate(len);
            e.address = buf;
        }
        Ok(e)
    }

    /// Inserts a peer's address (from its connection info or a HELLO) into the address
    /// vector; the same address inserted twice shares one entry (counted).
    pub fn insert(&mut self, address: &[u8]) -> Result<fi_addr_t> {
        // The provider reads a peer address as it reads its own: a NUL-terminated
        // string (shm's `fi_shm://PID:…`, of any length) or a fixed-size socket address.
        let fits = if self.address.last() == Some(&0) {
            address.contains(&0)
        } else {
            address.len() >= self.address.len()
        };
        if !fits {
            return Err(Error::invalid_metadata(format!(
                "peer address of {} bytes is not a {} address (like {} bytes{})",
                address.len(),
                self.provider,
                self.address.len(),
                if self.address.last() == Some(&0) {
                    ", NUL-terminated"
                } else {
                    ""
                }
            )));
        }
        if let Some((a, refs)) = self.av_refs.get_mut(address) {
            *refs += 1;
            return Ok(*a);
        }
        let mut out: fi_addr_t = ffi::FI_ADDR_UNSPEC;
        // SAFETY: the AV is open; the address is as long as this provider's addresses or
        // NUL-terminated like them (checked above), so the provider reads only inside
        // the slice.
        let rc = unsafe { ffi::fi_av_insert(self.av, address.as_ptr().cast(), &mut out) };
        if rc != 1 {
            return Err(if rc < 0 {
                self.lib.error("fi_av_insert", rc as i64)
            } else {
                Error::invalid_metadata(format!("{} refused the peer address", self.provider))
            });
        }
        self.av_refs.insert(address.to_vec(), (out, 1));
        Ok(out)
    }

    /// Drops one user of an address-vector entry; the entry is removed with its last
    /// user. The caller makes sure no operation to it is outstanding.
    pub fn remove(&mut self, addr: fi_addr_t) {
        let Some(key) = self
            .av_refs
            .iter()
            .find(|(_, (a, _))| *a == addr)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        let last = match self.av_refs.get_mut(&key) {
            Some((_, refs)) => {
                *refs -= 1;
                *refs == 0
            }
            None => false,
        };
        if !last {
            return;
        }
        self.av_refs.remove(&key);
        let mut addr = addr;
        // SAFETY: the AV is open; `addr` came from `insert`.
        let rc = unsafe { ffi::fi_av_remove(self.av, &mut addr) };
        if rc < 0 {
            tracing::debug!("fi_av_remove: {}", self.lib.strerror(rc));
        }
    }

    /// Number of address-vector entries in use.
    pub fn av_entries(&self) -> usize {
        self.av_refs.len()
    }

    /// Registers `addr..addr+len` for `usage`. Where the provider lets us choose the
    /// key (no `FI_MR_PROV_KEY`), it is random: as many bits from the OS as the
    /// provider's key size holds (64 for tcp and shm), so a peer cannot guess the key
    /// of a registration it was not given.
    ///
    /// # Safety
    /// The range stays valid until the returned region is closed.
    pub unsafe fn register(&mut self, addr: u64, len: usize, usage: MrUse) -> Result<Mr> {
        #[cfg(test)]
        {
            self.registrations += 1;
            if self.fail_registration == Some(self.registrations - 1) {
                return Err(self
                    .lib
                    .error("fi_mr_reg (injected)", -(libc::ENOMEM as i64)));
            }
        }
        let mut mr: *mut ffi::fid_mr = std::ptr::null_mut();
        let mut rc = 0;
        // A random key may collide with one in use (-FI_ENOKEY): draw again.
        for _ in 0..4 {
            let key = if self.prov_key() {
                0
            } else {
                self.random_key()?
            };
            // SAFETY: the domain is open; the caller keeps the range valid.
            rc = unsafe {
                ffi::fi_mr_reg(
                    self.domain,
                    addr as *const c_void,
                    len.max(1),
                    usage.access(),
                    key,
                    &mut mr,
                )
            };
            if rc != -ffi::FI_ENOKEY {
                break;
            }
        }
        check(&self.lib, "fi_mr_reg", rc)?;
        self.open_mrs += 1;
        let mr = Mr { mr };
        if self.mr_mode & ffi::FI_MR_ENDPOINT != 0 {
            if let Err(e) = self.bind_mr(&mr) {
                // Never leave an open (and possibly remotely writable) region behind
                // memory the caller is told is not registered.
                if let Err((still_open, close)) = self.close_mr(mr) {
                    // It stays open (leaked, kept reachable), but its key was never
                    // handed out, so no peer can address it.
                    tracing::error!("leaking a half-made region: {close}");
                    crate::memory::keep_forever(still_open);
                }
                return Err(e);
            }
        }
        Ok(mr)
    }

    fn bind_mr(&mut self, mr: &Mr) -> Result<()> {
        // SAFETY: both objects are open and belong to this domain.
        unsafe {
            check(
                &self.lib,
                "fi_mr_bind",
                ffi::fi_bind(&mut (*mr.mr).fid, &mut (*self.ep).fid, 0),
            )?;
            check(&self.lib, "fi_mr_enable", ffi::fi_enable(&mut (*mr.mr).fid))
        }
    }

    /// A key of `key_bytes` random bytes from the OS.
    fn random_key(&self) -> Result<u64> {
        let r = kv_core::auth::random_u128()? as u64;
        Ok(if self.key_bytes >= 8 {
            r
        } else {
            r & ((1u64 << (8 * self.key_bytes)) - 1)
        })
    }

    /// Closes a memory region; once it returned `Ok` the provider no longer touches its
    /// range. If `fi_close` fails the region stays open and comes back with the error:
    /// the caller must keep it (and the memory under it), retry, or leak both.
    pub fn close_mr(&mut self, mr: Mr) -> std::result::Result<(), (Mr, Error)> {
        #[cfg(test)]
        if self.fail_close_mr > 0 {
            self.fail_close_mr -= 1;
            let e = self
                .lib
                .error("fi_close(mr) (injected)", -(libc::EBUSY as i64));
            return Err((mr, e));
        }
        // SAFETY: `mr` is open (it is consumed here, or handed back still open).
        let rc = unsafe { ffi::fi_close(&mut (*mr.mr).fid) };
        if rc < 0 {
            let e = self.lib.error("fi_close(mr)", rc as i64);
            tracing::warn!("{e}; the region stays open");
            return Err((mr, e));
        }
        self.open_mrs -= 1;
        Ok(())
    }

    /// True when remote addresses are virtual addresses, not offsets into the region.
    pub fn virt_addr(&self) -> bool {
        self.mr_mode & ffi::FI_MR_VIRT_ADDR != 0
    }

    /// True when keys come from the provider (`fi_mr_key`) rather than from us.
    pub fn prov_key(&self) -> bool {
        self.mr_mode & ffi::FI_MR_PROV_KEY != 0
    }

    /// True when local buffers need their registration's descriptor.
    pub fn local_mr(&self) -> bool {
        self.mr_mode & ffi::FI_MR_LOCAL != 0
    }

    /// Posts `fi_write`/`fi_read`. Returns the raw code (0, `-FI_EAGAIN`, error).
    ///
    /// # Safety
    /// `buf..buf+len` stays valid and `ctx` (64 bytes, for FI_CONTEXT2) stays allocated
    /// until the completion for `ctx` is read or the endpoint is closed.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rma(
        &mut self,
        write: bool,
        buf: u64,
        len: usize,
        desc: *mut c_void,
        peer: fi_addr_t,
        raddr: u64,
        key: u64,
        ctx: *mut c_void,
    ) -> isize {
        // SAFETY: the endpoint is open; the caller's promises cover buf and ctx.
        unsafe {
            ffi::fi_rma(
                self.ep,
                write,
                buf as *mut c_void,
                len,
                desc,
                peer,
                raddr,
                key,
                ctx,
            )
        }
    }

    /// Posts `fi_send`. Same contract as [`Fabric::rma`].
    ///
    /// # Safety
    /// As for [`Fabric::rma`].
    pub unsafe fn send(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        peer: fi_addr_t,
        ctx: *mut c_void,
    ) -> isize {
        // SAFETY: as promised by the caller.
        unsafe { ffi::fi_send(self.ep, buf.cast(), len, desc, peer, ctx) }
    }

    /// Posts `fi_recv` from any peer. Same contract as [`Fabric::rma`].
    ///
    /// # Safety
    /// As for [`Fabric::rma`].
    pub unsafe fn recv(
        &mut self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        ctx: *mut c_void,
    ) -> isize {
        // SAFETY: as promised by the caller.
        unsafe { ffi::fi_recv(self.ep, buf.cast(), len, desc, ctx) }
    }

    /// Asks the provider to cancel the operation posted with `ctx` (best effort: it then
    /// completes with `FI_ECANCELED`, or normally).
    pub fn cancel(&mut self, ctx: *mut c_void) {
        if self.ep.is_null() {
            return;
        }
        // SAFETY: the endpoint is open; cancel only looks the context up.
        let rc = unsafe { ffi::fi_cancel(self.ep, ctx) };
        if rc < 0 && rc != -(libc::ENOENT as isize) {
            tracing::debug!("fi_cancel: {}", self.lib.strerror(rc as c_int));
        }
    }

    /// Reads completions into `buf`. `Ok(n)` entries (0 when none); a failed operation
    /// comes back as `Err(CqError)`.
    pub fn read_cq(
        &mut self,
        buf: &mut [ffi::fi_cq_data_entry],
    ) -> std::result::Result<usize, CqError> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_cq) {
            return Err(CqError {
                context: std::ptr::null_mut(),
                code: -(libc::EIO as i64),
                message: "fi_cq_read: injected failure".into(),
            });
        }
        // SAFETY: the CQ is open with FI_CQ_FORMAT_DATA and `buf` holds buf.len() entries.
        let n = unsafe { ffi::fi_cq_read(self.cq, buf.as_mut_ptr(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        if n == -ffi::FI_EAGAIN {
            return Ok(0);
        }
        if n != -ffi::FI_EAVAIL {
            return Err(CqError {
                context: std::ptr::null_mut(),
                code: n as i64,
                message: format!("fi_cq_read: {}", self.lib.strerror(n as c_int)),
            });
        }
        // SAFETY: zeroed entry: err_data_size 0 asks for the provider's own err_data
        // buffer, valid until the next read, which is where strerror reads it.
        unsafe {
            let mut e: ffi::fi_cq_err_entry = std::mem::zeroed();
            let rc = ffi::fi_cq_readerr(self.cq, &mut e);
            if rc < 0 {
                return Ok(0);
            }
            let text = ffi::fi_cq_strerror(self.cq, e.prov_errno, e.err_data);
            Err(CqError {
                context: e.op_context,
                code: -(e.err as i64),
                message: format!("{} ({text})", self.lib.strerror(e.err)),
            })
        }
    }

    /// Closes the endpoint alone, so the provider stops touching any posted buffer;
    /// the rest is closed on drop.
    pub fn close_ep(&mut self) {
        if !self.ep.is_null() {
            // SAFETY: open endpoint, closed once (nulled right after).
            unsafe { ffi::fi_close(&mut (*self.ep).fid) };
            self.ep = std::ptr::null_mut();
        }
    }
}

impl Fabric {
    /// Gives up the endpoint without closing anything: for when the provider may still
    /// hold operations (closing then crashed libfabric 1.17's ofi_rxm, and a closed
    /// endpoint would not make the provider drop its references to our buffers). With
    /// manual progress nobody drives the provider afterwards. Counted by the caller.
    pub fn leak(self) {
        // Reachable for the life of the process (so are the provider's objects behind
        // its pointers): a leak checker reports the leaks nobody chose.
        crate::memory::keep_forever(self);
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.close_ep();
        // SAFETY: each object is open (non-NULL) and closed once, children first.
        unsafe {
            if !self.av.is_null() {
                ffi::fi_close(&mut (*self.av).fid);
            }
            if !self.cq.is_null() {
                ffi::fi_close(&mut (*self.cq).fid);
            }
            if !self.domain.is_null() {
                ffi::fi_close(&mut (*self.domain).fid);
            }
            if !self.fabric.is_null() {
                ffi::fi_close(&mut (*self.fabric).fid);
            }
            if !self.infos.is_null() {
                (self.lib.freeinfo)(self.infos);
            }
        }
    }
}

/// A failed operation read from the completion queue.
#[derive(Debug)]
pub struct CqError {
    /// The context it was posted with (NULL when the CQ itself failed).
    pub context: *mut c_void,
    /// `-FI_E*`.
    pub code: i64,
    /// `fi_strerror` and `fi_cq_strerror` text.
    pub message: String,
}

/// An open memory region (`fid_mr`). Closed through [`Fabric::close_mr`].
pub struct Mr {
    mr: *mut ffi::fid_mr,
}

// SAFETY: a handle only used under the owner's mutex, like `Fabric`.
unsafe impl Send for Mr {}

impl Mr {
    /// `fi_mr_key`.
    pub fn key(&self) -> u64 {
        // SAFETY: open region; the key field is set by fi_mr_reg.
        unsafe { (*self.mr).key }
    }

    /// `fi_mr_desc`, for FI_MR_LOCAL.
    pub fn desc(&self) -> *mut c_void {
        // SAFETY: open region.
        unsafe { (*self.mr).mem_desc }
    }
}

/// True when `code` (`-errno`) says the peer's connection is gone.
fn is_disconnect(code: i64) -> bool {
    [
        libc::ECONNREFUSED,
        libc::ECONNRESET,
        libc::ECONNABORTED,
        libc::ENOTCONN,
        libc::EHOSTUNREACH,
        libc::EPIPE,
        libc::ESHUTDOWN,
        libc::ENETUNREACH,
    ]
    .iter()
    .any(|e| code == -(*e as i64))
}

/// Turns a posting or completion error code into a `kv_core::Error`; `peer` names the
/// peer (asked for only when the error is a disconnect).
pub fn op_error(code: i64, message: String, peer: impl FnOnce() -> String) -> Error {
    if code == -(libc::ECANCELED as i64) {
        Error::Canceled
    } else if is_disconnect(code) {
        Error::RemoteDisconnected {
            peer: peer(),
            reason: message,
        }
    } else {
        Error::Backend {
            name: "libfabric".into(),
            code,
            message,
        }
    }
}
