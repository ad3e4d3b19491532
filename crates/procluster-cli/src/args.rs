//! The command line: subcommands and their flags, and parsers for the small
//! value types (durations, signals, worker counts, scale requests).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use procluster::{Policy, Signal};
use serde::{Deserialize, Serialize};

/// Run any program as a cluster of worker processes that share its ports.
///
/// `procluster run` binds the listening sockets once and hands them to every
/// worker as systemd socket activation (LISTEN_FDS from fd 3, LISTEN_PID,
/// LISTEN_FDNAMES), so gunicorn, uvicorn --fd 3, Node's listen({fd: 3}), Go
/// and Rust programs work unmodified. It restarts crashed workers with
/// backoff, reloads them one by one without dropping connections, and
/// answers `status`, `reload`, `scale` and `stop` on a control socket.
#[derive(Debug, Parser)]
#[command(name = "procluster", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a primary that runs PROGRAM in N workers sharing the listeners.
    ///
    /// Each worker gets: the listening sockets from fd 3 in --listen order
    /// (LISTEN_FDS, LISTEN_PID = its own pid, LISTEN_FDNAMES),
    /// PROCLUSTER_WORKER_ID (unique, from 1) and PROCLUSTER_WORKER_INDEX
    /// (its slot, 0..N-1), and, by --ready, NOTIFY_SOCKET or
    /// NODE_CHANNEL_FD. Its stdout and stderr are printed by the primary line
    /// by line, prefixed with the worker id (or as JSON lines).
    ///
    /// SIGTERM or SIGINT (or `procluster stop`) stops gracefully: each worker
    /// gets --stop-signal, then SIGKILL after --kill-timeout. SIGHUP reloads.
    /// Exit status: 0 after a clean stop; 1 when a worker had to be killed or
    /// the workers crash in a loop; 2 for bad usage or configuration; 126
    /// when PROGRAM is not executable; 127 when it does not exist.
    Run(Box<RunArgs>),
    /// Show the primary's pid, listeners and workers.
    Status(StatusArgs),
    /// Replace every worker, one at a time: start the new one, wait until it
    /// is ready, then stop the old one. A worker that fails to become ready
    /// stops the rollout with the old workers still serving.
    Reload(ReloadArgs),
    /// Change the number of workers: N, +N or -N.
    Scale(ScaleArgs),
    /// Stop the primary and its workers gracefully.
    Stop(ClientArgs),
    /// Print the workers' recent output, and with -f follow it as it comes.
    Logs(crate::control::logs::LogsArgs),
    /// A live view of the cluster: workers with CPU and memory, totals, the
    /// latest output; keys to reload, scale and quit.
    Top(crate::top::TopArgs),
    /// Internal: the exec shim a worker starts as (sets LISTEN_PID to its own
    /// pid, drops privileges, then execs the program).
    #[command(name = "__exec", hide = true)]
    Exec(crate::shim::ShimArgs),
}

