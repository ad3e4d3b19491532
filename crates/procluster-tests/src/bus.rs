//! The test worker's `bus` mode: it opens the cluster bus and does what the
//! primary's [`BusCommand`]s ask, reporting with [`BusReply`]s.

use std::collections::BTreeMap;
use std::time::Duration;

use procluster::bus::{Bus, Limits, Overflow, Sender};
use procluster::worker::Worker;
use serde::{Deserialize, Serialize};

/// What the test primary asks of a worker in `bus` mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BusCommand {
    /// Subscribe to `pattern` (queue of `capacity` in the primary) and read
    /// until `expect` messages arrived (or the subscription ends), then
    /// report `Collected`. `Subscribed` comes first, once the primary has
    /// the subscription.
    Collect {
        pattern: String,
        capacity: u32,
        expect: u64,
    },
    /// Subscribe and never read. `Subscribed` once in place.
    Deaf {
        pattern: String,
        capacity: u32,
        disconnect: bool,
    },
    /// Publish `count` `Numbered` messages on `topic` (`padding` bytes of
    /// text each), then report `Published`.
    Publish {
        topic: String,
        count: u64,
        padding: usize,
    },
    /// Answer every request on `topic` with `Echoed` naming this worker.
    Respond { topic: String },
    /// Send one request and report how it went.
    Request {
        topic: String,
        text: String,
        timeout_ms: u64,
    },
}

/// What a worker in `bus` mode reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BusReply {
    Subscribed(Result<(), String>),
    Collected(Collected),
    Published(u64),
    /// Still at it: messages read or published so far (every 2000), so
    /// that a test's deadline measures progress, not the whole run.
    Progress(u64),
    Responding,
    /// The reply's text and who sent it (with its host), or the error.
    Requested(Result<(String, String), String>),
}

/// What a collecting subscriber saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    pub total: u64,
    /// Messages per publisher.
    pub per_sender: BTreeMap<String, u64>,
    /// Messages whose sequence number was not the one after the previous
    /// from the same publisher.
    pub out_of_order: u64,
    /// Whether the subscription ended before `expect` (overflow, closed).
    pub ended_early: bool,
}

/// How a collector names a publisher: its sender, and on Redis its host.
pub fn label(sender: Sender, host: Option<&str>) -> String {
    match host {
        Some(host) => format!("{sender} on {host}"),
        None => sender.to_string(),
    }
}

/// A published message: its publisher's sequence number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Numbered {
    pub seq: u64,
    pub padding: String,
}

/// A request's body, and what a responder answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Echoed {
    pub text: String,
}

/// Messages between two progress reports.
const PROGRESS: u64 = 2000;

/// The worker's side: one task per command.
pub async fn worker_main(worker: Worker) {
    let bus = Bus::open(&worker).await.expect("open the bus");
    let shutdown = worker.shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            message = worker.recv() => {
                let Some(message) = message else { break };
                let command: BusCommand = message.decode().expect("a bus command");
                tokio::spawn(run(worker.clone(), bus.clone(), command));
            }
        }
    }
}

async fn run(worker: Worker, bus: Bus, command: BusCommand) {
    let reply = |r: BusReply| {
        let worker = worker.clone();
        async move { worker.send(&r).await.expect("report") }
    };
    match command {
        BusCommand::Collect {
            pattern,
            capacity,
            expect,
        } => {
            let subscribed = bus
                .subscribe_with(&pattern, Limits::default().capacity(capacity))
                .await;
            let mut sub = match subscribed {
                Ok(sub) => sub,
                Err(e) => return reply(BusReply::Subscribed(Err(e.to_string()))).await,
            };
            reply(BusReply::Subscribed(Ok(()))).await;
            let mut seen = Collected::default();
            let mut last: BTreeMap<String, u64> = BTreeMap::new();
            while seen.total < expect {
                let Some(message) = sub.next().await else {
                    seen.ended_early = true;
                    break;
                };
                let numbered: Numbered = message.decode().expect("a numbered message");
                let sender = label(message.sender(), message.host());
                let expected = last.get(&sender).map_or(0, |s| s + 1);
                if numbered.seq != expected {
                    seen.out_of_order += 1;
                }
                last.insert(sender.clone(), numbered.seq);
                seen.total += 1;
                *seen.per_sender.entry(sender).or_default() += 1;
                if seen.total % PROGRESS == 0 {
                    reply(BusReply::Progress(seen.total)).await;
                }
            }
            reply(BusReply::Collected(seen)).await;
        }
        BusCommand::Deaf {
            pattern,
            capacity,
            disconnect,
        } => {
            let overflow = if disconnect {
                Overflow::Disconnect
            } else {
                Overflow::DropOldest
            };
            let limits = Limits::default().capacity(capacity).overflow(overflow);
            match bus.subscribe_with(&pattern, limits).await {
                Ok(sub) => {
                    reply(BusReply::Subscribed(Ok(()))).await;
                    // Held, never read, for the worker's life.
                    std::mem::forget(sub);
                }
                Err(e) => reply(BusReply::Subscribed(Err(e.to_string()))).await,
            }
        }
        BusCommand::Publish {
            topic,
            count,
            padding,
        } => {
            let padding = "p".repeat(padding);
            for seq in 0..count {
                let message = Numbered {
                    seq,
                    padding: padding.clone(),
                };
                bus.publish(&topic, &message).await.expect("publish");
                if (seq + 1) % PROGRESS == 0 {
                    reply(BusReply::Progress(seq + 1)).await;
                }
            }
            reply(BusReply::Published(count)).await;
        }
        BusCommand::Respond { topic } => {
            let mut sub = bus.subscribe(&topic).await.expect("subscribe");
            reply(BusReply::Responding).await;
            while let Some(request) = sub.next().await {
                let asked: Echoed = request.decode().expect("a request");
                let answer = Echoed {
                    text: format!("{} from worker {}", asked.text, worker.id()),
                };
                let _ = request.respond(&answer).await;
            }
        }
        BusCommand::Request {
            topic,
            text,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let result = match bus.request_timeout(&topic, &Echoed { text }, timeout).await {
                Ok(answer) => answer
                    .decode::<Echoed>()
                    .map(|e| (e.text, label(answer.sender(), answer.host())))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            reply(BusReply::Requested(result)).await;
        }
    }
}
