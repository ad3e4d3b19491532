//! `--listen` specs and binding them: `[NAME=]tcp://HOST:PORT`,
//! `[NAME=]HOST:PORT`, `[NAME=]udp://HOST:PORT`, `[NAME=]unix:PATH`.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use procluster::listeners::bind;
use procluster::listeners::slots::{ReusePortBinder, SlotSockets};

/// What to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Udp(String),
    Unix(PathBuf),
}

/// One `--listen` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name for LISTEN_FDNAMES (defaults to `listen<N>` by position).
    pub name: Option<String>,
    pub endpoint: Endpoint,
}

impl ListenSpec {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, rest) = split_name(text);
        if let Some(name) = name {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "invalid listener name {name:?} in {text:?}: use letters, digits, '-', '_' or '.'"
                ));
            }
        }
        let endpoint = if let Some(path) = rest.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!("{text:?}: unix: needs a path"));
            }
            Endpoint::Unix(PathBuf::from(path))
        } else if let Some(addr) = rest.strip_prefix("udp://") {
            Endpoint::Udp(check_host_port(addr, text)?)
        } else if let Some(addr) = rest.strip_prefix("tcp://") {
            Endpoint::Tcp(check_host_port(addr, text)?)
        } else if rest.contains("://") {
            return Err(format!(
                "{text:?}: unknown scheme; expected tcp://, udp:// or unix:"
            ));
        } else {
            Endpoint::Tcp(check_host_port(rest, text)?)
        };
        Ok(Self {
            name: name.map(str::to_string),
            endpoint,
        })
    }

    /// Whether SO_REUSEPORT makes sense (TCP and UDP).
    pub fn is_inet(&self) -> bool {
        !matches!(self.endpoint, Endpoint::Unix(_))
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "{name}=")?;
        }
        match &self.endpoint {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Udp(a) => write!(f, "udp://{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `NAME=` comes before any `:` or `/`, so `unix:/a=b` keeps its `=`.
fn split_name(text: &str) -> (Option<&str>, &str) {
    match text.find('=') {
        Some(eq) if !text[..eq].contains([':', '/', '[']) => (Some(&text[..eq]), &text[eq + 1..]),
        _ => (None, text),
    }
}

fn check_host_port(addr: &str, whole: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(
            "invalid listen address {whole:?}: {why} (e.g. 127.0.0.1:8080, [::]:80, localhost:0)"
        )
    };
    if addr.contains('/') {
        let hint = ["tcp", "udp", "unix"]
            .iter()
            .find(|scheme| addr.starts_with(*scheme))
            .map(|scheme| format!(" (did you mean {scheme}://…?)"))
            .unwrap_or_default();
        return Err(bad(&format!("a host has no '/'{hint}")));
    }
    let colon = addr.rfind(':').ok_or_else(|| bad("missing :PORT"))?;
    let (host, port) = (&addr[..colon], &addr[colon + 1..]);
    if host.is_empty() {
        return Err(bad(
            "missing HOST (use 0.0.0.0 or [::] for every interface)",
        ));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("an IPv6 address goes in brackets"));
    }
    port.parse::<u16>()
        .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
    Ok(addr.to_string())
}

/// A bound listener and how to describe it.
#[derive(Debug)]
pub struct Bound {
    pub name: String,
    /// As actually bound, e.g. `tcp://127.0.0.1:43121`.
    pub address: String,
    pub sockets: Sockets,
}

/// One socket for every worker, or one per worker slot (reuseport).
#[derive(Debug)]
pub enum Sockets {
    Shared(OwnedFd),
    PerSlot(Box<SlotSockets>),
}

/// How to bind: once for every worker, or with SO_REUSEPORT (one socket
/// per worker slot, all on the address the first one got), and the
/// `listen()` backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindOptions {
    pub reuse_port: bool,
    pub backlog: Option<u32>,
}

