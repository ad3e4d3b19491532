//! Port sharing through the primary: the three TCP policies, UDP, Unix
//! sockets, bind errors, backlog, exclusive listeners, IPv6, and connections
//! that survive workers dying or leaving.
//!
//! Workers run the test worker's `net` mode: the test asks them to listen
//! (`NetCommand`), they answer each connection with `worker <id>\n` and keep
//! it open until the client closes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use procluster::primary::{Cluster, Event, ForkOptions, WorkerHandle};
use procluster::{Policy, Signal, WorkerId};
use procluster_tests::*;

use crate::builder;

const POLICIES: [Policy; 3] = [Policy::Shared, Policy::RoundRobin, Policy::ReusePort];

/// A cluster of `n` workers in `net` mode (slots 0..n), all online.
async fn net_cluster(policy: Policy, n: usize) -> (Cluster, Vec<WorkerHandle>) {
    let mut cluster = builder("net").policy(policy).workers(n).build().unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, n).await;
    (cluster, workers)
}

/// A TCP listen request served by `capacity` accept loops.
fn tcp(addr: &str, capacity: usize) -> NetCommand {
    NetCommand::ListenTcp {
        addr: addr.to_string(),
        backlog: None,
        ipv6_only: None,
        exclusive: false,
        prefetch: None,
        capacity,
        serve: Serve::Hold,
    }
}

fn with_serve(command: NetCommand, how: Serve) -> NetCommand {
    match command {
        NetCommand::ListenTcp {
            addr,
            backlog,
            ipv6_only,
            exclusive,
            prefetch,
            capacity,
            ..
        } => NetCommand::ListenTcp {
            addr,
            backlog,
            ipv6_only,
            exclusive,
            prefetch,
            capacity,
            serve: how,
        },
        other => other,
    }
}

/// What workers answered to one request each.
#[derive(Debug, Default)]
struct Answers {
    /// Each worker's reply.
    replies: BTreeMap<WorkerId, NetReply>,
    /// The address of each `Listening` event read on the way, by worker.
    events: BTreeMap<WorkerId, Vec<String>>,
}

impl Answers {
    /// The address `id` listens on; panics if it failed.
    fn address(&self, id: WorkerId) -> SocketAddr {
        match &self.replies[&id] {
            NetReply::Listening { address, .. } => address.parse().expect("a socket address"),
            other => panic!("worker {id} did not listen: {other:?}"),
        }
    }

    /// Whether `id`'s listener is round-robin; panics if it failed.
    fn round_robin(&self, id: WorkerId) -> bool {
        match &self.replies[&id] {
            NetReply::Listening { round_robin, .. } => *round_robin,
            other => panic!("worker {id} did not listen: {other:?}"),
        }
    }

    /// The error kind and message `id` got; panics if it listened.
    fn failure(&self, id: WorkerId) -> (&str, &str) {
        match &self.replies[&id] {
            NetReply::Failed { kind, message } => (kind, message),
            other => panic!("worker {id} was expected to fail: {other:?}"),
        }
    }
}

/// Sends `command` to each worker in turn (waiting for each answer before
/// the next, so the k-th worker asks after the first) and collects the
/// answers and `Listening` events.
async fn ask_each(
    cluster: &mut Cluster,
    workers: &[&WorkerHandle],
    command: &NetCommand,
) -> Answers {
    let mut answers = Answers::default();
    for worker in workers {
        worker.send(command).await.unwrap();
        let id = worker.id();
        loop {
            match next(cluster).await {
                Event::Listening { worker, address } => {
                    answers.events.entry(worker.id()).or_default().push(address);
                }
                Event::Message { worker, message } if worker.id() == id => {
                    let reply: NetReply = message.decode().expect("a net reply");
                    if !matches!(reply, NetReply::Datagram(_)) {
                        answers.replies.insert(id, reply);
                        break;
                    }
                }
                event @ (Event::Exit { .. } | Event::Error { .. }) => {
                    panic!("unexpected {event:?}")
                }
                _ => {}
            }
        }
    }
    answers
}

/// The ids of the workers that answer `count` sequential short connections.
async fn short_connections(addr: SocketAddr, count: usize) -> Vec<WorkerId> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let (id, stream) = ask_tcp(addr).await.expect("an answer");
        drop(stream);
        ids.push(id);
    }
    ids
}

/// Checks that every worker in `expected` answers on `addr`, within bounded
/// attempts. With shared and round-robin listeners the connections stay
/// open, so a worker whose accept loops are all busy cannot take the next
/// one; with reuseport they are closed at once (a connection the kernel
/// hashes to a busy slot would wait), and the kernel's hash decides.
async fn all_serve(policy: Policy, addr: SocketAddr, expected: &BTreeSet<WorkerId>) {
    let mut seen = BTreeSet::new();
    let mut open = Vec::new();
    for _ in 0..64 {
        let (id, stream) = ask_tcp(addr)
            .await
            .unwrap_or_else(|e| panic!("{policy:?}: no answer on {addr}: {e}"));
        seen.insert(id);
        if policy != Policy::ReusePort {
            open.push(stream);
        }
        if &seen == expected {
            return;
        }
    }
    panic!("{policy:?}: only workers {seen:?} of {expected:?} answered in 64 connections");
}

fn ids(workers: &[WorkerHandle]) -> BTreeSet<WorkerId> {
    workers.iter().map(WorkerHandle::id).collect()
}

