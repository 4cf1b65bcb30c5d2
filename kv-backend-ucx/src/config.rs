//! The backend's settings ([`Options`], from a struct or from params) and the UCX
//! settings they become: the names and values given to `ucp_config_modify` (with this
//! backend's TCP segment defaults), the TCP segment sizes a context ends up with
//! (published in `ConnInfo`), and what a `UCX_TLS` value allows. No UCX call here.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use kv_core::{Error, Params, Result};

/// Settings of a [`crate::UcxBackend`]. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Transports UCX may use (`UCX_TLS` syntax: `"tcp"`, `"posix,cma,self"`); `None`
    /// leaves it to the `UCX_TLS` environment or UCX's default. Param `tls`.
    pub tls: Option<String>,
    /// Path of `libucp.so.0`; `None` means `KV_UCX_LIB`, else the loader's search path.
    /// Param `lib`.
    pub lib_path: Option<PathBuf>,
    /// Run a thread that calls `progress()` so transfers move without the caller
    /// driving them (it sleeps 50 µs whenever a poll found nothing). Param
    /// `progress_thread` (`true`/`false`).
    pub progress_thread: bool,
    /// Largest notification payload accepted. Param `max_notification`.
    pub max_notification: usize,
    /// How long `cancel` waits for UCX to cancel requests before force-closing the
    /// endpoint. Param `cancel_grace_ms`.
    pub cancel_grace: Duration,
    /// Pieces of a transfer of at least this many bytes go alone, by rendezvous (the
    /// target receives a WRITE straight into place, the initiator a READ's data); smaller
    /// ones are batched into eager messages. `None`: 512 KiB over endpoints whose lanes
    /// are all TCP, 64 KiB otherwise. Param `rndv_min` (bytes). See README, "Operations".
    pub rndv_min: Option<u64>,
    /// Most notifications waiting to be drained (param `max_inbox`, default 65 536);
    /// more are dropped (counted in `describe()`).
    pub max_inbox: usize,
    /// Most payload bytes waiting to be drained (param `max_inbox_bytes`, default
    /// 64 MiB); more are dropped likewise.
    pub max_inbox_bytes: usize,
    /// Most connections UCX's TCP transport keeps accepted (param `max_connections`,
    /// default 512); the newest beyond it are shut down (see README, "Trust").
    pub max_connections: usize,
    /// Further UCX settings (`ucp_config_modify` names without the `UCX_` prefix, e.g.
    /// `("RNDV_THRESH", "8k")`, `("TCP_TX_SEG_SIZE", "1M")`). Params `ucx.<NAME>`.
    /// `TCP_*` names are passed without `TCP_` (how UCX 1.13 applies transport settings
    /// per context). Over TCP this backend's defaults differ from UCX's: see README,
    /// "TCP segments"; peers must agree (checked at `connect`).
    pub config: Vec<(String, String)>,
    /// Run without a cluster secret (param `insecure`): `Some(true)` serves peers
    /// unauthenticated (with a warning); `Some(false)` refuses to start without a
    /// secret; `None` (default) refuses unless nothing beyond this host can connect
    /// (`bind_ip` loopback, or transports without TCP), then warns. With a secret,
    /// `Some(true)` is refused. See [`authenticates`].
    pub insecure: Option<bool>,
    /// Send *mapped* operations where possible (param `mapped`, default true): when
    /// every local piece of a post lies in one `alloc_host` allocation and the peer is
    /// reached over shared memory only, the target maps that allocation and copies
    /// itself (one copy, no data in messages). See the README, "Mapped operations".
    pub mapped: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: None,
            lib_path: None,
            progress_thread: false,
            max_notification: 1 << 20,
            cancel_grace: Duration::from_millis(100),
            rndv_min: None,
            max_inbox: 65_536,
            max_inbox_bytes: 64 << 20,
            max_connections: 512,
            config: Vec::new(),
            insecure: None,
            mapped: true,
        }
    }
}

