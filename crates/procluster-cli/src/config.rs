//! The `--config` file (TOML, the same keys as the flags) merged with the
//! flags into the settings `run` uses. Flags win over the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use procluster::Policy;

use crate::args::{LogFormat, RunArgs, SignalArg, WorkersArg};
use crate::listen_spec::ListenSpec;
use crate::readiness::ReadyMode;

/// Everything `run` needs, resolved.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub workers: WorkersArg,
    pub listen: Vec<ListenSpec>,
    pub policy: Policy,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub sticky_wait: Duration,
    pub kill_timeout: Duration,
    pub stop_signal: SignalArg,
    pub watchdog: Option<Duration>,
    pub max_crashes: usize,
    pub crash_window: Duration,
    pub control: Option<PathBuf>,
    pub name: String,
    pub user: Option<String>,
    pub group: Option<String>,
    pub log_format: LogFormat,
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    pub max_memory: Option<u64>,
    pub max_age: Option<Duration>,
    /// From the env files, then `--env`/`env` (later entries win).
    pub env: Vec<(String, String)>,
    pub chdir: Option<PathBuf>,
    pub backlog: Option<u32>,
    pub pidfile: Option<PathBuf>,
    pub command: Vec<String>,
    pub metrics: Option<String>,
}

pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The file's contents. Keys are spelt as the flags (`ready-timeout`);
/// `ready_timeout` is accepted too.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    workers: Option<WorkersValue>,
    listen: Option<ListenValue>,
    policy: Option<StringValue<Policy>>,
    ready: Option<StringValue<ReadyMode>>,
    #[serde(alias = "ready_timeout")]
    ready_timeout: Option<DurationValue>,
    #[serde(alias = "sticky_wait")]
    sticky_wait: Option<DurationValue>,
    #[serde(
        alias = "kill_timeout",
        alias = "graceful-timeout",
        alias = "graceful_timeout"
    )]
    kill_timeout: Option<DurationValue>,
    #[serde(alias = "stop_signal")]
    stop_signal: Option<StringValue<SignalArg>>,
    watchdog: Option<DurationValue>,
    #[serde(alias = "max_crashes")]
    max_crashes: Option<usize>,
    #[serde(alias = "crash_window")]
    crash_window: Option<DurationValue>,
    control: Option<PathBuf>,
    name: Option<String>,
    user: Option<String>,
    group: Option<String>,
    #[serde(alias = "log_format")]
    log_format: Option<LogFormat>,
    #[serde(alias = "max_requests")]
    max_requests: Option<u64>,
    #[serde(alias = "max_requests_jitter")]
    max_requests_jitter: Option<u64>,
    #[serde(alias = "max_memory")]
    max_memory: Option<SizeValue>,
    #[serde(alias = "max_age")]
    max_age: Option<DurationValue>,
    /// `{ KEY = "value" }`, or `["KEY=value"]`.
    env: Option<EnvValue>,
    #[serde(alias = "env_file")]
    env_file: Option<PathsValue>,
    chdir: Option<PathBuf>,
    backlog: Option<u32>,
    pidfile: Option<PathBuf>,
    /// Where the metrics endpoint listens.
    metrics: Option<String>,
    /// The program and its arguments.
    command: Option<Vec<String>>,
}

/// One spec or an array of them.
#[derive(Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
struct ListenValue(Vec<ListenSpec>);

impl TryFrom<toml::Value> for ListenValue {
    type Error = String;
    fn try_from(value: toml::Value) -> Result<Self, String> {
        let one = |value: toml::Value| match value {
            toml::Value::String(text) => ListenSpec::parse(&text),
            other => Err(format!(
                "listen: expected a string such as \"127.0.0.1:8080\", not {other}"
            )),
        };
        match value {
            toml::Value::Array(items) => items
                .into_iter()
                .map(one)
                .collect::<Result<_, _>>()
                .map(Self),
            other => one(other).map(|spec| Self(vec![spec])),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
struct WorkersValue(WorkersArg);

impl TryFrom<toml::Value> for WorkersValue {
    type Error = String;
    fn try_from(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) if n > 0 => Ok(Self(WorkersArg::Count(n as usize))),
            toml::Value::String(s) => crate::args::parse_workers(&s).map(Self),
            other => Err(format!(
                "workers: expected a positive number or \"auto\", not {other}"
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
struct DurationValue(Duration);

impl TryFrom<toml::Value> for DurationValue {
    type Error = String;
    fn try_from(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) if n >= 0 => Ok(Self(Duration::from_secs(n as u64))),
            toml::Value::Float(f) if f >= 0.0 => Ok(Self(Duration::from_secs_f64(f))),
            toml::Value::String(s) => crate::args::parse_duration(&s).map(Self),
            other => Err(format!("expected a duration such as \"2s\", not {other}")),
        }
    }
}

/// Bytes, or a size such as "512M".
#[derive(Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
struct SizeValue(u64);

impl TryFrom<toml::Value> for SizeValue {
    type Error = String;
    fn try_from(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) if n > 0 => Ok(Self(n as u64)),
            toml::Value::String(s) => crate::args::parse_size(&s).map(Self),
            other => Err(format!("expected a size such as \"512M\", not {other}")),
        }
    }
}

/// A table of variables, or an array of `KEY=VALUE` strings.
#[derive(Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
struct EnvValue(Vec<(String, String)>);

impl TryFrom<toml::Value> for EnvValue {
    type Error = String;
    fn try_from(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Table(table) => table
                .into_iter()
                .map(|(key, value)| match value {
                    toml::Value::String(text) => crate::args::parse_env(&format!("{key}={text}")),
                    other => Ok((key, other.to_string())),
                })
                .collect::<Result<_, _>>()
                .map(Self),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    toml::Value::String(text) => crate::args::parse_env(&text),
                    other => Err(format!("env: expected \"KEY=VALUE\", not {other}")),
                })
                .collect::<Result<_, _>>()
                .map(Self),
            other => Err(format!(
                "env: expected a table such as {{ KEY = \"value\" }}, not {other}"
            )),
        }
    }
}