#[tokio::test]
async fn two_workers_listening_on_port_0_share_one_port_under_every_policy() {
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 2).await;
        let (a, b) = (&workers[0], &workers[1]);
        let answers = ask_each(&mut cluster, &[a, b], &tcp("127.0.0.1:0", 4)).await;
        let addr = answers.address(a.id());
        assert_ne!(addr.port(), 0);
        assert_eq!(answers.address(b.id()), addr, "{policy:?}");
        let expected_event = format!("tcp://{addr}");
        assert_eq!(
            answers.events[&a.id()],
            answers.events[&b.id()],
            "{policy:?}"
        );
        assert_eq!(answers.events[&b.id()], [expected_event], "{policy:?}");
        assert_eq!(answers.round_robin(a.id()), policy == Policy::RoundRobin);

        if policy == Policy::RoundRobin {
            // Four accept loops each: every worker has credit at its turn.
            let order = short_connections(addr, 8).await;
            assert!(
                order.windows(2).all(|w| w[0] != w[1]),
                "round-robin alternates: {order:?}"
            );
        }
        all_serve(policy, addr, &ids(&workers)).await;
    }
}

#[tokio::test]
async fn a_second_listen_on_port_0_in_one_worker_gets_another_port() {
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 2).await;
        let (a, b) = (&workers[0], &workers[1]);
        let first = ask_each(&mut cluster, &[a, b], &tcp("127.0.0.1:0", 1)).await;
        let second = ask_each(&mut cluster, &[a, b], &tcp("127.0.0.1:0", 1)).await;
        let (p1, p2) = (first.address(a.id()), second.address(a.id()));
        assert_ne!(
            p1, p2,
            "{policy:?}: the second listen(0) got the first's port"
        );
        // The k-th listen(0) of every worker is the same port.
        assert_eq!(first.address(b.id()), p1, "{policy:?}");
        assert_eq!(second.address(b.id()), p2, "{policy:?}");
        all_serve(policy, p1, &ids(&workers)).await;
        all_serve(policy, p2, &ids(&workers)).await;
    }
}

#[tokio::test]
async fn a_port_in_use_fails_in_the_worker_and_a_retry_succeeds_once_free() {
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 1).await;
        let a = &workers[0];
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = squatter.local_addr().unwrap();
        let request = tcp(&taken.to_string(), 1);

        let answers = ask_each(&mut cluster, &[a], &request).await;
        let (kind, message) = answers.failure(a.id());
        assert_eq!(kind, "AddrInUse", "{policy:?}: {message}");
        assert!(
            message.contains(&taken.to_string()),
            "{policy:?}: the error names the address: {message}"
        );
        assert!(
            answers.events.is_empty(),
            "no Listening for a failed listen"
        );

        // The primary carries on: the same worker listens elsewhere.
        let other = ask_each(&mut cluster, &[a], &tcp("127.0.0.1:0", 1)).await;
        let other = other.address(a.id());
        assert_eq!(ask_tcp(other).await.unwrap().0, a.id());

        drop(squatter);
        let retry = ask_each(&mut cluster, &[a], &request).await;
        assert_eq!(retry.address(a.id()), taken, "{policy:?}");
        assert_eq!(retry.events[&a.id()], [format!("tcp://{taken}")]);
        assert_eq!(ask_tcp(taken).await.unwrap().0, a.id(), "{policy:?}");
    }
}

/// Two clusters asked for one port, or a port another process holds with
/// `SO_REUSEPORT` itself: the newcomer gets EADDRINUSE under every policy,
/// as Node's cluster does, instead of silently taking part of the traffic.
#[tokio::test]
async fn a_port_held_by_another_cluster_or_a_reuseport_socket_is_in_use_under_every_policy() {
    for first in POLICIES {
        let (mut old, old_workers) = net_cluster(first, 1).await;
        let held = ask_each(&mut old, &[&old_workers[0]], &tcp("127.0.0.1:0", 1)).await;
        let port = held.address(old_workers[0].id());
        for second in POLICIES {
            let (mut new, new_workers) = net_cluster(second, 1).await;
            let answers = ask_each(&mut new, &[&new_workers[0]], &tcp(&port.to_string(), 1)).await;
            let (kind, message) = answers.failure(new_workers[0].id());
            assert_eq!(kind, "AddrInUse", "{first:?} then {second:?}: {message}");
        }
    }
    let squatter =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    squatter.set_reuse_port(true).unwrap();
    squatter
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    squatter.listen(16).unwrap();
    let port = squatter.local_addr().unwrap().as_socket().unwrap();
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 1).await;
        let answers = ask_each(&mut cluster, &[&workers[0]], &tcp(&port.to_string(), 1)).await;
        let (kind, message) = answers.failure(workers[0].id());
        assert_eq!(kind, "AddrInUse", "{policy:?}: {message}");
    }
}

/// After one worker's listen on a fixed port failed and its retry
/// succeeded, another worker asking for the same port must share it (Node:
/// every worker listening on a port shares one handle).
#[tokio::test]
async fn a_worker_shares_a_fixed_port_with_a_worker_that_had_to_retry() {
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 2).await;
        let (a, b) = (&workers[0], &workers[1]);
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = squatter.local_addr().unwrap();
        let request = tcp(&taken.to_string(), 1);
        let failed = ask_each(&mut cluster, &[a], &request).await;
        assert_eq!(failed.failure(a.id()).0, "AddrInUse");
        drop(squatter);
        let retry = ask_each(&mut cluster, &[a], &request).await;
        assert_eq!(retry.address(a.id()), taken);

        let joined = ask_each(&mut cluster, &[b], &request).await;
        if let NetReply::Failed { kind, message } = &joined.replies[&b.id()] {
            panic!(
                "{policy:?}: worker {} could not share {taken} with worker {}: {kind}: {message}",
                b.id(),
                a.id()
            );
        }
        assert_eq!(joined.address(b.id()), taken);
        // One group: under reuseport, one socket per slot, not one group
        // per request.
        let expected_sockets = if policy == Policy::ReusePort { 2 } else { 1 };
        assert_eq!(
            ss_listeners(taken.port()).len(),
            expected_sockets,
            "{policy:?}: {:?}",
            ss_listeners(taken.port())
        );
        all_serve(policy, taken, &ids(&workers)).await;
    }
}

