//! The words the whole crate uses for processes: a worker's id, a signal,
//! how a process ended. The primary, the supervisor and the command all use
//! these same types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A worker's id: unique within one primary's life, starting at 1, never
/// reused (Node's `worker.id`).
///
/// ```
/// use procluster::WorkerId;
/// let id = WorkerId::new(7);
/// assert_eq!(id.get(), 7);
/// assert_eq!(id.to_string(), "7");
/// assert_eq!("7".parse::<WorkerId>().unwrap(), id);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(u32);

impl WorkerId {
    /// The id with number `n`.
    pub const fn new(n: u32) -> Self {
        Self(n)
    }

    /// The id's number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// Ids compare with plain numbers: `worker.id() == 1`.
impl PartialEq<u32> for WorkerId {
    fn eq(&self, other: &u32) -> bool {
        self.0 == *other
    }
}

impl From<u32> for WorkerId {
    fn from(n: u32) -> Self {
        Self(n)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for WorkerId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// A Unix signal, by number. The usual ones have names
/// ([`Signal::TERM`], [`Signal::KILL`]...); any other number the OS knows
/// can be made with [`Signal::from_number`].
///
/// Parses from `TERM`, `SIGTERM`, `term` or `15`, and prints as `SIGTERM`.
///
/// ```
/// use procluster::Signal;
/// assert_eq!("SIGTERM".parse::<Signal>().unwrap(), Signal::TERM);
/// assert_eq!("hup".parse::<Signal>().unwrap(), Signal::HUP);
/// assert_eq!("9".parse::<Signal>().unwrap(), Signal::KILL);
/// assert_eq!(Signal::USR1.to_string(), "SIGUSR1");
/// assert!("SIGNOPE".parse::<Signal>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Signal(i32);

macro_rules! signals {
    ($($name:ident = $libc:ident),* $(,)?) => {
        impl Signal {
            $(
                #[doc = concat!("`SIG", stringify!($name), "`.")]
                pub const $name: Signal = Signal(libc::$libc);
            )*

            /// The names this crate knows, without the `SIG` prefix.
            const NAMED: &[(&'static str, Signal)] = &[$((stringify!($name), Signal::$name)),*];
        }
    };
}

signals! {
    HUP = SIGHUP,
    INT = SIGINT,
    QUIT = SIGQUIT,
    ABRT = SIGABRT,
    KILL = SIGKILL,
    USR1 = SIGUSR1,
    SEGV = SIGSEGV,
    USR2 = SIGUSR2,
    PIPE = SIGPIPE,
    ALRM = SIGALRM,
    TERM = SIGTERM,
    CHLD = SIGCHLD,
    CONT = SIGCONT,
    STOP = SIGSTOP,
    TSTP = SIGTSTP,
    TTIN = SIGTTIN,
    TTOU = SIGTTOU,
    WINCH = SIGWINCH,
}

impl Signal {
    /// The signal with number `n`, if the OS has such a signal (the
    /// real-time signals excepted: the C library reserves some of them).
    pub fn from_number(n: i32) -> Option<Self> {
        rustix::process::Signal::from_named_raw(n).map(|_| Self(n))
    }

    /// The same signal in `rustix`'s terms, for the system calls.
    pub(crate) fn to_os(self) -> rustix::process::Signal {
        // Every value was checked by `from_number` or is a named constant,
        // all of which rustix names too.
        rustix::process::Signal::from_named_raw(self.0).unwrap_or(rustix::process::Signal::TERM)
    }

    /// The signal's number.
    pub const fn number(self) -> i32 {
        self.0
    }

    /// The signal's name without the `SIG` prefix, if it has one here.
    pub fn name(self) -> Option<&'static str> {
        Self::NAMED
            .iter()
            .find(|(_, signal)| *signal == self)
            .map(|(name, _)| *name)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "SIG{name}"),
            None => write!(f, "signal {}", self.0),
        }
    }
}

/// A text that names no signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a signal: use a name such as TERM, SIGHUP or a number such as 15")]
pub struct UnknownSignal(String);

impl FromStr for Signal {
    type Err = UnknownSignal;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownSignal(s.to_string());
        if let Ok(n) = s.parse::<i32>() {
            return Self::from_number(n).ok_or_else(unknown);
        }
        let upper = s.to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        Self::NAMED
            .iter()
            .find(|(name, _)| *name == bare)
            .map(|(_, signal)| *signal)
            .ok_or_else(unknown)
    }
}

/// How a process ended: an exit code, a signal, or (when its end could not
/// be observed) neither.
///
/// ```
/// use procluster::{ExitStatus, Signal};
/// assert_eq!(ExitStatus::exited(3).to_string(), "exit code 3");
/// assert_eq!(ExitStatus::signaled(Signal::KILL).to_string(), "signal SIGKILL");
/// assert!(ExitStatus::exited(0).success());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExitStatus {
    code: Option<i32>,
    signal: Option<Signal>,
}

impl ExitStatus {
    /// A process that exited by itself with `code`.
    pub const fn exited(code: i32) -> Self {
        Self {
            code: Some(code),
            signal: None,
        }
    }

    /// A process ended by `signal`.
    pub const fn signaled(signal: Signal) -> Self {
        Self {
            code: None,
            signal: Some(signal),
        }
    }

    /// A process whose end could not be observed.
    pub const fn unknown() -> Self {
        Self {
            code: None,
            signal: None,
        }
    }

    pub(crate) fn from_std(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::exited(code),
            (None, Some(n)) => Signal::from_number(n).map_or(Self::unknown(), Self::signaled),
            (None, None) => Self::unknown(),
        }
    }

    /// The exit code, if it exited by itself.
    pub fn code(&self) -> Option<i32> {
        self.code
    }

    /// The signal that ended it, if one did.
    pub fn signal(&self) -> Option<Signal> {
        self.signal
    }

    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => write!(f, "signal {signal}"),
            (None, None) => write!(f, "unknown status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_signal_parses_back_from_its_name_and_number() {
        for (name, signal) in Signal::NAMED {
            assert_eq!(name.parse::<Signal>().unwrap(), *signal);
            assert_eq!(signal.to_string().parse::<Signal>().unwrap(), *signal);
            assert_eq!(
                signal.number().to_string().parse::<Signal>().unwrap(),
                *signal
            );
        }
    }

    #[test]
    fn numbers_outside_the_os_range_are_not_signals() {
        assert!(Signal::from_number(0).is_none());
        assert!(Signal::from_number(-9).is_none());
        assert!(Signal::from_number(1000).is_none());
        for (_, signal) in Signal::NAMED {
            assert_eq!(signal.to_os().as_raw(), signal.number());
        }
        assert!("0".parse::<Signal>().is_err());
    }
}
