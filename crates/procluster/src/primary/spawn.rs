//! Starting worker processes from one long-lived thread.
//!
//! The parent-death signal of a child fires when the *thread* that forked it
//! exits, not the process. Tokio's blocking threads come and go, so every
//! worker is forked from a dedicated thread that lives as long as the primary.

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
/// current runtime so it is reaped there.
pub(crate) async fn spawn(mut command: Command) -> std::io::Result<Child> {
    let runtime = Handle::current();
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _entered = runtime.enter();
        let _ = tx.send(command.spawn());
    });
    spawner()
        .send(job)
        .map_err(|_| std::io::Error::other("the procluster spawner thread has stopped"))?;
    rx.await
        .map_err(|_| std::io::Error::other("the procluster spawner thread dropped a request"))?
}