#[tokio::test]
async fn an_address_that_cannot_be_bound_fails_in_the_worker_naming_it() {
    let root = rustix::process::geteuid().is_root();
    let unprivileged_start: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 1).await;
        let a = &workers[0];

        let privileged_ports = prerequisite(
            "privileged ports (net.ipv4.ip_unprivileged_port_start above 1), for EACCES",
            unprivileged_start > 1,
        );
        if privileged_ports && root {
            privileged_port_as_another_user(policy);
        } else if privileged_ports {
            let answers = ask_each(&mut cluster, &[a], &tcp("127.0.0.1:1", 1)).await;
            let (kind, message) = answers.failure(a.id());
            assert_eq!(kind, "PermissionDenied", "{policy:?}: {message}");
            assert!(message.contains("127.0.0.1:1"), "{message}");
        }

        // TEST-NET-1: no local interface has it.
        let answers = ask_each(&mut cluster, &[a], &tcp("192.0.2.1:0", 1)).await;
        let (kind, message) = answers.failure(a.id());
        assert_eq!(kind, "AddrNotAvailable", "{policy:?}: {message}");
        assert!(message.contains("192.0.2.1:0"), "{policy:?}: {message}");

        // The same through an exclusive listen, bound in the worker.
        let mut exclusive = tcp("192.0.2.1:0", 1);
        if let NetCommand::ListenTcp { exclusive: e, .. } = &mut exclusive {
            *e = true;
        }
        let answers = ask_each(&mut cluster, &[a], &exclusive).await;
        let (kind, message) = answers.failure(a.id());
        assert_eq!(kind, "AddrNotAvailable", "exclusive: {message}");
        assert!(message.contains("192.0.2.1:0"), "exclusive: {message}");

        // And the worker still listens fine afterwards.
        let ok = ask_each(&mut cluster, &[a], &tcp("127.0.0.1:0", 1)).await;
        assert_eq!(ask_tcp(ok.address(a.id())).await.unwrap().0, a.id());
    }
}

/// As root, port 1 binds: run a primary as `nobody` (with `setpriv`) whose
/// worker asks for it, and read what the worker got.
fn privileged_port_as_another_user(policy: Policy) {
    let dir = std::env::temp_dir().join(format!("procluster-eacces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut programs = Vec::new();
    for program in [crate::test_primary(), crate::test_worker()] {
        let copy = dir.join(std::path::Path::new(program).file_name().unwrap());
        std::fs::copy(program, &copy).unwrap();
        programs.push(copy);
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&programs[0])
        .arg(&programs[1])
        .args(["privileged-listen", "1", "inherit", "until-exit"])
        .env("PROCLUSTER_SCHED_POLICY", policy.name())
        .current_dir(&dir)
        .output()
        .expect("run setpriv (util-linux)");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{policy:?}: {output:?}");
    assert!(
        stdout.contains("error PermissionDenied"),
        "{policy:?}: {stdout}"
    );
    assert!(
        stdout.contains("127.0.0.1:1"),
        "{policy:?}: the message names the address: {stdout}"
    );
}

#[tokio::test]
async fn the_backlog_reaches_the_listening_socket() {
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 2).await;
        let mut request = tcp("127.0.0.1:0", 1);
        if let NetCommand::ListenTcp { backlog, .. } = &mut request {
            *backlog = Some(7);
        }
        let answers = ask_each(&mut cluster, &[&workers[0], &workers[1]], &request).await;
        let addr = answers.address(workers[0].id());
        let sockets = ss_listeners(addr.port());
        // Reuseport: one socket per slot, each with the backlog.
        let expected = if policy == Policy::ReusePort { 2 } else { 1 };
        assert_eq!(sockets.len(), expected, "{policy:?}: {sockets:?}");
        for socket in &sockets {
            assert_eq!(socket.send_q, 7, "{policy:?}: {socket:?}");
        }
    }
    // An exclusive listener binds in the worker, with the backlog too.
    let (mut cluster, workers) = net_cluster(Policy::Shared, 1).await;
    let mut request = tcp("127.0.0.1:0", 1);
    if let NetCommand::ListenTcp {
        backlog, exclusive, ..
    } = &mut request
    {
        *backlog = Some(7);
        *exclusive = true;
    }
    let answers = ask_each(&mut cluster, &[&workers[0]], &request).await;
    let sockets = ss_listeners(answers.address(workers[0].id()).port());
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    assert_eq!(sockets[0].send_q, 7, "{sockets:?}");
}