/// One path or an array of them.
#[derive(Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
struct PathsValue(Vec<PathBuf>);

impl TryFrom<toml::Value> for PathsValue {
    type Error = String;
    fn try_from(value: toml::Value) -> Result<Self, String> {
        let one = |value: toml::Value| match value {
            toml::Value::String(text) => Ok(PathBuf::from(text)),
            other => Err(format!("expected a path, not {other}")),
        };
        match value {
            toml::Value::Array(items) => items
                .into_iter()
                .map(one)
                .collect::<Result<_, _>>()
                .map(Self),
            other => one(other).map(|path| Self(vec![path])),
        }
    }
}

/// A value parsed from a string with the flag's own parser.
#[derive(Debug)]
struct StringValue<T>(T);

impl<'de, T: FromFlag> Deserialize<'de> for StringValue<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        T::from_flag(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

trait FromFlag: Sized {
    fn from_flag(text: &str) -> Result<Self, String>;
}

impl FromFlag for ReadyMode {
    fn from_flag(text: &str) -> Result<Self, String> {
        ReadyMode::parse(text)
    }
}

impl FromFlag for Policy {
    fn from_flag(text: &str) -> Result<Self, String> {
        crate::args::parse_policy(text)
    }
}

impl FromFlag for SignalArg {
    fn from_flag(text: &str) -> Result<Self, String> {
        crate::args::parse_signal(text)
    }
}

/// A configuration problem, for exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "no program to run: give one after `--` (procluster run -- PROGRAM [ARGS...]) or as `command` in the config file"
    )]
    NoProgram,
    #[error("env file {path}: {message}")]
    EnvFile { path: PathBuf, message: String },
    #[error(
        "two listeners are named {0:?}: LISTEN_FDNAMES must tell them apart; give each its own NAME= (unnamed ones are listen0, listen1... by position)"
    )]
    DuplicateListener(String),
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }
}

impl RunConfig {
    /// Flags over the file over defaults.
    pub fn resolve(args: RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        Self::merge(args, file)
    }

