//! Creating listening sockets, with errors that name the address. Public so
//! that the `procluster` command binds its sockets the same way.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Default `listen()` backlog, as large as most kernels allow by default.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// Options for a TCP listening socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpBind {
    /// `listen()` backlog (default [`DEFAULT_BACKLOG`]).
    pub backlog: Option<u32>,
    /// For an IPv6 address: IPv6 only (default: dual stack).
    pub ipv6_only: Option<bool>,
    /// `SO_REUSEPORT`, to bind the same address again.
    pub reuse_port: bool,
    /// Bind as the first socket of its group: the bind fails with
    /// `AddrInUse` when any socket holds the address, even one that set
    /// `SO_REUSEPORT` (another cluster, an old version still running); with
    /// [`reuse_port`](Self::reuse_port), `SO_REUSEPORT` is set only after the
    /// bind, so the group's later sockets can still join.
    pub first: bool,
}

/// Parses `host:port` (IPv6 in brackets) into a socket address, resolving a
/// host name.
///
/// # Errors
/// When the host does not resolve.
pub fn parse_addr(addr: &str) -> io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(parsed) = addr.parse() {
        return Ok(parsed);
    }
    addr.to_socket_addrs()
        .map_err(|e| with_context(e, &format!("cannot resolve {addr}")))?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr} resolves to no address"),
            )
        })
}

/// Binds and listens on a TCP address; the socket is close-on-exec and
/// non-blocking.
///
/// # Errors
/// The bind error, naming the address (see [`bind_error`]).
pub fn tcp(addr: SocketAddr, options: TcpBind) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if options.reuse_port && !options.first {
        set_reuse_port(&socket)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(options.ipv6_only.unwrap_or(false))?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| bind_error(e, &format!("tcp://{addr}")))?;
    if options.reuse_port && options.first {
        // Alone on the address so far; now others of the group may join
        // (Linux reads the flag of the bound socket when they bind).
        set_reuse_port(&socket)?;
    }
    let backlog = options
        .backlog
        .unwrap_or(DEFAULT_BACKLOG)
        .min(i32::MAX as u32) as i32;
    socket
        .listen(backlog)
        .map_err(|e| bind_error(e, &format!("tcp://{addr}")))?;
    Ok(socket)
}

/// Binds a UDP socket, close-on-exec and non-blocking; `reuse_port` sets
/// `SO_REUSEPORT` to bind the same address again.
///
/// # Errors
/// The bind error, naming the address.
pub fn udp(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    udp_with(
        addr,
        UdpBind {
            reuse_port,
            ..UdpBind::default()
        },
    )
}

/// Options for a UDP socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpBind {
    /// For an IPv6 address: IPv6 only (default: dual stack).
    pub ipv6_only: Option<bool>,
    /// `SO_REUSEADDR` (Node's `reuseAddr`): bind an address another socket
    /// with the option holds (multicast receivers).
    pub reuse_address: bool,
    /// `SO_REUSEPORT`, to bind the same address again.
    pub reuse_port: bool,
}

/// [`udp`] with every option.
///
/// # Errors
/// The bind error, naming the address.
pub fn udp_with(addr: SocketAddr, options: UdpBind) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )?;
    if options.reuse_port {
        set_reuse_port(&socket)?;
    }
    if options.reuse_address {
        socket.set_reuse_address(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(options.ipv6_only.unwrap_or(false))?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| bind_error(e, &format!("udp://{addr}")))?;
    Ok(socket)
}

/// `SO_REUSEPORT`, where the system has it.
fn set_reuse_port(socket: &Socket) -> io::Result<()> {
    #[cfg(all(unix, not(target_os = "solaris"), not(target_os = "illumos")))]
    socket.set_reuse_port(true)?;
    #[cfg(not(all(unix, not(target_os = "solaris"), not(target_os = "illumos"))))]
    let _ = socket;
    Ok(())
}

/// Binds and listens on a Unix stream socket path; the socket is
/// close-on-exec and non-blocking.
///
/// A socket file left at `path` by a process that is gone (nobody accepts
/// on it: connecting is refused) is removed first, as servers commonly do.
/// A live socket (a connection succeeds) is an address in use, and a file
/// that is not a socket is never removed.
///
/// # Errors
/// The bind error, naming the path: `AddrInUse` for a live socket,
/// `AlreadyExists` for a file that is not a socket.
pub fn unix(path: &Path, backlog: Option<u32>) -> io::Result<Socket> {
    let name = format!("unix:{}", path.display());
    remove_stale_socket(path).map_err(|e| bind_error(e, &name))?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    let address = SockAddr::unix(path).map_err(|e| bind_error(e, &name))?;
    socket.bind(&address).map_err(|e| bind_error(e, &name))?;
    let backlog = backlog.unwrap_or(DEFAULT_BACKLOG).min(i32::MAX as u32) as i32;
    socket.listen(backlog).map_err(|e| bind_error(e, &name))?;
    Ok(socket)
}

/// Removes a Unix socket file nobody listens on; leaves a live socket, and
/// anything that is not a socket, in place with an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::from(io::ErrorKind::AddrInUse)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        // Not ours to judge (no permission, say): let bind say what it is.
        Err(_) => Ok(()),
    }
}

/// The error of a failed bind, naming the address, with advice for the
/// usual causes.
pub fn bind_error(error: io::Error, address: &str) -> io::Error {
    let advice = match error.kind() {
        io::ErrorKind::AddrInUse => {
            " (another process listens there; pick another port or stop it)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        io::ErrorKind::AddrNotAvailable => " (no local interface has that address)",
        io::ErrorKind::AlreadyExists => " (a file that is not a socket is in the way)",
        _ => "",
    };
    io::Error::new(
        error.kind(),
        format!("cannot listen on {address}: {error}{advice}"),
    )
}

fn with_context(error: io::Error, context: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{context}: {error}"))
}

/// The address a socket is bound to, as `tcp://…`, `udp://…` or `unix:…`
/// (the form `Event::Listening` and the CLI's `status` report).
///
/// ```
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let port = listener.local_addr().unwrap().port();
/// assert_eq!(procluster::listeners::describe_socket(&listener), format!("tcp://127.0.0.1:{port}"));
/// ```
pub fn describe_socket(socket: &impl std::os::fd::AsFd) -> String {
    let socket = socket2::SockRef::from(socket);
    let Ok(local) = socket.local_addr() else {
        return "unknown".into();
    };
    let stream = socket.r#type().map(|t| t == Type::STREAM).unwrap_or(true);
    if let Some(addr) = local.as_socket() {
        return format!("{}://{addr}", if stream { "tcp" } else { "udp" });
    }
    match local.as_pathname() {
        Some(path) => format!("unix:{}", path.display()),
        None => "unix:(unnamed)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("procluster-bind-{tag}-{}", std::process::id()))
    }

    #[test]
    fn a_stale_unix_socket_is_replaced() {
        let path = temp_path("stale");
        let _ = std::fs::remove_file(&path);
        // Bound, then dropped: the file stays, nobody listens.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let socket = unix(&path, None).expect("the stale file is replaced");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(socket);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_live_unix_socket_is_in_use_and_stays() {
        let path = temp_path("live");
        let _ = std::fs::remove_file(&path);
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let error = unix(&path, None).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse, "{error}");
        assert!(error.to_string().contains(&path.display().to_string()));
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(live);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_removed() {
        let path = temp_path("file");
        std::fs::write(&path, "data").unwrap();
        let error = unix(&path, None).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists, "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        let _ = std::fs::remove_file(&path);
    }
}
