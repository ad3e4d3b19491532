//! Starting worker processes from one long-lived thread.
//!
//! The parent-death signal of a child fires when the *thread* that forked it
//! exits, not the process. Tokio's blocking threads come and go, so every
//! worker is forked from a dedicated thread that lives as long as the primary.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::mpsc;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("procluster-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("cannot start the procluster spawner thread");
        tx
    })
}

/// Raises this process's soft open-file limit (`RLIMIT_NOFILE`) to its hard
/// limit, once: a primary holds a few descriptors per worker (channel,
/// output pipes, pidfd, sockets), and the usual soft limit of 1024 would
/// stop a cluster of a few hundred workers. Returns the limit the process
/// had, which workers get back ([`open_files_for_workers`]); `None` when
/// nothing was changed.
pub(crate) fn raise_open_files_limit() -> Option<Rlimit> {
    static ORIGINAL: OnceLock<Option<Rlimit>> = OnceLock::new();
    *ORIGINAL.get_or_init(|| {
        let original = getrlimit(Resource::Nofile);
        let soft = original.current?;
        // No hard limit is taken as a million (as Linux's default ceiling).
        let hard = original.maximum.unwrap_or(1 << 20);
        if soft >= hard {
            return None;
        }
        let raised = Rlimit {
            current: Some(hard),
            maximum: original.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit");
                Some(original)
            }
            Err(error) => {
                tracing::debug!(%error, "cannot raise the open-file limit");
                None
            }
        }
    })
}

/// The open-file limit workers get: the one the primary started with.
pub(crate) fn open_files_for_workers() -> Option<Rlimit> {
    raise_open_files_limit()
}

/// Spawns `command` on the spawner thread, registering the child with the
/// current runtime so it is reaped there. `highest_target` is the highest fd
/// number the child's descriptors are moved to.
pub(crate) async fn spawn(mut command: Command, highest_target: RawFd) -> std::io::Result<Child> {
    let runtime = Handle::current();
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _entered = runtime.enter();
        let _placeholders = occupy_low_fds(highest_target);
        let _ = tx.send(command.spawn());
    });
    spawner()
        .send(job)
        .map_err(|_| std::io::Error::other("the procluster spawner thread has stopped"))?;
    rx.await
        .map_err(|_| std::io::Error::other("the procluster spawner thread dropped a request"))?
}

/// Fills every free fd number from 3 to `highest` with a placeholder.
///
/// `Command::spawn` reports a failed `exec` through a close-on-exec pipe it
/// opens at the lowest free numbers; if that pipe sat on a number the child
/// moves a descriptor to, the move would close it and an `exec` failure
/// (a missing program) would go unreported, written into the moved
/// descriptor instead. With the low numbers taken, the pipe lands above.
fn occupy_low_fds(highest: RawFd) -> Vec<OwnedFd> {
    let mut placeholders = Vec::new();
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return placeholders;
    };
    while let Ok(copy) = rustix::io::fcntl_dupfd_cloexec(&null, 3) {
        if copy.as_raw_fd() > highest {
            break;
        }
        placeholders.push(copy);
    }
    placeholders
}