/// `procluster run`. Every option can also be set in the --config file under
/// the same name (with `-` or `_`); flags win over the file.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Number of workers, or `auto` for one per CPU available to this process
    /// (affinity and cgroup quota aware). [default: auto]
    #[arg(short, long, value_name = "N|auto", value_parser = parse_workers)]
    pub workers: Option<WorkersArg>,

    /// A socket to share, repeatable: [NAME=]tcp://HOST:PORT, [NAME=]HOST:PORT,
    /// [NAME=]udp://HOST:PORT or [NAME=]unix:PATH. Port 0 picks one free port
    /// shared by every worker. Workers find them from fd 3 in this order.
    #[arg(short, long = "listen", value_name = "SPEC", value_parser = crate::listen_spec::ListenSpec::parse)]
    pub listen: Vec<crate::listen_spec::ListenSpec>,

    /// `shared`: one socket, every worker accepts on it. `reuseport`: one
    /// SO_REUSEPORT socket per worker slot (TCP and UDP), kept across that
    /// slot's restarts; the kernel spreads new connections over the slots
    /// whose worker is ready and accepting. (`round-robin` needs a worker
    /// that takes connections from the primary: only library workers can.)
    /// `sticky:ip`: reuseport, and the kernel sends each client address to
    /// one slot, the same across restarts of its worker (a slot without a
    /// worker keeps its clients 2 s, then they go elsewhere until it is
    /// back); `sticky:ip/24/64` counts an address's first 24 (IPv4) or 64
    /// (IPv6) bits. [default: shared]
    #[arg(long, value_name = "shared|reuseport|sticky:ip", value_parser = parse_policy)]
    pub policy: Option<Policy>,

    /// When a worker counts as ready (for reloads, and systemd's READY=1):
    /// `none` (at once), `notify` (it sends READY=1 to $NOTIFY_SOCKET, as
    /// sd_notify), `node-ipc` (a Node program calls process.send('ready')),
    /// `delay:DURATION` (alive that long). [default: none]
    #[arg(long, value_name = "MODE", value_parser = crate::readiness::ReadyMode::parse)]
    pub ready: Option<crate::readiness::ReadyMode>,

    /// Under `sticky:ip`: how long the clients of a slot whose worker is
    /// restarting wait for it before they go to other slots (until it is
    /// back). [default: 2s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub sticky_wait: Option<Duration>,

    /// How long a worker may take to become ready before it counts as
    /// failed. [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,

    /// How long a worker has to exit after the stop signal before it is
    /// killed with SIGKILL (gunicorn's --graceful-timeout). [default: 10s]
    #[arg(long, visible_alias = "graceful-timeout", value_name = "DURATION", value_parser = parse_duration)]
    pub kill_timeout: Option<Duration>,

    /// The signal that asks a worker to stop gracefully (TERM, INT, QUIT,
    /// HUP, USR1, USR2, WINCH or a number). [default: TERM]
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    pub stop_signal: Option<SignalArg>,

    /// Hang detection (with --ready notify): a ready worker that sends no
    /// WATCHDOG=1 for this long gets SIGABRT, then SIGKILL, and is replaced.
    /// Workers get WATCHDOG_USEC and WATCHDOG_PID as under systemd.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub watchdog: Option<Duration>,

    /// Crash-loop breaker: more than this many worker failures within
    /// --crash-window stop the whole cluster with a non-zero exit.
    /// [default: 10]
    #[arg(long, value_name = "N")]
    pub max_crashes: Option<usize>,

    /// The crash-loop breaker's window. [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub crash_window: Option<Duration>,

    /// Recycle a worker after it has served N requests (new worker first).
    /// A program reports its count: `X_PROCLUSTER_REQUESTS=TOTAL` on
    /// NOTIFY_SOCKET (--ready notify), or process.send({procluster:
    /// {requests: TOTAL}}) (--ready node-ipc).
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,

    /// Adds 0..=N to each worker's --max-requests, drawn when it starts, so
    /// that workers are not all recycled at once. [default: 0]
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<u64>,

    /// Recycle a worker whose memory exceeds SIZE (512M, 1G, or bytes): the
    /// resident memory of its process and every process it started, added
    /// up, sampled once a second (PM2's max_memory_restart).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,

    /// Recycle a worker this long after it started (new worker first).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_age: Option<Duration>,

    /// An environment variable for every worker, repeatable. Wins over
    /// --env-file.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,

    /// A file of KEY=VALUE lines for every worker's environment (blank
    /// lines and # comments ignored, `export ` and quotes allowed),
    /// repeatable.
    #[arg(long, value_name = "PATH")]
    pub env_file: Vec<PathBuf>,

    /// The workers' working directory (a relative program path is found
    /// there too). [default: the primary's]
    #[arg(long, value_name = "DIR")]
    pub chdir: Option<PathBuf>,

    /// The listen() backlog of the TCP and Unix sockets the primary binds.
    /// [default: 1024]
    #[arg(long, value_name = "N")]
    pub backlog: Option<u32>,

    /// Write the primary's pid to this file (removed when it exits).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,

    /// Control socket path. [default: $XDG_RUNTIME_DIR/procluster/NAME.sock,
    /// or /tmp/procluster-UID/NAME.sock]
    #[arg(long, value_name = "PATH", env = "PROCLUSTER_CONTROL")]
    pub control: Option<PathBuf>,

    /// The cluster's name: picks the default control socket, so several
    /// clusters can run side by side. [default: default]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// A TOML file with the same keys as these flags (workers, listen,
    /// policy, ready, ready-timeout, kill-timeout or graceful-timeout,
    /// stop-signal, watchdog, max-crashes, crash-window, max-requests,
    /// max-requests-jitter, max-memory, max-age, env (a table), env-file,
    /// chdir, backlog, pidfile, control, name, user, group, log-format), and
    /// `command = ["PROGRAM", "ARG"...]`. An unknown key is an error.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Run workers as this user (name or uid), after the primary has bound
    /// the sockets. Needs root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Run workers with this group (name or gid). [default: the user's]
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// How the primary prints workers' output and its own log: `text`
    /// (`[worker ID] line`) or `json` (one object a line:
    /// {ts, worker, index, pid, stream, line}). [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Serve Prometheus metrics (`/metrics`) and health probes (`/healthz`,
    /// `/readyz`) on this address, e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// The program to run in each worker, and its arguments.
    #[arg(last = true, value_name = "PROGRAM [ARGS]...")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Control socket of the primary. [default: as `run` picks it for --name]
    #[arg(long, value_name = "PATH", env = "PROCLUSTER_CONTROL")]
    pub control: Option<PathBuf>,

    /// The cluster's name, when it was started with --name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Wait until the rollout has finished; exit 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The new number of workers (N), or a change (+N, -N).
    #[arg(value_name = "N|+N|-N", value_parser = parse_scale, allow_hyphen_values = true)]
    pub to: Scale,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkersArg {
    Auto,
    Count(usize),
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A signal with the name the user gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalArg(pub Signal);

/// `procluster scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    To(usize),
    Add(usize),
    Remove(usize),
}