impl Options {
    /// Reads the keys documented on each field from `params`; unknown keys are refused.
    pub fn from_params(params: &Params) -> Result<Options> {
        let mut o = Options::default();
        let bad = |k: &str, v: &str| Error::invalid_argument(format!("ucx param {k}={v:?}"));
        for (k, v) in params {
            match k.as_str() {
                "tls" => o.tls = Some(v.clone()),
                "lib" => o.lib_path = Some(PathBuf::from(v)),
                "progress_thread" => o.progress_thread = v.parse().map_err(|_| bad(k, v))?,
                "max_notification" => o.max_notification = v.parse().map_err(|_| bad(k, v))?,
                "rndv_min" => o.rndv_min = Some(v.parse().map_err(|_| bad(k, v))?),
                "max_inbox" => o.max_inbox = v.parse::<usize>().map_err(|_| bad(k, v))?.max(1),
                "max_inbox_bytes" => o.max_inbox_bytes = v.parse().map_err(|_| bad(k, v))?,
                "max_connections" => o.max_connections = v.parse().map_err(|_| bad(k, v))?,
                "insecure" => o.insecure = Some(v.parse().map_err(|_| bad(k, v))?),
                "mapped" => o.mapped = v.parse().map_err(|_| bad(k, v))?,
                "cancel_grace_ms" => {
                    o.cancel_grace = Duration::from_millis(v.parse().map_err(|_| bad(k, v))?)
                }
                _ => match k.strip_prefix("ucx.") {
                    Some(name) if !name.is_empty() => o.config.push((name.into(), v.clone())),
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "unknown ucx param {k:?} (known: tls, lib, progress_thread, \
                             max_notification, cancel_grace_ms, rndv_min, max_inbox, max_inbox_bytes, \
                             max_connections, insecure, \
                             ucx.<NAME>)"
                        )))
                    }
                },
            }
        }
        Ok(o)
    }
}

/// UCX settings this backend changes from UCX's defaults unless the caller sets them
/// (`Options::config` / `ucx.<NAME>` params, or the `UCX_<NAME>` environment).
///
/// UCX 1.13 emulates `ucp_put`/`ucp_get` over TCP with active messages of at most
/// `TCP_TX_SEG_SIZE` bytes (default 8 KiB): a 1 MiB WRITE was 128 messages, each a
/// `send`, a `recv` and two user-space copies, at ~0.7 GiB/s on loopback; with 1 MiB
/// segments it is one message, ~4.7 GiB/s (256 KiB: ~4.1). The cost is memory: UCX's
/// TCP send and receive buffers grow to these sizes. A receiver must take a sender's whole segment (UCX
/// resets the connection otherwise), so both are raised, and `connect` refuses a peer
/// whose sizes do not fit ours (see `tests/tcp_segments.rs`).
///
/// The names are unprefixed on purpose: UCX 1.13's `ucp_config_modify` keeps names it
/// does not know and applies them to each transport's own table, whose fields carry no
/// `TCP_` prefix (`TCP_TX_SEG_SIZE` given there is silently unused; UCX warns
/// "invalid configurations"). `TX_SEG_SIZE`/`RX_SEG_SIZE` exist only in the TCP table.
pub const TCP_DEFAULTS: [(&str, &str); 2] = [("TX_SEG_SIZE", "1M"), ("RX_SEG_SIZE", "1M")];

/// The name under which `ucp_config_modify` applies setting `name`: UCX 1.13 matches
/// a transport's settings by their name inside the transport's table, so the `TCP_`
/// prefix (as in `UCX_TCP_NODELAY`) is dropped (`TCP_CM_*`, a table of its own, is
/// kept). Other names pass unchanged.
fn ucx_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    match upper.strip_prefix("TCP_") {
        Some(rest) if !upper.starts_with("TCP_CM_") && !rest.is_empty() => rest.to_owned(),
        _ => name.to_owned(),
    }
}

