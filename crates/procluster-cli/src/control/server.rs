//! The primary's side of the control socket.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::{Request, Response};
use crate::recent::Recent;

/// A request and where its answer goes.
pub type Call = (Request, oneshot::Sender<Response>);

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// The bound control socket; the file is removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    /// Workers' recent output, for `logs` requests.
    recent: Option<Arc<Recent>>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Creates the directory (0700, ours), refuses a socket a live primary
    /// answers on, replaces a stale one, and binds (0600).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        private_dir(dir)?;
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another procluster is running with control socket {} \
                         (stop it, or give this one another --name or --control)",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind control socket {}: {e}", path.display()),
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            path: path.to_path_buf(),
            listener: Some(listener),
            recent: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `logs` requests find the workers' recent output.
    pub fn keep_logs(&mut self, recent: Arc<Recent>) {
        self.recent = Some(recent);
    }

    /// Accepts clients until the runtime ends, passing their requests on.
    pub fn serve(&mut self, calls: mpsc::UnboundedSender<Call>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let recent = self.recent.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let calls = calls.clone();
                let recent = recent.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, calls, recent).await {
                        tracing::debug!(%error, "control client");
                    }
                });
            }
        });
    }
}

/// Creates `dir` mode 0700, or checks an existing one is ours. An existing
/// directory keeps its mode (it may be the application's own): the socket
/// itself is 0600 and every caller's credentials are checked.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    let existed = dir.is_dir();
    match std::fs::create_dir_all(dir) {
        Ok(()) => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create directory {}: {e}", dir.display()),
            ));
        }
    }
    let meta = std::fs::metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to this user (uid {me}); pick another --control path",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if !existed && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

async fn answer(
    stream: UnixStream,
    calls: mpsc::UnboundedSender<Call>,
    recent: Option<Arc<Recent>>,
) -> io::Result<()> {
    let me = rustix::process::geteuid();
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    let (read, mut write) = stream.into_split();
    let response = if peer.uid != me {
        tracing::warn!(
            uid = peer.uid.as_raw(),
            pid = peer.pid.as_raw_nonzero().get(),
            "refused a control client of another user"
        );
        Response::error("permission denied: only the user running procluster may control it")
    } else {
        let mut line = String::new();
        BufReader::new(read)
            .take(MAX_REQUEST)
            .read_line(&mut line)
            .await?;
        match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(Request::Logs(query)) => return super::logs::serve(query, write, recent).await,
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if calls.send((request, tx)).is_err() {
                    Response::error("procluster is shutting down")
                } else {
                    rx.await
                        .unwrap_or_else(|_| Response::error("procluster is shutting down"))
                }
            }
        }
    };
    let mut bytes = serde_json::to_vec(&response)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}