#[tokio::test]
async fn four_workers_share_a_udp_port_and_every_datagram_arrives() {
    let (mut cluster, workers) = net_cluster(Policy::Shared, 4).await;
    let all: Vec<&WorkerHandle> = workers.iter().collect();
    let request = NetCommand::ListenUdp {
        addr: "127.0.0.1:0".into(),
    };
    let answers = ask_each(&mut cluster, &all, &request).await;
    let addr = answers.address(workers[0].id());
    for worker in &workers {
        assert_eq!(answers.address(worker.id()), addr);
        assert_eq!(answers.events[&worker.id()], [format!("udp://{addr}")]);
    }
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..40 {
        client.send_to(format!("d{i}").as_bytes(), addr).unwrap();
    }
    let mut received = BTreeSet::new();
    let mut by_worker: BTreeMap<WorkerId, usize> = BTreeMap::new();
    while received.len() < 40 {
        let (worker, reply) = reply_of(&mut cluster).await;
        match reply {
            NetReply::Datagram(text) => {
                assert!(received.insert(text.clone()), "{text} arrived twice");
                *by_worker.entry(worker.id()).or_default() += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: BTreeSet<String> = (0..40).map(|i| format!("d{i}")).collect();
    assert_eq!(received, expected);
    assert!(by_worker.keys().all(|id| ids(&workers).contains(id)));
}

/// Sends `command` to one worker and waits for its (non-datagram) reply.
async fn ask(cluster: &mut Cluster, worker: &WorkerHandle, command: &NetCommand) -> NetReply {
    ask_each(cluster, &[worker], command).await.replies[&worker.id()].clone()
}

/// Whether this process can bind `addr` for UDP itself (nobody holds it).
fn udp_port_free(addr: SocketAddr) -> bool {
    std::net::UdpSocket::bind(addr).is_ok()
}

#[tokio::test]
async fn a_dropped_udp_socket_releases_the_port_and_bind_close_cycles_leak_nothing() {
    let (mut cluster, workers) = net_cluster(Policy::Shared, 2).await;
    let (a, b) = (&workers[0], &workers[1]);
    let first = ask_each(
        &mut cluster,
        &[a, b],
        &NetCommand::ListenUdp {
            addr: "127.0.0.1:0".into(),
        },
    )
    .await;
    let addr = first.address(a.id());
    let close = NetCommand::Close {
        address: addr.to_string(),
    };
    // One of two holders lets go: the port stays, shared by the other.
    assert!(matches!(
        ask(&mut cluster, a, &close).await,
        NetReply::Closed
    ));
    assert!(!udp_port_free(addr), "worker b still holds {addr}");
    // The same worker binds and closes the port again and again.
    let request = NetCommand::ListenUdp {
        addr: addr.to_string(),
    };
    let fds_before = open_fds();
    for round in 0..20 {
        let reply = ask(&mut cluster, a, &request).await;
        assert!(
            matches!(&reply, NetReply::Listening { .. }),
            "round {round}: {reply:?}"
        );
        assert!(matches!(
            ask(&mut cluster, a, &close).await,
            NetReply::Closed
        ));
    }
    // The primary holds one socket for the port, not one per cycle.
    let grown = open_fds().saturating_sub(fds_before);
    assert!(grown <= 1, "{grown} more descriptors after 20 cycles");
    // The last holder lets go: the primary closes its socket.
    assert!(matches!(
        ask(&mut cluster, b, &close).await,
        NetReply::Closed
    ));
    eventually("the primary releases the UDP port", || udp_port_free(addr)).await;
}

#[tokio::test]
async fn a_dropped_unix_listener_goes_with_its_last_holder_and_can_be_listened_on_again() {
    let dir = TempDir::new("unix-drop");
    let mut cluster = builder("net").cwd(&dir.0).workers(1).build().unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, 1).await;
    let worker = &workers[0];
    let path = dir.0.join("sock");
    let request = NetCommand::ListenUnix {
        path: "sock".into(),
        capacity: 1,
    };
    for round in 0..3 {
        let reply = ask(&mut cluster, worker, &request).await;
        assert!(
            matches!(&reply, NetReply::Listening { .. }),
            "round {round}: {reply:?}"
        );
        assert!(path.exists());
        let close = NetCommand::Close {
            address: "sock".into(),
        };
        assert!(matches!(
            ask(&mut cluster, worker, &close).await,
            NetReply::Closed
        ));
        eventually("the primary removes the socket file", || !path.exists()).await;
    }
}

/// A directory under the test's working directory whose absolute path is
/// too long for a Unix socket address (with `/sock` after it) while its path
/// relative to the working directory (the primary's) is not.
fn deep_dir_near_the_cwd() -> std::path::PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let relative_base = relative_path(base, &cwd);
    let suffix = "/sock";
    let absolute_len = |n: usize| base.as_os_str().len() + 1 + n + suffix.len();
    let relative_len = |n: usize| relative_base.len() + 1 + n + suffix.len();
    let n = (1..200)
        .find(|&n| absolute_len(n) > 107 && relative_len(n) <= 107)
        .expect("the repository's path is longer than its relative form");
    let dir = base.join(&format!("{}{}", std::process::id(), "d".repeat(n))[..n]);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn relative_path(path: &std::path::Path, base: &std::path::Path) -> String {
    let path: Vec<_> = path.components().collect();
    let base: Vec<_> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); base.len() - common];
    parts.extend(
        path[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

#[tokio::test]
async fn a_unix_path_too_long_for_a_socket_address_binds_by_its_shorter_relative_form() {
    let dir = deep_dir_near_the_cwd();
    let path = dir.join("sock");
    assert!(path.as_os_str().len() > 107);
    let mut cluster = builder("net").cwd(&dir).workers(1).build().unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, 1).await;
    let answers = ask_each(
        &mut cluster,
        &[&workers[0]],
        &NetCommand::ListenUnix {
            path: "sock".into(),
            capacity: 1,
        },
    )
    .await;
    assert!(
        matches!(
            &answers.replies[&workers[0].id()],
            NetReply::Listening { .. }
        ),
        "{:?}",
        answers.replies
    );
    assert_eq!(
        answers.events[&workers[0].id()],
        [format!("unix:{}", path.display())],
        "known by the path the worker asked for"
    );
    // Reached by its relative form (the absolute one is too long to connect to).
    let relative = relative_path(&path, &std::env::current_dir().unwrap());
    let mut stream = tokio::net::UnixStream::connect(&relative).await.unwrap();
    assert_eq!(read_greeting(&mut stream).await.unwrap(), workers[0].id());
    drop(stream);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn unix_socket_files_get_the_mode_readable_all_and_writable_all_ask_for() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("unix-mode");
    let mut cluster = builder("net").cwd(&dir.0).workers(1).build().unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, 1).await;
    for (name, readable_all, writable_all, expected) in [
        ("r", true, false, 0o644),
        ("w", false, true, 0o622),
        ("rw", true, true, 0o666),
    ] {
        let request = NetCommand::ListenUnixWith {
            path: name.into(),
            readable_all,
            writable_all,
        };
        let reply = ask(&mut cluster, &workers[0], &request).await;
        assert!(matches!(&reply, NetReply::Listening { .. }), "{reply:?}");
        let mode = std::fs::metadata(dir.0.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, expected, "{name}: {mode:o}");
    }
}

#[tokio::test]
async fn an_exclusive_udp_socket_is_the_workers_own_and_a_shared_one_is_not() {
    let (mut cluster, workers) = net_cluster(Policy::Shared, 2).await;
    let (a, b) = (&workers[0], &workers[1]);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let exclusive = |reuse_address| NetCommand::ListenUdpWith {
        addr: port.to_string(),
        exclusive: true,
        reuse_address,
    };
    let first = ask(&mut cluster, a, &exclusive(false)).await;
    assert!(matches!(&first, NetReply::Listening { .. }), "{first:?}");
    // Bound by worker a alone: worker b's exclusive bind finds it taken,
    // and so does a shared listen, which the primary binds.
    let NetReply::Failed { kind, .. } = ask(&mut cluster, b, &exclusive(false)).await else {
        panic!("a second exclusive bind of one port succeeded")
    };
    assert_eq!(kind, "AddrInUse");
    let shared = NetCommand::ListenUdp {
        addr: port.to_string(),
    };
    let NetReply::Failed { kind, .. } = ask(&mut cluster, b, &shared).await else {
        panic!("the primary bound a port a worker holds exclusively")
    };
    assert_eq!(kind, "AddrInUse");
    // With reuse_address on both sides, two sockets share the address.
    let other = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let reusing = NetCommand::ListenUdpWith {
        addr: other.to_string(),
        exclusive: true,
        reuse_address: true,
    };
    for worker in [a, b] {
        let reply = ask(&mut cluster, worker, &reusing).await;
        assert!(matches!(&reply, NetReply::Listening { .. }), "{reply:?}");
    }
}

/// The next `NetReply` and its sender.
async fn reply_of(cluster: &mut Cluster) -> (WorkerHandle, NetReply) {
    let (worker, message) = message(cluster).await;
    (worker, message.decode().expect("a net reply"))
}

#[tokio::test]
async fn a_relative_unix_path_resolves_in_the_worker_cwd_and_goes_with_the_last_worker() {
    let dir = TempDir::new("unix");
    let mut cluster = builder("net").cwd(&dir.0).workers(2).build().unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, 2).await;
    let request = NetCommand::ListenUnix {
        path: "sock".into(),
        capacity: 2,
    };
    let answers = ask_each(&mut cluster, &[&workers[0], &workers[1]], &request).await;
    let path = dir.0.join("sock");
    for worker in &workers {
        assert!(
            matches!(&answers.replies[&worker.id()], NetReply::Listening { .. }),
            "{:?}",
            answers.replies
        );
        assert_eq!(
            answers.events[&worker.id()],
            [format!("unix:{}", path.display())]
        );
    }
    assert!(path.exists(), "the socket file is in the worker's cwd");
    let mut seen = BTreeSet::new();
    let mut open = Vec::new();
    for _ in 0..5 {
        let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let id = read_greeting(&mut stream).await.unwrap();
        assert!(ids(&workers).contains(&id));
        seen.insert(id);
        // Kept open: a worker with both loops busy cannot take the next.
        open.push(stream);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, ids(&workers), "both workers serve the Unix socket");
    drop(open);

    // The file stays while a worker holds the socket.
    workers[0].disconnect();
    exit_of(&mut cluster, workers[0].id()).await;
    assert!(
        path.exists(),
        "removed while worker {} holds it",
        workers[1].id()
    );
    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    assert_eq!(read_greeting(&mut stream).await.unwrap(), workers[1].id());
    drop(stream);
    workers[1].disconnect();
    eventually("the socket file is removed", || !path.exists()).await;
    drain(&mut cluster).await;
}

