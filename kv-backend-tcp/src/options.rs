//! Options of the backend: the typed [`Options`], read from agent parameters, and
//! the address published to peers.

use std::net::SocketAddr;
use std::time::Duration;

use kv_core::{BackendInit, Error, Params, Result};

use crate::wire;

/// Options of the TCP backend; [`Options::from_params`] reads them from agent
/// parameters (param names in parentheses). `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Listener address (param `listen`, `ip:port`); default `None`: the agent's
    /// [`BackendInit::bind_ip`] (loopback unless the operator says otherwise) with
    /// [`Options::port`]. An explicit address here wins over `bind_ip`.
    pub listen: Option<SocketAddr>,
    /// Listener port when `listen` is not set (param `port`, or `listen` given a port
    /// alone), default 0 (any).
    pub port: u16,
    /// Run without a cluster secret (param `insecure`): `Some(true)` accepts peers
    /// without authentication; `Some(false)` refuses to start without a secret;
    /// `None` (default) refuses to start without a secret unless the listener is on a
    /// loopback address (then it runs unauthenticated and logs a warning).
    pub insecure: Option<bool>,
    /// Longest time a new connection may take to authenticate (preamble, handshake,
    /// HELLO) before it is closed (param `handshake_timeout_ms`), default 3 s.
    pub handshake_timeout: Duration,
    /// Most connections still authenticating at once (param `max_pending`), default
    /// 64; beyond it the oldest is closed. Counted apart from `max_connections`, so
    /// idle or unauthenticated connections never push an authenticated peer out.
    pub max_pending: usize,
    /// Address published in the connection info (param `advertise`, an IP or
    /// `ip:port`); default: the listener's address, or when it listens on an
    /// unspecified IP (`0.0.0.0`), the IP of the default route (`127.0.0.1` without one).
    pub advertise: Option<String>,
    /// Data connections (and worker threads) per peer (param `connections`), default
    /// `min(available_parallelism, 4)`.
    pub connections: usize,
    /// Use shared memory / cross-memory attach for peers on this host (param
    /// `same_host`), default true.
    pub same_host: bool,
    /// Longest wait for a connection and handshake (param `connect_timeout_ms`), default 5 s.
    pub connect_timeout: Duration,
    /// Longest time a peer may make no progress in a frame before it counts as gone
    /// (param `io_timeout_ms`), default 10 s.
    pub io_timeout: Duration,
    /// Largest notification payload (param `max_notification`), default 64 KiB.
    pub max_notification: usize,
    /// Largest payload of one frame (param `max_frame`), default 4 MiB.
    pub max_frame: usize,
    /// Same-host transfers (shared memory or cross-memory attach) up to this size run
    /// inside `post` instead of on the worker threads (param `inline_max`), default
    /// 4 MiB; larger ones are split over the `connections` worker threads.
    pub inline_max: usize,
    /// Most authenticated incoming connections served at once (param
    /// `max_connections`), default 256; more are refused after their handshake with a
    /// logged reason. Each peer uses one control connection plus up to `connections`
    /// data connections.
    pub max_connections: usize,
    /// Most received notifications waiting for `drain_notifications` (param
    /// `max_inbox`), default 65 536; a NOTIFY beyond it closes the sender's connection
    /// with a logged reason (the notification is lost).
    pub max_inbox: usize,
    /// Most payload bytes waiting in the notification inbox (param
    /// `max_inbox_bytes`), default 64 MiB; beyond it as for `max_inbox`.
    pub max_inbox_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Options {
            listen: None,
            port: 0,
            insecure: None,
            handshake_timeout: Duration::from_secs(3),
            max_pending: 64,
            advertise: None,
            connections: cores.clamp(1, 4),
            same_host: true,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            max_notification: 64 << 10,
            max_frame: 4 << 20,
            inline_max: 4 << 20,
            max_connections: 256,
            max_inbox: 65_536,
            max_inbox_bytes: 64 << 20,
        }
    }
}

