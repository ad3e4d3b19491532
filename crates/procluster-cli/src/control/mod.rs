//! The control socket: `status`, `reload`, `scale` and `stop` talk to a
//! running primary over a Unix stream socket, one JSON request line and one
//! JSON response line per connection.
//!
//! Only the primary's own user may connect: the socket is mode 0600 in a
//! 0700 directory, and the server checks the peer's uid (SO_PEERCRED).

pub mod client;
pub mod logs;
pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::args::Scale;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Reload {
        wait: bool,
    },
    Scale {
        scale: Scale,
    },
    Stop,
    /// Recent output, and with `follow` what comes after: answered by the
    /// control socket itself, as a stream of lines.
    Logs(logs::LogsQuery),
}

/// The answer: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
            message: Some(message.into()),
        }
    }

    pub fn status(status: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            status: Some(status),
            message: None,
        }
    }

    pub fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            status: None,
            message: None,
        }
    }
}

/// `$XDG_RUNTIME_DIR/procluster/NAME.sock`, or `/tmp/procluster-UID/NAME.sock`
/// without a runtime directory.
pub fn default_path(name: &str) -> PathBuf {
    runtime_dir().join(format!("{name}.sock"))
}

/// The per-user directory for control and notify sockets.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() && std::path::Path::new(&dir).is_dir() => {
            PathBuf::from(dir).join("procluster")
        }
        _ => {
            std::env::temp_dir().join(format!("procluster-{}", rustix::process::getuid().as_raw()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let text = serde_json::to_string(&Request::Scale {
            scale: Scale::Add(2),
        })
        .unwrap();
        assert_eq!(text, r#"{"cmd":"scale","scale":{"add":2}}"#);
        let back: Request = serde_json::from_str(r#"{"cmd":"reload","wait":true}"#).unwrap();
        assert_eq!(back, Request::Reload { wait: true });
    }

    #[test]
    fn the_default_path_is_per_name() {
        assert!(default_path("web").ends_with("web.sock"));
    }
}