/// Binds `spec`. A port 0 becomes the kernel's choice, shared by every
/// slot's socket under reuseport (TCP and UDP; a Unix socket is always
/// shared). Sockets are left blocking, as socket activation hands them
/// over (the flag belongs to the socket that every worker shares).
pub fn bind(spec: &ListenSpec, index: usize, options: BindOptions) -> io::Result<Bound> {
    let name = spec
        .name
        .clone()
        .unwrap_or_else(|| format!("listen{index}"));
    let tcp_options = bind::TcpBind {
        backlog: options.backlog,
        reuse_port: options.reuse_port,
        ..Default::default()
    };
    let sockets = match &spec.endpoint {
        Endpoint::Tcp(addr) if options.reuse_port => {
            let binder = ReusePortBinder::tcp(bind::parse_addr(addr)?, tcp_options)?;
            Sockets::PerSlot(Box::new(SlotSockets::new(binder.blocking(true))))
        }
        Endpoint::Udp(addr) if options.reuse_port => {
            let binder = ReusePortBinder::udp(bind::parse_addr(addr)?)?;
            Sockets::PerSlot(Box::new(SlotSockets::new(binder.blocking(true))))
        }
        Endpoint::Tcp(addr) => {
            Sockets::Shared(blocking(bind::tcp(bind::parse_addr(addr)?, tcp_options)?)?)
        }
        Endpoint::Udp(addr) => {
            Sockets::Shared(blocking(bind::udp(bind::parse_addr(addr)?, false)?)?)
        }
        Endpoint::Unix(path) => Sockets::Shared(blocking(bind::unix(path, options.backlog)?)?),
    };
    let address = match &sockets {
        Sockets::Shared(socket) => procluster::listeners::describe_socket(socket),
        Sockets::PerSlot(slots) => slots.address().to_string(),
    };
    Ok(Bound {
        name,
        address,
        sockets,
    })
}

fn blocking(socket: socket2::Socket) -> io::Result<OwnedFd> {
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ListenSpec {
        ListenSpec::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_form_parses() {
        assert_eq!(
            parse("127.0.0.1:8080").endpoint,
            Endpoint::Tcp("127.0.0.1:8080".into())
        );
        assert_eq!(
            parse("tcp://[::1]:0").endpoint,
            Endpoint::Tcp("[::1]:0".into())
        );
        assert_eq!(
            parse("udp://0.0.0.0:53").endpoint,
            Endpoint::Udp("0.0.0.0:53".into())
        );
        assert_eq!(
            parse("unix:/run/app.sock").endpoint,
            Endpoint::Unix("/run/app.sock".into())
        );
        assert_eq!(
            parse("localhost:0").endpoint,
            Endpoint::Tcp("localhost:0".into())
        );
    }

    #[test]
    fn names_come_before_the_address() {
        let spec = parse("web=tcp://127.0.0.1:80");
        assert_eq!(spec.name.as_deref(), Some("web"));
        assert_eq!(spec.to_string(), "web=tcp://127.0.0.1:80");
        let spec = parse("admin=unix:/tmp/a=b.sock");
        assert_eq!(spec.name.as_deref(), Some("admin"));
        assert_eq!(spec.endpoint, Endpoint::Unix("/tmp/a=b.sock".into()));
        assert_eq!(parse("unix:/tmp/a=b.sock").name, None);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (text, why) in [
            ("127.0.0.1", "missing :PORT"),
            (":80", "missing HOST"),
            ("127.0.0.1:99999", "port"),
            ("::1:80", "brackets"),
            ("http://x:1", "unknown scheme"),
            ("unix:", "needs a path"),
            ("bad name=1.2.3.4:5", "invalid listener name"),
            ("tcp//127.0.0.1:80", "did you mean tcp://"),
            ("127.0.0.1/8:80", "a host has no '/'"),
            ("udp:/127.0.0.1:53", "did you mean udp://"),
        ] {
            let error = ListenSpec::parse(text).unwrap_err();
            assert!(error.contains(why), "{text}: {error}");
        }
    }

    #[test]
    fn port_zero_is_bound_once_and_described_as_bound() {
        let bound = bind(&parse("tcp://127.0.0.1:0"), 0, BindOptions::default()).unwrap();
        assert_eq!(bound.name, "listen0");
        assert!(bound.address.starts_with("tcp://127.0.0.1:"));
        assert!(!bound.address.ends_with(":0"));
    }

    #[test]
    fn a_port_in_use_is_a_clear_error() {
        let first = bind(&parse("127.0.0.1:0"), 0, BindOptions::default()).unwrap();
        let addr = first.address.trim_start_matches("tcp://").to_string();
        let error = bind(&parse(&addr), 0, BindOptions::default()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        assert!(
            error.to_string().contains("another process listens there"),
            "{error}"
        );
    }
}