impl Scale {
    /// The new count, from the current one (never below 0).
    pub fn apply(self, current: usize) -> usize {
        match self {
            Self::To(n) => n,
            Self::Add(n) => current.saturating_add(n),
            Self::Remove(n) => current.saturating_sub(n),
        }
    }
}

pub fn parse_workers(text: &str) -> Result<WorkersArg, String> {
    if text.eq_ignore_ascii_case("auto") {
        return Ok(WorkersArg::Auto);
    }
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (or `auto`)".into()),
        Ok(n) => Ok(WorkersArg::Count(n)),
        Err(_) => Err(format!(
            "expected a number of workers or `auto`, not {text:?}"
        )),
    }
}

pub fn parse_scale(text: &str) -> Result<Scale, String> {
    let bad = || format!("expected N, +N or -N (a number of workers), not {text:?}");
    let number = |digits: &str| {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        digits.parse::<usize>().map_err(|_| bad())
    };
    if let Some(rest) = text.strip_prefix('+') {
        Ok(Scale::Add(number(rest)?))
    } else if let Some(rest) = text.strip_prefix('-') {
        Ok(Scale::Remove(number(rest)?))
    } else {
        Ok(Scale::To(number(text)?))
    }
}

/// Durations such as `500ms`, `2s`, `1.5s`, `2m`, `1h`, `1m30s`; a bare
/// number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {text:?}: {why} (examples: 500ms, 2s, 1m30s)");
    let text_trimmed = text.trim();
    if text_trimmed.is_empty() {
        return Err(bad("empty"));
    }
    if let Ok(secs) = text_trimmed.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| bad("out of range"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text_trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("a unit is missing"))?;
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let value: f64 = rest[..digits].parse().map_err(|_| bad("bad number"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hr" | "hours" => 3600.0,
            "us" | "µs" => 0.000_001,
            unit => return Err(bad(&format!("unknown unit {unit:?}"))),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * scale).map_err(|_| bad("out of range"))?;
    }
    Ok(total)
}

/// `shared`, `reuseport` or `sticky:ip[/V4[/V6]]`. Round-robin and the
/// sticky keys read from requests are refused with the reason: the primary
/// would accept each connection and hand it over the worker's channel, and
/// a program run by the command has no channel; it accepts on its own
/// socket. Sticky by address needs none: the kernel routes each client.
pub fn parse_policy(text: &str) -> Result<Policy, String> {
    match text.trim().parse::<Policy>() {
        Ok(Policy::RoundRobin) => Err(
            "round-robin is not available to programs run by the command: the primary would \
             accept each connection and hand it over a procluster worker's channel, which a \
             program of its own does not have; use `shared` or `reuseport`"
                .into(),
        ),
        Ok(Policy::Sticky(key)) if !key.is_address() => Err(format!(
            "sticky:{key} is not available to programs run by the command: the primary would \
             read each connection's first request for the key and hand the connection over a \
             procluster worker's channel, which a program of its own does not have (it accepts \
             on its own socket); use sticky:ip (the kernel routes each client by its address), \
             or the library's Policy::Sticky in a Rust primary"
        )),
        Ok(policy) => Ok(policy),
        Err(error) => Err(format!(
            "{error} (the command takes shared, reuseport or sticky:ip[/V4[/V6]])"
        )),
    }
}

/// `512M`, `1G`, `1.5GiB`, `300kB`, or a number of bytes. K, M, G and T are
/// powers of 1024 (with or without `B` or `iB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("invalid size {text:?}: {why} (examples: 512M, 1G, 300000000)");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad("expected a number"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let scale: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = value * scale as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(bad("out of range"));
    }
    Ok(bytes as u64)
}

/// `KEY=VALUE` (the value may be empty, or contain `=`).
pub fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if valid_env_key(key) => Ok((key.to_string(), value.to_string())),
        _ => Err(format!(
            "expected KEY=VALUE with a KEY of letters, digits and '_', not {text:?}"
        )),
    }
}

fn valid_env_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The lines of an env file: `KEY=VALUE`, `export KEY=VALUE`, values
/// optionally in single or double quotes; blank lines and `#` comments are
/// skipped. A line that is none of these is an error naming its number.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut vars = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let (key, value) = parse_env(line).map_err(|e| format!("line {}: {e}", number + 1))?;
        let value = value.trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|&q| value.strip_prefix(q).and_then(|v| v.strip_suffix(q)))
            .unwrap_or(value);
        vars.push((key, unquoted.to_string()));
    }
    Ok(vars)
}