/// The value the caller chose for TCP setting `name` (`TX_SEG_SIZE`), through
/// `config` (with or without the `TCP_` prefix; the last one wins) or the
/// `UCX_TCP_<name>` environment.
fn tcp_setting(config: &[(String, String)], name: &str) -> Option<String> {
    let prefixed = format!("TCP_{name}");
    config
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name) || k.eq_ignore_ascii_case(&prefixed))
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var(format!("UCX_{prefixed}")).ok())
}

/// UCX 1.13's own `TCP_TX_SEG_SIZE` / `TCP_RX_SEG_SIZE`.
const UCX_TCP_SEGS: (u32, u32) = (8 << 10, 64 << 10);

/// A UCX memory-units value (`"256K"`, `"1m"`, `"65536"`), in bytes.
fn parse_memunits(v: &str) -> Option<u32> {
    let v = v.trim();
    let v = v.strip_suffix(['b', 'B']).unwrap_or(v);
    let (num, shift) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 10),
        (i, 'm' | 'M') => (&v[..i], 20),
        (i, 'g' | 'G') => (&v[..i], 30),
        _ => (v, 0),
    };
    let n: u64 = num.trim().parse().ok()?;
    u32::try_from(n.checked_shl(shift)?.min(u64::from(u32::MAX) + 1)).ok()
}

/// Whether a `UCX_TLS` value lets UCX use TCP.
fn tls_has_tcp(tls: Option<&str>) -> bool {
    let Some(t) = tls else { return true };
    let has = |name: &str| {
        t.trim_start_matches('^')
            .split(',')
            .any(|x| x.trim() == name)
    };
    if t.starts_with('^') {
        !has("tcp")
    } else {
        has("tcp") || has("all")
    }
}

/// The TCP segment sizes (send, receive) this context ends up with: the last value in
/// `settings` (given to `ucp_config_modify`), else the environment, else UCX's default.
/// (0, 0) when the transports exclude TCP; 0 for a value we cannot read.
pub fn tcp_segments(settings: &[(String, String)], tls: Option<&str>) -> (u32, u32) {
    let env_tls = std::env::var("UCX_TLS").ok();
    if !tls_has_tcp(tls.or(env_tls.as_deref())) {
        return (0, 0);
    }
    let get = |name: &str, default: u32| match tcp_setting(settings, name) {
        Some(v) => parse_memunits(&v).unwrap_or(0),
        None => default,
    };
    (
        get("TX_SEG_SIZE", UCX_TCP_SEGS.0),
        get("RX_SEG_SIZE", UCX_TCP_SEGS.1),
    )
}

/// The `(name, value)` pairs to give `ucp_config_modify`, in order: the caller's
/// `config` (names as UCX applies them, see [`ucx_name`]), then [`TCP_DEFAULTS`] the
/// caller did not set (only where the transports include TCP), then `TLS`.
pub fn settings(config: &[(String, String)], tls: Option<&str>) -> Vec<(String, String)> {
    let mut settings: Vec<(String, String)> = config
        .iter()
        .map(|(k, v)| (ucx_name(k), v.clone()))
        .collect();
    let env_tls = std::env::var("UCX_TLS").ok();
    if tls_has_tcp(tls.or(env_tls.as_deref())) {
        for (name, value) in TCP_DEFAULTS {
            if tcp_setting(config, name).is_none() {
                settings.push((name.to_string(), value.to_string()));
            }
        }
    }
    if let Some(tls) = tls {
        settings.push(("TLS".into(), tls.to_owned()));
    }
    settings
}

