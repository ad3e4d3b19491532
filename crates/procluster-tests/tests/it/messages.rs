//! Messages between the primary and workers, and between workers: who gets
//! them, who they are from, their order, their size.

use std::collections::BTreeSet;

use procluster::Format;
use procluster::primary::Cluster;
use procluster_tests::*;

use crate::builder;

async fn serving(count: usize) -> (Cluster, Vec<procluster::primary::WorkerHandle>) {
    let mut cluster = builder("serve").workers(count).build().unwrap();
    let workers = cluster.start().await.unwrap();
    online(&mut cluster, count).await;
    (cluster, workers)
}

#[tokio::test]
async fn a_message_to_one_worker_is_answered_by_that_worker_only() {
    let (mut cluster, workers) = serving(3).await;
    workers[1]
        .send(&Command::Echo("for the second".into()))
        .await
        .unwrap();
    let (from, answer) = reply(&mut cluster).await;
    assert_eq!(from, workers[1]);
    assert!(
        matches!(answer, Reply::Echo(ref text) if text == "for the second"),
        "{answer:?}"
    );
    // The others got nothing: the next replies answer a later question.
    for worker in &workers {
        worker
            .send(&Command::Echo(format!("to {}", worker.id())))
            .await
            .unwrap();
    }
    let mut answered = BTreeSet::new();
    for _ in &workers {
        let (from, answer) = reply(&mut cluster).await;
        assert!(
            matches!(answer, Reply::Echo(ref text) if *text == format!("to {}", from.id())),
            "{answer:?}"
        );
        answered.insert(from.id());
    }
    assert_eq!(answered, workers.iter().map(|w| w.id()).collect());
}

#[tokio::test]
async fn a_broadcast_reaches_every_worker_once() {
    let (mut cluster, workers) = serving(3).await;
    cluster
        .broadcast(&Command::Echo("everyone".into()))
        .await
        .unwrap();
    let mut answered = Vec::new();
    for _ in &workers {
        let (from, answer) = reply(&mut cluster).await;
        assert!(
            matches!(answer, Reply::Echo(ref text) if text == "everyone"),
            "{answer:?}"
        );
        answered.push(from.id());
    }
    answered.sort_unstable();
    assert_eq!(answered, workers.iter().map(|w| w.id()).collect::<Vec<_>>());
    // Nobody answered twice: a question to one worker gets the next reply.
    workers[0]
        .send(&Command::Echo("after".into()))
        .await
        .unwrap();
    let (from, answer) = reply(&mut cluster).await;
    assert_eq!(
        (
            from.id(),
            matches!(answer, Reply::Echo(ref t) if t == "after")
        ),
        (workers[0].id(), true)
    );
}

#[tokio::test]
async fn a_message_from_a_worker_is_attributed_to_it() {
    let (mut cluster, workers) = serving(3).await;
    for worker in workers.iter().rev() {
        worker.send(&Command::Describe).await.unwrap();
        let (from, answer) = reply(&mut cluster).await;
        let Reply::Described { id, .. } = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(
            from.id(),
            worker.id(),
            "the event names the worker that was asked"
        );
        assert_eq!(id, worker.id(), "and that worker wrote the reply");
    }
}

#[tokio::test]
async fn a_worker_can_message_another_worker_through_the_primary() {
    let (mut cluster, workers) = serving(2).await;
    let (sender, receiver) = (&workers[0], &workers[1]);
    sender
        .send(&Command::RelayTo(receiver.id(), "psst".into()))
        .await
        .unwrap();
    let (from, answer) = reply(&mut cluster).await;
    assert_eq!(&from, receiver, "the receiver reports it");
    match answer {
        Reply::Relayed { from, text } => {
            assert_eq!(from, Some(sender.id()), "the receiver sees who sent it");
            assert_eq!(text, "psst");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_flood_of_100k_messages_arrives_in_order() {
    const N: u64 = 100_000;
    let (mut cluster, workers) = serving(1).await;
    workers[0].send(&Command::Flood(N)).await.unwrap();
    for expected in 0..N {
        let (_, answer) = reply(&mut cluster).await;
        match answer {
            Reply::Seq(seq) => assert_eq!(seq, expected, "messages out of order"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // And the channel still answers.
    workers[0]
        .send(&Command::Echo("still here".into()))
        .await
        .unwrap();
    assert!(matches!(reply(&mut cluster).await.1, Reply::Echo(_)));
}

const BIG: usize = 64 * 1024 * 1024;

/// 64 MiB of letters, each KiB stamped with its number, so that a lost,
/// repeated or shifted piece would show.
fn big_text() -> String {
    let mut text = String::with_capacity(BIG);
    let filler: String = (0..1024)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    for kib in 0..BIG / 1024 {
        let stamp = format!("<{kib}>");
        text.push_str(&stamp);
        text.push_str(&filler[stamp.len()..]);
    }
    text
}

/// How long the echo of 64 MiB of JSON may take: four passes of an
/// unoptimised JSON encoder or decoder over it (the test build), some seconds
/// on a quiet machine and a minute on a loaded one. Under the 3 minutes after
/// which nextest ends a test.
const BIG_JSON_ECHO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(150);

#[tokio::test]
async fn a_64_mib_json_message_goes_both_ways() {
    let (mut cluster, workers) = serving(1).await;
    let text = big_text();
    workers[0].send(&Command::Echo(text.clone())).await.unwrap();
    let (from, message) = message_within(&mut cluster, BIG_JSON_ECHO_DEADLINE).await;
    assert_eq!(from, workers[0]);
    assert_eq!(message.format(), Format::Json);
    assert!(message.payload().len() > BIG);
    let Reply::Echo(back) = message.decode().unwrap() else {
        panic!("not an echo")
    };
    assert!(back == text, "the 64 MiB text came back changed");
}

#[tokio::test]
async fn a_64_mib_binary_message_goes_both_ways() {
    let mut cluster = builder("serve").format(Format::Binary).build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    let blob = Blob(big_text().into_bytes());
    worker.send(&Command::EchoBlob(blob.clone())).await.unwrap();
    let (_, message) = message(&mut cluster).await;
    assert_eq!(message.format(), Format::Binary);
    assert!(
        message.payload().len() > BIG && message.payload().len() < BIG + 64,
        "compact: {}",
        message.payload().len()
    );
    let Reply::Blob(back) = message.decode().unwrap() else {
        panic!("not a blob")
    };
    assert!(back == blob, "the 64 MiB blob came back changed");
}
