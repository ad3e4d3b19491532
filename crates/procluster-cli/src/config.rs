//! The `--config` file (TOML, the same keys as the flags) merged with the
//! flags into the settings `run` uses. Flags win over the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::args::{LogFormat, PolicyArg, RunArgs, SignalArg, WorkersArg};
use crate::listen_spec::ListenSpec;
use crate::readiness::ReadyMode;

/// Everything `run` needs, resolved.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub workers: WorkersArg,
    pub listen: Vec<ListenSpec>,
    pub policy: PolicyArg,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
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
    policy: Option<PolicyArg>,
    ready: Option<StringValue<ReadyMode>>,
    #[serde(alias = "ready_timeout")]
    ready_timeout: Option<DurationValue>,
    #[serde(alias = "kill_timeout")]
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
        Ok(Self {
            workers: args
                .workers
                .or(file.workers.map(|w| w.0))
                .unwrap_or(WorkersArg::Auto),
            listen,
            policy: args.policy.or(file.policy).unwrap_or_default(),
            ready: args
                .ready
                .or(file.ready.map(|r| r.0))
                .unwrap_or(ReadyMode::None),
            ready_timeout: args
                .ready_timeout
                .or(file.ready_timeout.map(|d| d.0))
                .unwrap_or(DEFAULT_READY_TIMEOUT),
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
            command,
            metrics: args.metrics.or(file.metrics),
        })
    }
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
        assert_eq!(config.policy, PolicyArg::Reuseport);
        assert_eq!(config.ready, ReadyMode::Delay(Duration::from_secs(2)));
        assert_eq!(config.ready_timeout, Duration::from_secs(5));
        assert_eq!(config.kill_timeout, Duration::from_secs(2));
        assert_eq!(config.stop_signal.0, procluster::Signal::QUIT);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.command, ["python3", "app.py"]);
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
