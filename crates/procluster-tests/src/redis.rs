//! A real `redis-server` for the tests of the Redis backends: started on a
//! Unix socket in a temporary directory, persistence off, stopped when
//! dropped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::{DEADLINE, TempDir};

/// A `redis-server` process of a test's own.
pub struct RedisServer {
    child: Child,
    socket: PathBuf,
    // Removed after the server is stopped.
    _dir: TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    ///
    /// # Panics
    /// When `redis-server` is not installed (`apt-get install redis-server`;
    /// `.ci/run` installs it) or does not answer within the deadline: the
    /// test cannot run without it, so it fails rather than pass unchecked.
    pub fn start() -> Self {
        let dir = TempDir::new("redis");
        let socket = dir.0.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start redis-server ({error}): the Redis backend tests need it; \
                     install it with `apt-get install redis-server`"
                )
            });
        let server = Self {
            child,
            socket,
            _dir: dir,
        };
        server.wait_until_answering();
        server
    }

    /// The socket's path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The URL the `redis` crate connects with.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    fn wait_until_answering(&self) {
        let started = Instant::now();
        loop {
            if self.ping().is_ok() {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "redis-server did not answer on {} within {DEADLINE:?}",
                self.socket.display()
            );
            // Polling a socket that is not there yet: nothing to wait on.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn ping(&self) -> std::io::Result<()> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        stream.write_all(b"PING\r\n")?;
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer)?;
        if &answer == b"+PONG\r\n" {
            Ok(())
        } else {
            Err(std::io::Error::other("unexpected answer to PING"))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_answers_and_goes_away_with_its_socket() {
        let server = RedisServer::start();
        assert!(server.ping().is_ok());
        let socket = server.socket().to_path_buf();
        drop(server);
        assert!(UnixStream::connect(&socket).is_err());
    }
}
