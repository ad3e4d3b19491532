//! The workers' recent output, kept for `procluster logs` and `top`: a ring
//! of the latest lines, bounded in lines and bytes, and a feed for clients
//! that follow.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use procluster::primary::{OutputHook, OutputLine};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Lines kept.
const MAX_LINES: usize = 2000;
/// Bytes of line text kept (a line is at most 64 KiB).
const MAX_BYTES: usize = 4 * 1024 * 1024;
/// Lines a follower may fall behind before it is told it missed some.
const FOLLOW_BACKLOG: usize = 4096;

/// One line of a worker's output, as `logs` prints it (the keys of the
/// command's JSON log lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub ts: String,
    pub worker: u32,
    pub index: Option<usize>,
    pub pid: u32,
    pub stream: String,
    pub line: String,
}

impl Line {
    /// `[worker 3] text`, as the primary prints it.
    pub fn text(&self) -> String {
        format!("[worker {}] {}", self.worker, self.line)
    }
}

/// The ring and the feed.
#[derive(Debug)]
pub struct Recent {
    ring: Mutex<Ring>,
    feed: broadcast::Sender<Arc<Line>>,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<Arc<Line>>,
    bytes: usize,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            ring: Mutex::default(),
            feed: broadcast::channel(FOLLOW_BACKLOG).0,
        }
    }
}

impl Recent {
    /// Keeps a line and passes it to followers.
    pub fn push(&self, line: Line) {
        let line = Arc::new(line);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            ring.bytes += line.line.len();
            ring.lines.push_back(line.clone());
            while ring.lines.len() > MAX_LINES || ring.bytes > MAX_BYTES {
                match ring.lines.pop_front() {
                    Some(old) => ring.bytes -= old.line.len(),
                    None => break,
                }
            }
        }
        // Nobody following is not an error.
        let _ = self.feed.send(line);
    }

    /// The last `n` kept lines that `keep` accepts, oldest first.
    pub fn last(&self, n: usize, keep: impl Fn(&Line) -> bool) -> Vec<Arc<Line>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut picked: Vec<Arc<Line>> = ring
            .lines
            .iter()
            .rev()
            .filter(|l| keep(l))
            .take(n)
            .cloned()
            .collect();
        picked.reverse();
        picked
    }

    /// Lines from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<Line>> {
        self.feed.subscribe()
    }
}

/// Wraps the hook that prints workers' output so that every line is also
/// kept in `recent`.
pub fn tap(recent: Arc<Recent>, print: OutputHook) -> OutputHook {
    Arc::new(move |line: OutputLine<'_>| {
        recent.push(Line {
            ts: crate::logs::rfc3339(SystemTime::now()),
            worker: line.worker.get(),
            index: line.index,
            pid: line.pid,
            stream: line.stream.name().to_string(),
            line: String::from_utf8_lossy(line.line).into_owned(),
        });
        print(line);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(worker: u32, text: &str) -> Line {
        Line {
            ts: String::new(),
            worker,
            index: Some(0),
            pid: 1,
            stream: "stdout".into(),
            line: text.into(),
        }
    }

    #[test]
    fn the_ring_keeps_the_latest_lines_within_its_bounds() {
        let recent = Recent::default();
        for i in 0..MAX_LINES + 10 {
            recent.push(line(1 + (i % 2) as u32, &i.to_string()));
        }
        let all = recent.last(usize::MAX, |_| true);
        assert_eq!(all.len(), MAX_LINES);
        assert_eq!(all[0].line, "10");
        let odd = recent.last(3, |l| l.worker == 2);
        let texts: Vec<_> = odd.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["2005", "2007", "2009"]);
        let big = "x".repeat(64 * 1024);
        for _ in 0..100 {
            recent.push(line(1, &big));
        }
        assert!(recent.last(usize::MAX, |_| true).len() <= MAX_BYTES / big.len() + 1);
    }

    #[tokio::test]
    async fn followers_get_lines_from_now_on() {
        let recent = Recent::default();
        recent.push(line(1, "before"));
        let mut follower = recent.follow();
        recent.push(line(1, "after"));
        assert_eq!(follower.recv().await.unwrap().line, "after");
    }
}
