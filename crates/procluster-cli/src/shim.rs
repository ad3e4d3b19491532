//! The exec shim: `procluster __exec [OPTIONS] -- PROGRAM [ARGS...]`.
//!
//! `LISTEN_PID` must be the pid of the process that uses the sockets, which
//! the primary cannot know before the fork. So each worker starts as this
//! small program (the primary's own binary, before any runtime or thread
//! exists): it sets `LISTEN_PID` to its own pid, which `exec` keeps, cleans
//! the environment of what belongs to the primary, drops privileges if asked,
//! and `exec`s the program. The descriptors are already in place (the
//! primary puts the listeners at 3.. and a readiness fd after them).
//!
//! What it removes from the inherited environment, and sets again only when
//! this worker should have it: `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`
//! (the primary's own socket activation), `NOTIFY_SOCKET`, `WATCHDOG_USEC`,
//! `WATCHDOG_PID` (the primary's systemd notification), `NODE_CHANNEL_FD`,
//! `NODE_CHANNEL_SERIALIZATION_MODE` (a Node parent of the primary). The
//! per-worker values come in `PROCLUSTER_SHIM_*` variables, also removed.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use clap::Args;

/// Per-worker values the primary passes through the environment.
pub mod keys {
    pub const NOTIFY_SOCKET: &str = "PROCLUSTER_SHIM_NOTIFY_SOCKET";
    pub const NODE_CHANNEL_FD: &str = "PROCLUSTER_SHIM_NODE_CHANNEL_FD";
    pub const WATCHDOG_USEC: &str = "PROCLUSTER_SHIM_WATCHDOG_USEC";
}

const INHERITED: [&str; 8] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
];

#[derive(Debug, Args, Clone, Default)]
pub struct ShimArgs {
    /// Number of sockets at 3.. (LISTEN_FDS); 0 sets no LISTEN_* variable.
    #[arg(long, default_value_t = 0)]
    pub listen_fds: usize,
    /// LISTEN_FDNAMES (names joined by ':').
    #[arg(long, default_value = "")]
    pub listen_fdnames: String,
    /// Switch to this uid before exec.
    #[arg(long)]
    pub uid: Option<u32>,
    /// Switch to this gid (and only this group) before exec.
    #[arg(long)]
    pub gid: Option<u32>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

impl ShimArgs {
    /// The arguments that make `procluster` run as this shim.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["__exec".into()];
        args.push(format!("--listen-fds={}", self.listen_fds).into());
        args.push(format!("--listen-fdnames={}", self.listen_fdnames).into());
        if let Some(uid) = self.uid {
            args.push(format!("--uid={uid}").into());
        }
        if let Some(gid) = self.gid {
            args.push(format!("--gid={gid}").into());
        }
        args.push("--".into());
        args.extend(self.command.iter().cloned());
        args
    }
}

/// Exit status when the program cannot be executed (as a shell does).
const NOT_FOUND: i32 = 127;
const NOT_EXECUTABLE: i32 = 126;

/// Runs the shim; returns only on failure, with the exit status to use.
pub fn exec(args: ShimArgs) -> i32 {
    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("procluster __exec: no program given");
        return 2;
    };
    let mut command = std::process::Command::new(program);
    command.args(rest);
    for key in INHERITED {
        command.env_remove(key);
    }
    if args.listen_fds > 0 {
        command
            .env("LISTEN_FDS", args.listen_fds.to_string())
            .env("LISTEN_PID", std::process::id().to_string())
            .env("LISTEN_FDNAMES", &args.listen_fdnames);
    }
    if let Some(path) = std::env::var_os(keys::NOTIFY_SOCKET) {
        command.env("NOTIFY_SOCKET", path);
    }
    if let Some(fd) = std::env::var_os(keys::NODE_CHANNEL_FD) {
        command
            .env("NODE_CHANNEL_FD", fd)
            .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
    }
    if let Some(usec) = std::env::var_os(keys::WATCHDOG_USEC) {
        command
            .env("WATCHDOG_USEC", usec)
            .env("WATCHDOG_PID", std::process::id().to_string());
    }
    command
        .env_remove(keys::NOTIFY_SOCKET)
        .env_remove(keys::NODE_CHANNEL_FD)
        .env_remove(keys::WATCHDOG_USEC);
    if let Err(error) = drop_privileges(args.uid, args.gid) {
        eprintln!(
            "procluster: cannot switch the worker to uid {:?} gid {:?}: {error}",
            args.uid, args.gid
        );
        return 1;
    }
    let error = command.exec();
    eprintln!(
        "procluster: cannot execute {}: {error}",
        program.to_string_lossy()
    );
    match error.kind() {
        std::io::ErrorKind::NotFound => NOT_FOUND,
        _ => NOT_EXECUTABLE,
    }
}

/// setgroups, setgid, setuid in that order (after setuid the others are no
/// longer allowed). The shim is single-threaded, so the per-thread system
/// calls change the whole process. Changing credentials clears the
/// parent-death signal, so it is set again, and the primary checked for.
fn drop_privileges(uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    use rustix::process::{Gid, Uid};
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    let parent = rustix::process::getppid();
    if let Some(gid) = gid {
        let gid = Gid::from_raw(gid);
        rustix::thread::set_thread_groups(&[gid])?;
        rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    }
    if let Some(uid) = uid {
        let uid = Uid::from_raw(uid);
        rustix::thread::set_thread_res_uid(uid, uid, uid)?;
    }
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    if rustix::process::getppid() != parent {
        // The primary died meanwhile.
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(subcommand)]
        cmd: Sub,
    }
    #[derive(clap::Subcommand)]
    enum Sub {
        #[command(name = "__exec")]
        Exec(ShimArgs),
    }

    #[test]
    fn shim_arguments_round_trip() {
        let args = ShimArgs {
            listen_fds: 2,
            listen_fdnames: "web:admin".into(),
            uid: Some(1000),
            gid: None,
            command: vec!["node".into(), "--flag".into(), "server.js".into()],
        };
        let mut argv: Vec<OsString> = vec!["procluster".into()];
        argv.extend(args.to_args());
        let Sub::Exec(parsed) = Wrapper::try_parse_from(argv).unwrap().cmd;
        assert_eq!(parsed.listen_fds, 2);
        assert_eq!(parsed.listen_fdnames, "web:admin");
        assert_eq!(parsed.uid, Some(1000));
        assert_eq!(parsed.command, args.command);
    }
}