fn with_prefetch(mut command: NetCommand, n: Option<u32>) -> NetCommand {
    if let NetCommand::ListenTcp { prefetch, .. } = &mut command {
        *prefetch = n;
    }
    command
}

/// Workers with 1 and 9 accept loops, on a round-robin listener with this
/// prefetch, serve 10 long connections; returns who served how many.
async fn ten_long_connections(prefetch: Option<u32>) -> (BTreeMap<WorkerId, usize>, [WorkerId; 2]) {
    let (mut cluster, workers) = net_cluster(Policy::RoundRobin, 2).await;
    let (small, big) = (&workers[0], &workers[1]);
    let first = ask_each(
        &mut cluster,
        &[small],
        &with_prefetch(tcp("127.0.0.1:0", 1), prefetch),
    )
    .await;
    let second = ask_each(
        &mut cluster,
        &[big],
        &with_prefetch(tcp("127.0.0.1:0", 9), prefetch),
    )
    .await;
    let addr = first.address(small.id());
    assert_eq!(second.address(big.id()), addr);

    let clients: Vec<_> = (0..10).map(|_| tokio::spawn(ask_tcp(addr))).collect();
    let mut open = Vec::new();
    let mut count: BTreeMap<WorkerId, usize> = BTreeMap::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (id, stream) = client
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("client {i} was not answered: {e}; so far {count:?}"));
        *count.entry(id).or_default() += 1;
        open.push(stream);
    }
    (count, [small.id(), big.id()])
}

#[tokio::test]
async fn round_robin_serves_long_connections_by_capacity_1_and_9() {
    // Prefetch 0: a worker gets exactly as many connections as it has
    // accept() calls waiting.
    let (count, [small, big]) = ten_long_connections(Some(0)).await;
    assert_eq!(
        count,
        BTreeMap::from([(small, 1), (big, 9)]),
        "connections follow the accept capacity"
    );
}

/// With the default prefetch, a worker whose only accept loop is busy with
/// a long connection must not keep connections it cannot take while another
/// worker waits in accept(): every one of 10 clients is answered by the 10
/// accept loops.
#[tokio::test]
async fn round_robin_default_prefetch_strands_no_connection_behind_a_busy_worker() {
    // Every answer comes within milliseconds when nothing is stranded.
    let bound = std::time::Duration::from_secs(5);
    let (count, [small, big]) = tokio::time::timeout(bound, ten_long_connections(None))
        .await
        .expect("clients were left unanswered for 5 s while accept() calls waited");
    assert_eq!(count, BTreeMap::from([(small, 1), (big, 9)]));
}