impl Options {
    /// Reads the options from agent parameters; unknown keys are refused so typos show.
    pub fn from_params(params: &Params) -> Result<Options> {
        let mut o = Options::default();
        fn num(k: &str, v: &str) -> Result<u64> {
            v.parse().map_err(|_| {
                Error::invalid_argument(format!("tcp option {k}={v:?} is not a number"))
            })
        }
        fn boolean(k: &str, v: &str) -> Result<bool> {
            match v {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(Error::invalid_argument(format!(
                    "tcp option {k}={v:?} is not a boolean"
                ))),
            }
        }
        for (k, v) in params {
            match k.as_str() {
                "listen" => match (v.parse::<SocketAddr>(), v.parse::<u16>()) {
                    (Ok(a), _) => o.listen = Some(a),
                    (_, Ok(p)) => o.port = p,
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "tcp option listen={v:?} is not ip:port or a port"
                        )))
                    }
                },
                "port" => {
                    o.port = v.parse().map_err(|_| {
                        Error::invalid_argument(format!("tcp option port={v:?} is not a port"))
                    })?
                }
                "advertise" => o.advertise = Some(v.clone()),
                "connections" => o.connections = num(k, v)?.clamp(1, 64) as usize,
                "same_host" => o.same_host = boolean(k, v)?,
                "insecure" => o.insecure = Some(boolean(k, v)?),
                "handshake_timeout_ms" => {
                    o.handshake_timeout = Duration::from_millis(num(k, v)?.max(1))
                }
                "max_pending" => o.max_pending = num(k, v)?.max(1) as usize,
                "connect_timeout_ms" => o.connect_timeout = Duration::from_millis(num(k, v)?),
                "io_timeout_ms" => o.io_timeout = Duration::from_millis(num(k, v)?),
                "max_notification" => {
                    o.max_notification = num(k, v)?.min(wire::MAX_NOTIFY) as usize
                }
                "max_frame" => o.max_frame = num(k, v)?.clamp(4096, wire::MAX_FRAME_BYTES) as usize,
                "inline_max" => o.inline_max = num(k, v)? as usize,
                "max_connections" => o.max_connections = num(k, v)?.max(1) as usize,
                "max_inbox" => o.max_inbox = num(k, v)?.max(1) as usize,
                "max_inbox_bytes" => o.max_inbox_bytes = num(k, v)? as usize,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown tcp option {k:?} (known: listen, port, advertise, connections, \
                         same_host, insecure, connect_timeout_ms, io_timeout_ms, \
                         handshake_timeout_ms, max_notification, max_frame, inline_max, \
                         max_connections, max_pending, max_inbox, max_inbox_bytes)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Where the listener binds: [`Options::listen`] if set, else `init.bind_ip` with
/// [`Options::port`].
pub(crate) fn listen_addr(opts: &Options, init: &BackendInit) -> SocketAddr {
    opts.listen
        .unwrap_or_else(|| SocketAddr::new(init.bind_ip, opts.port))
}

/// Whether the backend authenticates its connections: with a secret, yes; without
/// one, it starts only when [`Options::insecure`] allows it (see there).
pub(crate) fn authenticates(
    opts: &Options,
    init: &BackendInit,
    listen: SocketAddr,
) -> Result<bool> {
    if init.secret.is_some() {
        if opts.insecure == Some(true) {
            return Err(Error::invalid_argument(
                "tcp: insecure=true together with a cluster secret; drop one of them",
            ));
        }
        return Ok(true);
    }
    match opts.insecure {
        Some(true) => {
            tracing::warn!(
                "tcp backend of {}: no cluster secret and insecure=true: peers are not authenticated",
                init.agent_name
            );
            Ok(false)
        }
        None if listen.ip().is_loopback() => {
            tracing::warn!(
                "tcp backend of {}: no cluster secret; serving unauthenticated on loopback \
                 {listen} (any local user can reach it; set a secret, or insecure=true to \
                 say so)",
                init.agent_name
            );
            Ok(false)
        }
        _ => Err(Error::Unauthenticated(format!(
            "tcp backend of {}: no cluster secret configured and the listener {listen} is \
             not loopback; set AgentOptions.secret (KVX_SECRET) on every agent, or pass \
             insecure=true to run without authentication",
            init.agent_name
        ))),
    }
}

