//! Services of the cluster: frames of their own kind between a service in
//! the primary and its side in each worker.

use std::sync::{Arc, Mutex, OnceLock};

use procluster::message::ServiceFrame;
use procluster::primary::{Event, Service, ServiceContext, WorkerHandle};
use procluster::{ExitStatus, Signal, WorkerId};
use procluster_tests::*;

use crate::builder;

/// Workers that left, and how (`None` for a disconnect).
type Departures = Arc<Mutex<Vec<(WorkerId, Option<ExitStatus>)>>>;

/// Echoes every frame back to the worker it came from, descriptors
/// included, and remembers which workers left and how.
#[derive(Clone, Default)]
struct Echo {
    context: Arc<OnceLock<ServiceContext>>,
    gone: Departures,
}

impl Service for Echo {
    fn name(&self) -> String {
        "echo".into()
    }

    fn attach(&self, context: ServiceContext) {
        let _ = self.context.set(context);
    }

    fn on_frame(&self, from: &WorkerHandle, frame: ServiceFrame) {
        let context = self.context.get().expect("attached before any frame");
        let mut body = b"echo: ".to_vec();
        body.extend_from_slice(&frame.body);
        context
            .try_send(from, frame.format, &body, frame.fds)
            .expect("echo");
    }

    fn on_worker_gone(&self, worker: &WorkerHandle, exit: Option<ExitStatus>) {
        self.gone.lock().unwrap().push((worker.id(), exit));
    }
}

async fn echo_through(
    cluster: &mut procluster::primary::Cluster,
    worker: &WorkerHandle,
    service: &str,
    with_fd: bool,
) -> Result<(String, usize), String> {
    worker
        .send(&Command::ServiceEcho {
            service: service.into(),
            text: "ping".into(),
            with_fd,
        })
        .await
        .unwrap();
    let (_, answer) = reply(cluster).await;
    let Reply::ServiceEcho(result) = answer else {
        panic!("unexpected {answer:?}")
    };
    result
}

#[tokio::test]
async fn a_worker_reaches_a_service_of_the_primary_and_gets_its_answer_with_descriptors() {
    let echo = Echo::default();
    let mut cluster = builder("serve").service(echo.clone()).build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    assert_eq!(
        echo_through(&mut cluster, &worker, "echo", false).await,
        Ok(("echo: ping".into(), 0))
    );
    assert_eq!(
        echo_through(&mut cluster, &worker, "echo", true).await,
        Ok(("echo: ping".into(), 1)),
        "the descriptor went there and back"
    );
}

#[tokio::test]
async fn a_service_the_primary_does_not_have_is_a_clear_error_naming_those_it_has() {
    let mut cluster = builder("serve").service(Echo::default()).build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    let error = echo_through(&mut cluster, &worker, "pool", false)
        .await
        .unwrap_err();
    assert!(
        error.contains("\"pool\"") && error.contains("echo"),
        "{error}"
    );
}

#[tokio::test]
async fn two_services_of_one_name_are_a_settings_error() {
    let error = builder("serve")
        .service(Echo::default())
        .service(Echo::default())
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("\"echo\""), "{error}");
}

#[tokio::test]
async fn a_service_learns_when_a_worker_disconnects_and_how_it_exited() {
    let echo = Echo::default();
    let mut cluster = builder("serve").service(echo.clone()).build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    worker.signal(Signal::KILL).unwrap();
    until(&mut cluster, |e| {
        matches!(e, Event::Exit { .. }).then_some(())
    })
    .await;
    let gone = echo.gone.lock().unwrap().clone();
    assert_eq!(
        gone,
        [
            (worker.id(), None),
            (worker.id(), Some(ExitStatus::signaled(Signal::KILL)))
        ]
    );
}