/// `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(text: &str) -> Result<SignalArg, String> {
    text.trim()
        .parse::<Signal>()
        .map(SignalArg)
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_combinations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(parse_duration("").is_err());
        assert!(
            parse_duration("s")
                .unwrap_err()
                .contains("expected a number")
        );
        assert!(
            parse_duration("5 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn scale_takes_absolute_and_relative_counts() {
        assert_eq!(parse_scale("4"), Ok(Scale::To(4)));
        assert_eq!(parse_scale("+2"), Ok(Scale::Add(2)));
        assert_eq!(parse_scale("-1"), Ok(Scale::Remove(1)));
        assert!(parse_scale("x").is_err());
        assert!(parse_scale("+").is_err());
        assert!(parse_scale("--1").is_err());
        assert_eq!(Scale::Remove(5).apply(3), 0);
        assert_eq!(Scale::Add(2).apply(3), 5);
    }

    #[test]
    fn workers_are_a_positive_count_or_auto() {
        assert_eq!(parse_workers("auto"), Ok(WorkersArg::Auto));
        assert_eq!(parse_workers("3"), Ok(WorkersArg::Count(3)));
        assert!(parse_workers("0").is_err());
        assert!(parse_workers("many").is_err());
    }

    #[test]
    fn policies_are_the_librarys_and_round_robin_is_refused_with_the_reason() {
        assert_eq!(parse_policy("shared"), Ok(Policy::Shared));
        assert_eq!(parse_policy("reuseport"), Ok(Policy::ReusePort));
        let error = parse_policy("round-robin").unwrap_err();
        assert!(
            error.contains("shared") && error.contains("channel"),
            "{error}"
        );
        assert!(
            parse_policy("fastest")
                .unwrap_err()
                .contains("shared, reuseport or sticky:ip")
        );
    }

    #[test]
    fn sticky_by_address_is_taken_and_keys_read_from_requests_are_refused_with_the_reason() {
        use procluster::sticky::StickyKey;
        assert_eq!(
            parse_policy("sticky:ip"),
            Ok(Policy::Sticky(StickyKey::ADDRESS))
        );
        assert_eq!(
            parse_policy("sticky:ip/24/64"),
            Ok(Policy::Sticky(StickyKey::Address {
                v4_prefix: 24,
                v6_prefix: 64
            }))
        );
        for refused in [
            "sticky:cookie=sid",
            "sticky:header=x-user",
            "sticky:query=sid",
        ] {
            let error = parse_policy(refused).unwrap_err();
            assert!(
                error.contains("channel") && error.contains("sticky:ip"),
                "{error}"
            );
        }
        assert!(
            parse_policy("sticky:ip/40")
                .unwrap_err()
                .contains("0 to 32")
        );
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("300kb"), Ok(300 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn env_values_and_files() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(parse_env("NOEQUALS").is_err());
        assert!(parse_env("1X=y").is_err());
        let vars =
            parse_env_file("# comment\n\nexport A=1\nB=\"two words\"\nC='x'\n  D = spaced\n");
        assert!(vars.is_err(), "a key with a space is refused: {vars:?}");
        let vars = parse_env_file("# comment\n\nexport A=1\nB=\"two words\"\nC='x'\n").unwrap();
        assert_eq!(
            vars,
            [
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "x".into())
            ]
        );
        assert!(
            parse_env_file("ok=1\nbroken line\n")
                .unwrap_err()
                .contains("line 2")
        );
    }

    #[test]
    fn graceful_timeout_is_kill_timeout() {
        let cli = Cli::try_parse_from(["procluster", "run", "--graceful-timeout", "7s", "--", "x"])
            .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.kill_timeout, Some(Duration::from_secs(7)));
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM"), Ok(SignalArg(Signal::TERM)));
        assert_eq!(parse_signal("sigquit"), Ok(SignalArg(Signal::QUIT)));
        assert_eq!(parse_signal("2"), Ok(SignalArg(Signal::INT)));
        assert!(parse_signal("SIGNOPE").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        let cli = Cli::try_parse_from([
            "procluster",
            "run",
            "-w",
            "2",
            "-l",
            "web=127.0.0.1:0",
            "-l",
            "unix:/tmp/x.sock",
            "--ready",
            "delay:1s",
            "--",
            "python3",
            "-m",
            "http.server",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.workers, Some(WorkersArg::Count(2)));
        assert_eq!(run.listen.len(), 2);
        assert_eq!(run.command, ["python3", "-m", "http.server"]);
        let cli = Cli::try_parse_from(["procluster", "scale", "-1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Scale(ScaleArgs {
                to: Scale::Remove(1),
                ..
            })
        ));
    }
}
