//! What a worker process starts with: environment, working directory,
//! descriptors; and settings that cannot work.

use procluster::Error;
use procluster::primary::{ForkOptions, WorkerHandle};
use procluster_tests::*;

use crate::builder;

async fn describe(cluster: &mut procluster::primary::Cluster, worker: &WorkerHandle) -> Reply {
    worker.send(&Command::Describe).await.unwrap();
    let (from, reply) = reply(cluster).await;
    assert_eq!(&from, worker);
    reply
}

#[tokio::test]
async fn a_worker_gets_cluster_and_fork_env_and_the_cwd_and_only_the_documented_marker() {
    let dir = TempDir::new("cwd");
    let mut cluster = builder("serve")
        .env("FOR_EVERY_WORKER", "cluster")
        .cwd(&dir.0)
        // A setting that travels through the environment too.
        .busy_poll(std::time::Duration::from_micros(20))
        .build()
        .unwrap();
    let plain = cluster.fork().await.unwrap();
    let special = cluster
        .fork_with(ForkOptions::default().env("FOR_ONE_WORKER", "fork"))
        .await
        .unwrap();
    online(&mut cluster, 2).await;

    let Reply::Described {
        env,
        cwd,
        id,
        index,
    } = describe(&mut cluster, &special).await
    else {
        panic!("not a description")
    };
    let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    assert_eq!(get("FOR_EVERY_WORKER"), Some("cluster"));
    assert_eq!(get("FOR_ONE_WORKER"), Some("fork"));
    assert!(
        get("PATH").is_some(),
        "the primary's environment is inherited"
    );
    let internal: Vec<_> = env
        .iter()
        .filter(|(k, _)| k.starts_with("PROCLUSTER_") && k != procluster::WORKER_MARKER)
        .collect();
    assert!(
        internal.is_empty(),
        "internal variables in the worker's environment: {internal:?}"
    );
    assert_eq!(
        get(procluster::WORKER_MARKER),
        Some(std::process::id().to_string().as_str()),
        "the marker names the primary"
    );
    assert_eq!(std::path::Path::new(&cwd), dir.0);
    assert_eq!(id, special.id());
    assert_eq!(index, None, "fork() fills no slot");

    let Reply::Described { env, .. } = describe(&mut cluster, &plain).await else {
        panic!("not a description")
    };
    assert!(
        env.iter()
            .any(|(k, v)| k == "FOR_EVERY_WORKER" && v == "cluster")
    );
    assert!(
        !env.iter().any(|(k, _)| k == "FOR_ONE_WORKER"),
        "fork env is for that worker only"
    );
}

#[tokio::test]
async fn workers_started_for_slots_know_their_index() {
    let mut cluster = builder("serve").workers(2).build().unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, 2).await;
    for (slot, worker) in workers.iter().enumerate() {
        let Reply::Described { id, index, .. } = describe(&mut cluster, worker).await else {
            panic!()
        };
        assert_eq!((id, index), (worker.id(), Some(slot)));
    }
}

#[tokio::test]
async fn a_child_of_a_worker_sees_only_the_marker_which_does_not_make_it_a_worker() {
    let mut cluster = builder("serve").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    worker.send(&Command::ChildEnv).await.unwrap();
    let (_, answer) = reply(&mut cluster).await;
    let Reply::ChildEnv(out) = answer else {
        panic!("unexpected {answer:?}")
    };
    let variables: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("PROCLUSTER_"))
        .collect();
    assert_eq!(
        variables,
        [format!(
            "{}={}",
            procluster::WORKER_MARKER,
            std::process::id()
        )],
        "a worker's child sees worker variables:\n{out}"
    );
    // Even with the environment and a socket at fd 3, a worker's child is
    // not a worker: its parent is not the primary.
    worker.send(&Command::ChildRole).await.unwrap();
    let (_, answer) = reply(&mut cluster).await;
    let Reply::ChildRole(role) = answer else {
        panic!("unexpected {answer:?}")
    };
    assert_eq!(role, "primary");
}

#[tokio::test]
async fn a_child_of_a_worker_does_not_inherit_the_channel() {
    let mut cluster = builder("serve").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    worker.send(&Command::ChildFds).await.unwrap();
    let (_, reply) = reply(&mut cluster).await;
    let Reply::ChildFds { channel, child } = reply else {
        panic!("unexpected {reply:?}")
    };
    assert!(
        channel.starts_with("socket:["),
        "the worker's channel at fd 3 is a socket: {channel}"
    );
    assert!(
        child.iter().any(|line| line.contains("/fd/0 ")),
        "the listing works: {child:?}"
    );
    let leaked: Vec<_> = child
        .iter()
        .filter(|line| line.ends_with(&channel) || line.contains("socket:"))
        .collect();
    assert!(
        leaked.is_empty(),
        "the child inherited sockets ({channel} is the channel): {leaked:?}"
    );
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_error_from_fork() {
    let missing = std::env::temp_dir().join("procluster-no-such-program");
    let cluster = procluster::primary::Cluster::builder()
        .exec(&missing)
        .build()
        .unwrap();
    match cluster.fork().await {
        Err(Error::Spawn { program, source }) => {
            assert_eq!(program, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
    assert!(cluster.workers().is_empty(), "no worker was added");
}

#[tokio::test]
async fn a_working_directory_that_does_not_exist_is_a_settings_error_from_build() {
    let missing = std::env::temp_dir().join("procluster-no-such-directory");
    let error = builder("serve").cwd(&missing).build().unwrap_err();
    assert!(matches!(error, Error::Settings(_)), "{error:?}");
    assert!(
        error.to_string().contains("procluster-no-such-directory"),
        "the error names the directory: {error}"
    );
}

#[tokio::test]
async fn a_message_limit_too_small_for_control_messages_is_a_settings_error_from_build() {
    let error = builder("serve").max_message_size(100).build().unwrap_err();
    assert!(matches!(error, Error::Settings(_)), "{error:?}");
    assert!(error.to_string().contains("4096"), "{error}");
    builder("serve").max_message_size(4096).build().unwrap();
}

/// The scheduling policy (`/proc/.../stat` field 41) of a thread or process.
#[cfg(target_os = "linux")]
fn scheduling_policy(stat_path: &str) -> u32 {
    let stat = std::fs::read_to_string(stat_path).unwrap();
    // Fields after the command name, which is in parentheses, start at 3.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_batch_scheduled_primary_forks_workers_under_the_normal_policy() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    // This test runs in a process of its own: switching its thread is harmless.
    let mut cluster = builder("serve").batch_scheduling(true).build().unwrap();
    assert_eq!(scheduling_policy("/proc/thread-self/stat"), SCHED_BATCH);
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    assert_eq!(
        scheduling_policy(&format!("/proc/{}/stat", worker.pid())),
        SCHED_OTHER,
        "a worker must not inherit the primary's batch policy"
    );
    worker.disconnect();
}