/// `config` with `NET_DEVICES` set to the interface that owns `bind_ip` (UCX's TCP
/// transport then listens and connects there only), unless the caller set
/// `NET_DEVICES` (or `UCX_NET_DEVICES`) or `bind_ip` is unspecified (every interface).
pub fn with_bind_ip(config: &[(String, String)], bind_ip: IpAddr) -> Result<Vec<(String, String)>> {
    let mut out = config.to_vec();
    let set = config
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("NET_DEVICES"))
        || std::env::var_os("UCX_NET_DEVICES").is_some();
    if set || bind_ip.is_unspecified() {
        return Ok(out);
    }
    let dev = crate::ffi::interface_of(bind_ip).ok_or_else(|| {
        Error::invalid_argument(format!(
            "ucx: bind_ip {bind_ip} is not an address of any interface of this host"
        ))
    })?;
    out.push(("NET_DEVICES".into(), dev));
    Ok(out)
}

/// Whether the backend authenticates its peers: with `secret`, yes; without one it
/// starts only as [`Options::insecure`] allows (`Err(Unauthenticated)` otherwise), and
/// then warns that peers are not authenticated.
pub fn authenticates(
    opts: &Options,
    agent: &str,
    has_secret: bool,
    bind_ip: IpAddr,
) -> Result<bool> {
    if has_secret {
        if opts.insecure == Some(true) {
            return Err(Error::invalid_argument(
                "ucx: insecure=true together with a cluster secret; drop one of them",
            ));
        }
        return Ok(true);
    }
    let env_tls = std::env::var("UCX_TLS").ok();
    let local_only =
        bind_ip.is_loopback() || !tls_has_tcp(opts.tls.as_deref().or(env_tls.as_deref()));
    match opts.insecure {
        Some(true) => {
            tracing::warn!(
                "ucx backend of {agent}: no cluster secret and insecure=true: peers are not \
                 authenticated"
            );
            Ok(false)
        }
        None if local_only => {
            tracing::warn!(
                "ucx backend of {agent}: no cluster secret; serving unauthenticated on this \
                 host only (bind_ip {bind_ip}; any local user can reach it; set a secret, or \
                 insecure=true to say so)"
            );
            Ok(false)
        }
        _ => Err(Error::Unauthenticated(format!(
            "ucx backend of {agent}: no cluster secret configured and UCX's TCP transport \
             would serve on {bind_ip}, beyond this host; set AgentOptions.secret (KVX_SECRET) \
             on every agent, or pass insecure=true to run without authentication"
        ))),
    }
}