/// Connects `n` clients and returns them with their greetings pending.
async fn connect_all(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    clients
}

/// Every client gets a greeting; returns who answered each.
async fn greetings(clients: Vec<tokio::net::TcpStream>) -> Vec<WorkerId> {
    let mut ids = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let id = read_greeting(&mut client)
            .await
            .unwrap_or_else(|e| panic!("client {i} got no answer: {e}"));
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn round_robin_connections_handed_to_a_worker_killed_before_taking_them_go_to_another() {
    let mut cluster = builder("net").policy(Policy::RoundRobin).build().unwrap();
    let staller = cluster
        .fork_with(ForkOptions {
            index: Some(0),
            ..ForkOptions::default()
        })
        .await
        .unwrap();
    online(&mut cluster, 1).await;
    let stall = with_serve(tcp("127.0.0.1:0", 3), Serve::Stall);
    let answers = ask_each(&mut cluster, &[&staller], &stall).await;
    let addr = answers.address(staller.id());
    assert!(answers.round_robin(staller.id()));

    // Three clients; the primary accepts them and hands them to the only
    // worker with credit, which never takes them.
    let before = socket_fds(staller.pid());
    let clients = connect_all(addr, 3).await;
    eventually("the stalled worker holds the three connections", || {
        socket_fds(staller.pid()) == before + 3
    })
    .await;

    let helper = cluster
        .fork_with(ForkOptions {
            index: Some(1),
            ..ForkOptions::default()
        })
        .await
        .unwrap();
    let joined = ask_each(&mut cluster, &[&helper], &tcp("127.0.0.1:0", 4)).await;
    assert_eq!(joined.address(helper.id()), addr);

    staller.signal(Signal::KILL).unwrap();
    let answered = greetings(clients).await;
    assert_eq!(answered, [helper.id(); 3]);
    let (exited, _) = exit_of(&mut cluster, staller.id()).await;
    assert_eq!(exited.status.signal(), Some(Signal::KILL));
}

/// Makes `n` connections wait for worker `holder`, which never takes them:
/// in the socket's queue (shared, reuseport: `Serve::Never`), or handed to
/// it (round-robin: `Serve::Stall`). Returns the clients and the address.
async fn connections_waiting_for(
    cluster: &mut Cluster,
    policy: Policy,
    holder: &WorkerHandle,
    n: usize,
) -> (Vec<tokio::net::TcpStream>, SocketAddr) {
    let how = if policy == Policy::RoundRobin {
        Serve::Stall
    } else {
        Serve::Never
    };
    let answers = ask_each(cluster, &[holder], &with_serve(tcp("127.0.0.1:0", n), how)).await;
    let addr = answers.address(holder.id());
    let before = socket_fds(holder.pid());
    let clients = connect_all(addr, n).await;
    if policy == Policy::RoundRobin {
        eventually("the worker holds the connections", || {
            socket_fds(holder.pid()) == before + n
        })
        .await;
    } else {
        eventually("the connections wait in the accept queue", || {
            ss_listeners(addr.port())
                .iter()
                .map(|s| s.recv_q as usize)
                .sum::<usize>()
                == n
        })
        .await;
    }
    (clients, addr)
}

#[tokio::test]
async fn a_slot_restarted_with_kept_listeners_answers_the_connections_that_waited() {
    for policy in [Policy::ReusePort, Policy::Shared, Policy::RoundRobin] {
        let mut cluster = builder("net").policy(policy).build().unwrap();
        cluster.keep_listeners(true);
        let slot = ForkOptions {
            index: Some(0),
            ..ForkOptions::default()
        };
        let first = cluster.fork_with(slot.clone()).await.unwrap();
        online(&mut cluster, 1).await;
        let (clients, addr) = connections_waiting_for(&mut cluster, policy, &first, 5).await;

        first.signal(Signal::KILL).unwrap();
        exit_of(&mut cluster, first.id()).await;
        let second = cluster.fork_with(slot).await.unwrap();
        assert_eq!(second.index(), Some(0));
        let answers = ask_each(&mut cluster, &[&second], &tcp("127.0.0.1:0", 5)).await;
        assert_eq!(answers.address(second.id()), addr, "{policy:?}: same port");
        let answered = greetings(clients).await;
        assert_eq!(answered, [second.id(); 5], "{policy:?}");
    }
}

/// Two reuseport workers in slots 0 and 1 on one port, a socket each: the
/// one in `idle_slot` listens but never accepts, the other serves. Returns
/// the cluster, the idle worker, the serving one and the address.
async fn reuseport_pair_with_an_idle_slot(
    idle_slot: usize,
    keep_listeners: bool,
) -> (Cluster, WorkerHandle, WorkerHandle, SocketAddr) {
    let mut cluster = builder("net").policy(Policy::ReusePort).build().unwrap();
    cluster.keep_listeners(keep_listeners);
    let fork = |index| ForkOptions {
        index: Some(index),
        ..ForkOptions::default()
    };
    let first = cluster.fork_with(fork(0)).await.unwrap();
    let second = cluster.fork_with(fork(1)).await.unwrap();
    online(&mut cluster, 2).await;
    let (idle, serving) = if idle_slot == 0 {
        (first, second)
    } else {
        (second, first)
    };
    let never = with_serve(tcp("127.0.0.1:0", 1), Serve::Never);
    let addr = ask_each(&mut cluster, &[&idle], &never)
        .await
        .address(idle.id());
    let joined = ask_each(&mut cluster, &[&serving], &tcp("127.0.0.1:0", 16)).await;
    assert_eq!(joined.address(serving.id()), addr);
    assert_eq!(ss_listeners(addr.port()).len(), 2, "one socket per slot");
    (cluster, idle, serving, addr)
}

/// With the kernel steering new connections, a slot whose worker is gone
/// gets none: nothing waits in its queue for the primary to move.
#[tokio::test]
async fn reuseport_steers_new_connections_away_from_a_slot_without_a_worker() {
    let (mut cluster, gone, serving, addr) = reuseport_pair_with_an_idle_slot(0, true).await;
    gone.signal(Signal::KILL).unwrap();
    until(&mut cluster, |e| {
        matches!(e, Event::Exit { worker, .. } if worker.id() == gone.id()).then_some(())
    })
    .await;
    let before = cluster.listener_stats();
    let answered = short_connections(addr, 60).await;
    assert_eq!(answered, [serving.id(); 60]);
    let after = cluster.listener_stats();
    assert_eq!(
        after.from_vacant_slots, before.from_vacant_slots,
        "connections reached the vacant slot's queue: {before:?} -> {after:?}"
    );
    // A worker for the slot again: it gets its share of new connections.
    let back = cluster
        .fork_with(ForkOptions {
            index: Some(0),
            ..ForkOptions::default()
        })
        .await
        .unwrap();
    online(&mut cluster, 1).await;
    ask_each(&mut cluster, &[&back], &tcp(&addr.to_string(), 16)).await;
    let answered = short_connections(addr, 60).await;
    assert!(
        answered.contains(&back.id()) && answered.contains(&serving.id()),
        "{answered:?}"
    );
}

#[tokio::test]
async fn reuseport_drains_a_dead_workers_queue_to_the_other_workers() {
    let (_cluster, idle, busy, addr) = reuseport_pair_with_an_idle_slot(0, false).await;

    // The kernel spreads these across both slots' sockets; those of the idle
    // worker's slot wait until it dies and its queue is drained.
    let clients = connect_all(addr, 16).await;
    idle.signal(Signal::KILL).unwrap();
    let answered = greetings(clients).await;
    assert_eq!(answered, [busy.id(); 16]);
}

#[tokio::test]
async fn a_retired_reuseport_slot_drains_its_queue_then_closes_its_socket() {
    let (cluster, leaving, staying, addr) = reuseport_pair_with_an_idle_slot(1, true).await;

    // Scaling down: slot 1 is retired while connections wait in its queue.
    let clients = connect_all(addr, 16).await;
    cluster.retire_slot(1);
    leaving.signal(Signal::KILL).unwrap();
    let answered = greetings(clients).await;
    assert_eq!(
        answered,
        [staying.id(); 16],
        "the retired slot's queue went to the other worker"
    );
    eventually("the retired slot's socket is closed", || {
        ss_listeners(addr.port()).len() == 1
    })
    .await;
    // New connections all reach the remaining socket.
    let later = greetings(connect_all(addr, 8).await).await;
    assert_eq!(later, [staying.id(); 8]);
}

#[tokio::test]
async fn a_disconnecting_worker_leaves_its_connections_to_the_others() {
    for policy in [Policy::RoundRobin, Policy::Shared, Policy::ReusePort] {
        let (mut cluster, workers) = net_cluster(policy, 2).await;
        let (leaving, staying) = (&workers[0], &workers[1]);
        let answers = ask_each(&mut cluster, &[leaving, staying], &tcp("127.0.0.1:0", 4)).await;
        let addr = answers.address(leaving.id());

        // Three clients connect again and again while the worker leaves.
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicUsize::new(0));
        let gone_at = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let mut drivers = Vec::new();
        for _ in 0..3 {
            let stop = stop.clone();
            let gone_at = gone_at.clone();
            let progress = progress.clone();
            drivers.push(tokio::spawn(async move {
                let mut answered = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    let after_exit = gone_at.lock().unwrap().is_some_and(|at| at < started);
                    let (id, stream) = ask_tcp(addr).await?;
                    drop(stream);
                    answered.push((id, after_exit));
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                std::io::Result::Ok(answered)
            }));
        }
        eventually("the clients are being answered", || {
            progress.load(Ordering::Relaxed) >= 6
        })
        .await;
        leaving.disconnect();
        let (exited, names) = exit_of(&mut cluster, leaving.id()).await;
        assert!(exited.after_disconnect, "{policy:?}");
        assert!(exited.status.success(), "{policy:?}: {:?}", exited.status);
        assert!(names.contains(&"disconnect"));
        *gone_at.lock().unwrap() = Some(std::time::Instant::now());
        // Keep going a little after the exit: later clients go to the other.
        let after = ask_tcp(addr).await.expect("answered after the exit");
        assert_eq!(after.0, staying.id());
        drop(after);
        short_connections(addr, 10)
            .await
            .iter()
            .for_each(|id| assert_eq!(*id, staying.id(), "{policy:?}"));
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for driver in drivers {
            let answered = driver
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{policy:?}: a client failed: {e}"));
            total += answered.len();
            for (id, after_exit) in answered {
                if after_exit {
                    assert_eq!(id, staying.id(), "{policy:?}");
                }
            }
        }
        assert!(total > 0, "{policy:?}: the clients made progress");
    }
}