/// The address peers should connect to (see [`Options::advertise`]).
pub(crate) fn advertise(opts: &Options, bound: SocketAddr) -> Result<SocketAddr> {
    if let Some(a) = &opts.advertise {
        if let Ok(sa) = a.parse::<SocketAddr>() {
            return Ok(sa);
        }
        let ip: std::net::IpAddr = a.parse().map_err(|_| {
            Error::invalid_argument(format!(
                "tcp option advertise={a:?} is not an IP or ip:port"
            ))
        })?;
        return Ok(SocketAddr::new(ip, bound.port()));
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    // The source address of the default route; connecting a UDP socket sends nothing.
    let ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    Ok(SocketAddr::new(ip, bound.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_params() {
        let p = Params::from([
            ("connections".to_string(), "3".to_string()),
            ("same_host".to_string(), "false".to_string()),
            ("listen".to_string(), "127.0.0.1:0".to_string()),
        ]);
        let o = Options::from_params(&p).unwrap();
        assert_eq!((o.connections, o.same_host), (3, false));
        let init = BackendInit::new("x");
        assert_eq!(listen_addr(&o, &init), "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            listen_addr(
                &Options::default(),
                &init.clone().with_bind_ip([10, 0, 0, 1].into())
            ),
            "10.0.0.1:0".parse().unwrap()
        );
        let port = Options::from_params(&Params::from([("listen".into(), "7000".into())])).unwrap();
        assert_eq!(
            listen_addr(&port, &init.clone().with_bind_ip([10, 0, 0, 2].into())),
            "10.0.0.2:7000".parse().unwrap()
        );
        assert!(Options::from_params(&Params::from([("listen".into(), "x".into())])).is_err());
        assert!(
            Options::from_params(&Params::from([("insecure".into(), "maybe".into())])).is_err()
        );
        assert!(Options::from_params(&Params::from([("conections".into(), "3".into())])).is_err());
        assert!(
            Options::from_params(&Params::from([("same_host".into(), "maybe".into())])).is_err()
        );
        assert!(Options::default().connections >= 1);
    }

    #[test]
    fn no_secret_is_refused_unless_loopback_or_insecure() {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let plain = BackendInit::new("a");
        let secret = plain
            .clone()
            .with_secret(kv_core::auth::ClusterSecret::generate().unwrap());
        let o = |insecure| Options {
            insecure,
            ..Options::default()
        };
        assert!(authenticates(&o(None), &secret, any).unwrap());
        assert!(!authenticates(&o(None), &plain, lo).unwrap());
        assert!(matches!(
            authenticates(&o(None), &plain, any),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            authenticates(&o(Some(false)), &plain, lo),
            Err(Error::Unauthenticated(_))
        ));
        assert!(!authenticates(&o(Some(true)), &plain, any).unwrap());
        assert!(authenticates(&o(Some(true)), &secret, lo).is_err());
    }

    #[test]
    fn advertised_address_is_connectable() {
        let any = SocketAddr::from(([0, 0, 0, 0], 4000));
        assert!(!advertise(&Options::default(), any)
            .unwrap()
            .ip()
            .is_unspecified());
        let o = Options {
            advertise: Some("10.1.2.3".into()),
            ..Options::default()
        };
        assert_eq!(
            advertise(&o, any).unwrap(),
            "10.1.2.3:4000".parse().unwrap()
        );
        let lo = SocketAddr::from(([127, 0, 0, 1], 5000));
        assert_eq!(advertise(&Options::default(), lo).unwrap(), lo);
    }
}