    fn merge(args: RunArgs, file: ConfigFile) -> Result<Self, ConfigError> {
        let listen = if !args.listen.is_empty() {
            args.listen
        } else {
            file.listen.map(|l| l.0).unwrap_or_default()
        };
        let command = if !args.command.is_empty() {
            args.command
        } else {
            file.command.unwrap_or_default()
        };
        if command.is_empty() || command[0].is_empty() {
            return Err(ConfigError::NoProgram);
        }
        check_listener_names(&listen)?;
        let env_files = if !args.env_file.is_empty() {
            args.env_file
        } else {
            file.env_file.map(|f| f.0).unwrap_or_default()
        };
        let mut env = Vec::new();
        for path in env_files {
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::EnvFile {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let vars = crate::args::parse_env_file(&text)
                .map_err(|message| ConfigError::EnvFile { path, message })?;
            env.extend(vars);
        }
        // The file's `env`, then the flags': the last of a key wins.
        env.extend(file.env.map(|e| e.0).unwrap_or_default());
        env.extend(args.env);
        Ok(Self {
            workers: args
                .workers
                .or(file.workers.map(|w| w.0))
                .unwrap_or(WorkersArg::Auto),
            listen,
            policy: args
                .policy
                .or(file.policy.map(|p| p.0))
                .unwrap_or(Policy::Shared),
            ready: args
                .ready
                .or(file.ready.map(|r| r.0))
                .unwrap_or(ReadyMode::None),
            ready_timeout: args
                .ready_timeout
                .or(file.ready_timeout.map(|d| d.0))
                .unwrap_or(DEFAULT_READY_TIMEOUT),
            sticky_wait: args
                .sticky_wait
                .or(file.sticky_wait.map(|d| d.0))
                .unwrap_or(procluster::sticky::DEFAULT_WAIT),
            kill_timeout: args
                .kill_timeout
                .or(file.kill_timeout.map(|d| d.0))
                .unwrap_or(DEFAULT_KILL_TIMEOUT),
            stop_signal: args
                .stop_signal
                .or(file.stop_signal.map(|s| s.0))
                .unwrap_or(SignalArg(procluster::Signal::TERM)),
            watchdog: args.watchdog.or(file.watchdog.map(|d| d.0)),
            max_crashes: args.max_crashes.or(file.max_crashes).unwrap_or(10),
            crash_window: args
                .crash_window
                .or(file.crash_window.map(|d| d.0))
                .unwrap_or(Duration::from_secs(60)),
            control: args.control.or(file.control),
            name: args
                .name
                .or(file.name)
                .unwrap_or_else(|| "default".to_string()),
            user: args.user.or(file.user),
            group: args.group.or(file.group),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            max_requests: args.max_requests.or(file.max_requests),
            max_requests_jitter: args
                .max_requests_jitter
                .or(file.max_requests_jitter)
                .unwrap_or(0),
            max_memory: args.max_memory.or(file.max_memory.map(|m| m.0)),
            max_age: args.max_age.or(file.max_age.map(|d| d.0)),
            env,
            chdir: args.chdir.or(file.chdir),
            backlog: args.backlog.or(file.backlog),
            pidfile: args.pidfile.or(file.pidfile),
            command,
            metrics: args.metrics.or(file.metrics),
        })
    }
}

/// Listener names (given, or `listen<N>` by position) must be unique: a
/// program finds its sockets by them.
fn check_listener_names(listen: &[ListenSpec]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for (i, spec) in listen.iter().enumerate() {
        let name = spec.name.clone().unwrap_or_else(|| format!("listen{i}"));
        if !seen.insert(name.clone()) {
            return Err(ConfigError::DuplicateListener(name));
        }
    }
    Ok(())
}

/// Workers for `auto`: the CPUs this process may run on, capped by a cgroup
/// v2 CPU quota (`/sys/fs/cgroup/cpu.max`), at least 1.
pub fn auto_workers() -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu.max")
        .ok()
        .and_then(|text| cpu_max_limit(&text));
    quota.map_or(available, |q| q.min(available)).max(1)
}

/// `"200000 100000"` → 2 CPUs (rounded up); `"max 100000"` → no limit.
pub fn cpu_max_limit(text: &str) -> Option<usize> {
    let mut fields = text.split_whitespace();
    let quota: u64 = fields.next()?.parse().ok()?;
    let period: u64 = fields.next().unwrap_or("100000").parse().ok()?;
    if period == 0 {
        return None;
    }
    Some(quota.div_ceil(period).max(1) as usize)
}