/// Node closes a worker's servers before its IPC disconnect: a client that
/// comes after the `Disconnect` event is refused (or served), never queued
/// on a socket that only the leaving worker still held open and then reset.
#[tokio::test]
async fn after_a_disconnect_event_no_connection_is_queued_where_nobody_will_accept() {
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 1).await;
        let leaving = &workers[0];
        let answers = ask_each(&mut cluster, &[leaving], &tcp("127.0.0.1:0", 2)).await;
        let addr = answers.address(leaving.id());
        // A connection the worker keeps open, so it stays alive after its
        // disconnect, finishing its work.
        let (_, held) = ask_tcp(addr).await.unwrap();
        leaving.disconnect();
        until(&mut cluster, |e| {
            matches!(e, Event::Disconnect(_)).then_some(())
        })
        .await;
        for attempt in 0..20 {
            match tokio::net::TcpStream::connect(addr).await {
                Err(e) => assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused,
                    "{policy:?}, attempt {attempt}"
                ),
                Ok(mut stream) => {
                    let greeting = read_greeting(&mut stream).await;
                    assert!(
                        greeting.is_ok(),
                        "{policy:?}, attempt {attempt}: accepted after the disconnect, then {greeting:?}"
                    );
                }
            }
        }
        drop(held);
    }
}

