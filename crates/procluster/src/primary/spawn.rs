//! Starting worker processes from one long-lived thread.
//!
//! The parent-death signal of a child fires when the *thread* that forked it
//! exits, not the process. Tokio's blocking threads come and go, so every
//! worker is forked from a dedicated thread that lives as long as the primary.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::mpsc;

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