impl WorkersArg {
    pub fn resolve(self) -> usize {
        match self {
            Self::Auto => auto_workers(),
            Self::Count(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(flags: &[&str]) -> RunArgs {
        let mut argv = vec!["procluster", "run"];
        argv.extend_from_slice(flags);
        match crate::args::Cli::try_parse_from(argv).unwrap().command {
            crate::args::Command::Run(run) => *run,
            _ => unreachable!(),
        }
    }

    #[test]
    fn an_unknown_key_is_named() {
        let error = ConfigFile::parse("workers = 2\nwrokers_typo = 3\n").unwrap_err();
        assert!(error.contains("wrokers_typo"), "{error}");
    }

    #[test]
    fn the_file_takes_the_flags_keys() {
        let file = ConfigFile::parse(
            r#"
            workers = 3
            listen = ["web=127.0.0.1:0", "unix:/tmp/x.sock"]
            policy = "reuseport"
            ready = "delay:2s"
            ready-timeout = "5s"
            sticky-wait = "500ms"
            kill_timeout = 2
            stop-signal = "QUIT"
            log-format = "json"
            command = ["python3", "app.py"]
            "#,
        )
        .unwrap();
        let config = RunConfig::merge(run_args(&[]), file).unwrap();
        assert_eq!(config.workers, WorkersArg::Count(3));
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.policy, Policy::ReusePort);
        assert_eq!(config.ready, ReadyMode::Delay(Duration::from_secs(2)));
        assert_eq!(config.ready_timeout, Duration::from_secs(5));
        assert_eq!(config.sticky_wait, Duration::from_millis(500));
        assert_eq!(config.kill_timeout, Duration::from_secs(2));
        assert_eq!(config.stop_signal.0, procluster::Signal::QUIT);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.command, ["python3", "app.py"]);
    }

    #[test]
    fn the_file_takes_the_recycling_and_process_keys() {
        let dir = std::env::temp_dir().join(format!("procluster-envfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env_file = dir.join("app.env");
        std::fs::write(&env_file, "FROM_FILE=1\nSHARED=file\n").unwrap();
        let file = ConfigFile::parse(&format!(
            r#"
            max-requests = 1000
            max_requests_jitter = 50
            max-memory = "512M"
            max-age = "1h"
            graceful-timeout = "7s"
            env = {{ SHARED = "table", OTHER = "x" }}
            env-file = "{}"
            chdir = "/srv/app"
            backlog = 2048
            pidfile = "/run/app.pid"
            command = ["app"]
            "#,
            env_file.display()
        ))
        .unwrap();
        let config = RunConfig::merge(run_args(&["-e", "SHARED=flag"]), file).unwrap();
        assert_eq!(config.max_requests, Some(1000));
        assert_eq!(config.max_requests_jitter, 50);
        assert_eq!(config.max_memory, Some(512 << 20));
        assert_eq!(config.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(config.kill_timeout, Duration::from_secs(7));
        assert_eq!(config.chdir.as_deref(), Some(Path::new("/srv/app")));
        assert_eq!(config.backlog, Some(2048));
        assert_eq!(config.pidfile.as_deref(), Some(Path::new("/run/app.pid")));
        let last = |key: &str| {
            config
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(last("FROM_FILE").as_deref(), Some("1"));
        assert_eq!(last("OTHER").as_deref(), Some("x"));
        assert_eq!(last("SHARED").as_deref(), Some("flag"), "flags win");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_env_file_is_named() {
        let args = run_args(&["--env-file", "/nonexistent/app.env", "--", "x"]);
        let error = RunConfig::merge(args, ConfigFile::default()).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/app.env"),
            "{error}"
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let file =
            ConfigFile::parse("workers = 3\nlisten = \"127.0.0.1:1\"\ncommand = [\"a\"]").unwrap();
        let config = RunConfig::merge(
            run_args(&["-w", "5", "-l", "127.0.0.1:2", "--", "b", "c"]),
            file,
        )
        .unwrap();
        assert_eq!(config.workers, WorkersArg::Count(5));
        assert_eq!(config.listen[0].to_string(), "tcp://127.0.0.1:2");
        assert_eq!(config.command, ["b", "c"]);
    }

    #[test]
    fn bad_values_in_the_file_say_what_is_wrong() {
        let error = ConfigFile::parse("ready-timeout = \"soon\"").unwrap_err();
        assert!(error.contains("invalid duration"), "{error}");
        let error = ConfigFile::parse("listen = [\"nowhere\"]").unwrap_err();
        assert!(error.contains("listen"), "{error}");
    }

    #[test]
    fn round_robin_in_the_file_is_refused_with_the_reason() {
        let error = ConfigFile::parse("policy = \"round-robin\"").unwrap_err();
        assert!(error.contains("round-robin is not available"), "{error}");
    }

    #[test]
    fn duplicate_listener_names_are_refused() {
        let args = run_args(&["-l", "web=127.0.0.1:1", "-l", "web=127.0.0.1:2", "--", "x"]);
        let error = RunConfig::merge(args, ConfigFile::default()).unwrap_err();
        assert!(
            matches!(&error, ConfigError::DuplicateListener(n) if n == "web"),
            "{error}"
        );
        // An explicit name may not take an unnamed listener's positional one.
        let args = run_args(&["-l", "127.0.0.1:1", "-l", "listen0=127.0.0.1:2", "--", "x"]);
        assert!(RunConfig::merge(args, ConfigFile::default()).is_err());
        let args = run_args(&["-l", "127.0.0.1:1", "-l", "127.0.0.1:2", "--", "x"]);
        assert!(RunConfig::merge(args, ConfigFile::default()).is_ok());
    }

    #[test]
    fn no_program_is_an_error() {
        let error = RunConfig::merge(run_args(&[]), ConfigFile::default()).unwrap_err();
        assert!(matches!(error, ConfigError::NoProgram));
    }

    #[test]
    fn cgroup_quota_caps_workers() {
        assert_eq!(cpu_max_limit("200000 100000\n"), Some(2));
        assert_eq!(cpu_max_limit("150000 100000"), Some(2));
        assert_eq!(cpu_max_limit("50000 100000"), Some(1));
        assert_eq!(cpu_max_limit("max 100000"), None);
        assert!(auto_workers() >= 1);
    }
}