/// Whether the `tls` option names shared-memory transports only: UCX 1.13's refuse
/// peer error handling (UCS_ERR_UNREACHABLE), so `connect` does not try it.
pub fn shm_only(tls: Option<&str>) -> bool {
    tls.is_some_and(|t| {
        t.split(',').all(|x| {
            matches!(
                x.trim(),
                "posix" | "sysv" | "cma" | "self" | "knem" | "xpmem" | "sm" | "shm" | "mm"
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_params() {
        let mut p = Params::new();
        p.insert("tls".into(), "tcp".into());
        p.insert("progress_thread".into(), "true".into());
        p.insert("cancel_grace_ms".into(), "5".into());
        p.insert("ucx.RNDV_THRESH".into(), "8k".into());
        p.insert("rndv_min".into(), "65536".into());
        p.insert("max_inbox".into(), "0".into());
        p.insert("mapped".into(), "false".into());
        let o = Options::from_params(&p).unwrap();
        assert!(!o.mapped);
        assert_eq!(o.rndv_min, Some(65536));
        assert_eq!(o.max_inbox, 1);
        assert_eq!(o.tls.as_deref(), Some("tcp"));
        assert!(o.progress_thread);
        assert_eq!(o.cancel_grace, Duration::from_millis(5));
        assert_eq!(
            o.config,
            vec![("RNDV_THRESH".to_string(), "8k".to_string())]
        );
        p.insert("bogus".into(), "1".into());
        assert!(Options::from_params(&p).is_err());
        let mut p = Params::new();
        p.insert("progress_thread".into(), "maybe".into());
        assert!(matches!(
            Options::from_params(&p),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn no_secret_is_refused_unless_local_or_insecure() {
        let o = |tls: &str, insecure| Options {
            tls: Some(tls.into()),
            insecure,
            ..Options::default()
        };
        let lo = IpAddr::from([127, 0, 0, 1]);
        let any = IpAddr::from([0, 0, 0, 0]);
        let auth = |o: &Options, secret, ip| authenticates(o, "t", secret, ip);
        assert!(auth(&o("tcp", None), true, any).unwrap());
        assert!(matches!(
            auth(&o("tcp", Some(true)), true, lo),
            Err(Error::InvalidArgument(_))
        ));
        assert!(!auth(&o("tcp", None), false, lo).unwrap());
        assert!(!auth(&o("posix,cma,self", None), false, any).unwrap());
        assert!(!auth(&o("tcp", Some(true)), false, any).unwrap());
        for (tls, ip, insecure) in [
            ("tcp", any, None),
            ("tcp", lo, Some(false)),
            ("posix,cma,self", lo, Some(false)),
        ] {
            assert!(
                matches!(
                    auth(&o(tls, insecure), false, ip),
                    Err(Error::Unauthenticated(_))
                ),
                "{tls} {ip} {insecure:?}"
            );
        }
        let mut p = Params::new();
        p.insert("insecure".into(), "true".into());
        assert_eq!(Options::from_params(&p).unwrap().insecure, Some(true));
    }

    #[test]
    fn bind_ip_picks_its_interface() {
        let lo = IpAddr::from([127, 0, 0, 1]);
        if std::env::var_os("UCX_NET_DEVICES").is_none() {
            let s = with_bind_ip(&[], lo).unwrap();
            assert_eq!(s, vec![("NET_DEVICES".to_string(), "lo".to_string())]);
        }
        let mine = vec![("NET_DEVICES".to_string(), "eth9".to_string())];
        assert_eq!(with_bind_ip(&mine, lo).unwrap(), mine);
        assert!(with_bind_ip(&[], IpAddr::from([0, 0, 0, 0]))
            .unwrap()
            .is_empty());
        assert!(matches!(
            with_bind_ip(&[], IpAddr::from([192, 0, 2, 77])),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn memunits_parse_like_ucx() {
        assert_eq!(parse_memunits("256K"), Some(256 << 10));
        assert_eq!(parse_memunits("8k"), Some(8 << 10));
        assert_eq!(parse_memunits("1M"), Some(1 << 20));
        assert_eq!(parse_memunits("1mb"), Some(1 << 20));
        assert_eq!(parse_memunits("65536"), Some(65536));
        assert_eq!(parse_memunits("auto"), None);
        assert_eq!(parse_memunits(""), None);
        assert_eq!(parse_memunits("K"), None);
    }

    #[test]
    fn tcp_detection_and_effective_segments() {
        assert!(tls_has_tcp(Some("tcp")));
        assert!(tls_has_tcp(Some("rc,tcp")));
        assert!(tls_has_tcp(Some("all")));
        assert!(tls_has_tcp(Some("^posix")));
        assert!(!tls_has_tcp(Some("^tcp,posix")));
        assert!(!tls_has_tcp(Some("posix,cma,self")));
        let set = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(tcp_segments(&[], Some("posix,self")), (0, 0));
        let s = [
            set("TX_SEG_SIZE", "8K"),
            set("TX_SEG_SIZE", "256K"),
            set("RX_SEG_SIZE", "1M"),
        ];
        assert_eq!(tcp_segments(&s, Some("tcp")), (256 << 10, 1 << 20));
        assert_eq!(ucx_name("TCP_TX_SEG_SIZE"), "TX_SEG_SIZE");
        assert_eq!(ucx_name("tcp_nodelay"), "NODELAY");
        assert_eq!(ucx_name("TCP_CM_REUSEADDR"), "TCP_CM_REUSEADDR");
        assert_eq!(ucx_name("RNDV_THRESH"), "RNDV_THRESH");
    }
}