/// A graceful stop serves what was already queued: the listeners stop
/// taking new clients, the connections waiting in their queues go to the
/// workers, and only then do the workers leave.
#[tokio::test]
async fn draining_the_listeners_serves_every_queued_connection_and_refuses_new_ones() {
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 1).await;
        let worker = &workers[0];
        // One accept loop: the worker serves one client at a time, the
        // others wait in the queue.
        let answers = ask_each(&mut cluster, &[worker], &tcp("127.0.0.1:0", 1)).await;
        let addr = answers.address(worker.id());
        let connected = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..20)
            .map(|_| {
                let connected = connected.clone();
                tokio::spawn(async move {
                    let mut stream = tokio::net::TcpStream::connect(addr).await?;
                    connected.fetch_add(1, Ordering::SeqCst);
                    read_greeting(&mut stream).await
                })
            })
            .collect();
        eventually("every client is connected", || {
            connected.load(Ordering::SeqCst) == 20
        })
        .await;
        let left = cluster
            .drain_listeners(std::time::Duration::from_secs(20))
            .await;
        assert_eq!(left, 0, "{policy:?}: connections left untaken");
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "{policy:?}: a new client after the drain");
        cluster.disconnect().await;
        for (i, client) in clients.into_iter().enumerate() {
            let greeting = client.await.unwrap();
            assert_eq!(
                greeting.as_ref().ok(),
                Some(&worker.id()),
                "{policy:?}: client {i}: {greeting:?}"
            );
        }
    }
}

#[tokio::test]
async fn exclusive_binds_in_the_worker_and_still_reports_listening() {
    let (mut cluster, workers) = net_cluster(Policy::RoundRobin, 2).await;
    let (a, b) = (&workers[0], &workers[1]);
    let mut request = tcp("127.0.0.1:0", 2);
    if let NetCommand::ListenTcp { exclusive, .. } = &mut request {
        *exclusive = true;
    }
    let answers = ask_each(&mut cluster, &[a], &request).await;
    let addr = answers.address(a.id());
    assert!(
        !answers.round_robin(a.id()),
        "exclusive is never round-robin"
    );
    assert_eq!(answers.events[&a.id()], [format!("tcp://{addr}")]);
    let sockets = ss_listeners(addr.port());
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    assert!(
        sockets[0].users.contains(&format!("pid={},", a.pid())),
        "the worker holds the socket: {sockets:?}"
    );
    assert!(
        !sockets[0]
            .users
            .contains(&format!("pid={},", std::process::id())),
        "the primary does not: {sockets:?}"
    );
    assert_eq!(ask_tcp(addr).await.unwrap().0, a.id());

    // Another worker asking exclusive for the same port: no SO_REUSEPORT.
    let mut same = tcp(&addr.to_string(), 1);
    if let NetCommand::ListenTcp { exclusive, .. } = &mut same {
        *exclusive = true;
    }
    let answers = ask_each(&mut cluster, &[b], &same).await;
    let (kind, message) = answers.failure(b.id());
    assert_eq!(kind, "AddrInUse", "{message}");
    assert!(message.contains(&addr.to_string()), "{message}");
}

#[tokio::test]
async fn ipv6_loopback_is_shared_under_every_policy() {
    let ipv6 = std::net::TcpListener::bind("[::1]:0");
    if !prerequisite(&format!("an IPv6 loopback ({ipv6:?})"), ipv6.is_ok()) {
        return;
    }
    for policy in POLICIES {
        let (mut cluster, workers) = net_cluster(policy, 2).await;
        let answers = ask_each(
            &mut cluster,
            &[&workers[0], &workers[1]],
            &tcp("[::1]:0", 4),
        )
        .await;
        let addr = answers.address(workers[0].id());
        assert!(addr.is_ipv6());
        assert_eq!(answers.address(workers[1].id()), addr);
        assert_eq!(answers.events[&workers[1].id()], [format!("tcp://{addr}")]);
        all_serve(policy, addr, &ids(&workers)).await;
    }
}

/// Runs [`sched_policy_env_child`] in a process of its own with
/// `PROCLUSTER_SCHED_POLICY` set, so the variable does not reach clusters of
/// other tests in this process.
#[tokio::test]
async fn procluster_sched_policy_overrides_the_builder() {
    for value in ["round-robin", "reuseport", "bogus"] {
        let out = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "listeners::sched_policy_env_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PROCLUSTER_SCHED_POLICY", value)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{value}: {out:?}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
#[ignore = "run by procluster_sched_policy_overrides_the_builder with the variable set"]
async fn sched_policy_env_child() {
    let value = std::env::var("PROCLUSTER_SCHED_POLICY").expect("run by the parent test");
    let (builder_policy, expected) = match value.as_str() {
        "round-robin" => (Policy::Shared, Policy::RoundRobin),
        "reuseport" => (Policy::RoundRobin, Policy::ReusePort),
        _ => {
            let error = builder("net").policy(Policy::Shared).build().unwrap_err();
            assert!(
                error.to_string().contains("PROCLUSTER_SCHED_POLICY"),
                "{error}"
            );
            return;
        }
    };
    let mut cluster = builder("net")
        .policy(builder_policy)
        .workers(2)
        .build()
        .unwrap();
    assert_eq!(cluster.settings().policy, expected);
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, 2).await;
    let answers = ask_each(
        &mut cluster,
        &[&workers[0], &workers[1]],
        &tcp("127.0.0.1:0", 2),
    )
    .await;
    let addr = answers.address(workers[0].id());
    assert_eq!(
        answers.round_robin(workers[0].id()),
        expected == Policy::RoundRobin
    );
    let sockets = ss_listeners(addr.port()).len();
    assert_eq!(sockets, if expected == Policy::ReusePort { 2 } else { 1 });
    all_serve(expected, addr, &ids(&workers)).await;
}
