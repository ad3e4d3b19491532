//! What `/proc` says about a worker and everything it started: CPU time,
//! resident memory, open descriptors, threads, uptime; and how many
//! connections wait in a listening socket's queue (what `ss -lnt` shows as
//! Recv-Q). Read in one place for telemetry (which makes the types public)
//! and for the supervisor's recycling by memory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    ppid: u32,
    /// User and system time, in clock ticks.
    ticks: u64,
    threads: u64,
    /// Start time after boot, in clock ticks.
    start: u64,
    /// Resident pages.
    rss_pages: u64,
}

/// Parses the fields after the command name (which may hold spaces and
/// parentheses: it ends at the last `)`).
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Fields from 3 (state) on; index 0 here is field 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        ppid: u32::try_from(field(4)?).ok()?,
        ticks: field(14)? + field(15)?,
        threads: field(20)?,
        start: field(22)?,
        rss_pages: field(24)?,
    })
}

/// How process trees are read from `/proc`: where the kernel lists each
/// thread's children (`/proc/PID/task/TID/children`), a tree is walked from
/// its root, reading only its own processes; elsewhere every process of the
/// system is read once to learn who started whom.
///
/// ```no_run
/// let table = procluster::telemetry::ProcessTable::read();
/// if let Some(usage) = table.tree_usage(std::process::id()) {
///     println!("{} bytes resident, {} s of CPU", usage.rss_bytes, usage.cpu_seconds);
/// }
/// ```
#[derive(Debug, Default)]
pub struct ProcessTable {
    /// Every process, when the kernel does not list children.
    scanned: Option<Scan>,
}

#[derive(Debug, Default)]
struct Scan {
    stats: HashMap<u32, Stat>,
    children: HashMap<u32, Vec<u32>>,
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Children of `pid`, from its threads' `children` files.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return children;
    };
    for thread in threads.flatten() {
        if let Ok(text) = std::fs::read_to_string(thread.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    children
}

impl ProcessTable {
    /// Gets ready to read process trees (reading every process only where
    /// the kernel does not list children).
    pub fn read() -> Self {
        let me = std::process::id();
        let listed = std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists();
        Self {
            scanned: (!listed).then(Scan::read),
        }
    }

    /// `root` and its descendants (each once, even if the table is odd).
    fn tree(&self, root: u32) -> Vec<u32> {
        let mut seen = vec![root];
        let mut next = 0;
        while next < seen.len() {
            let pid = seen[next];
            next += 1;
            let children = match &self.scanned {
                Some(scan) => scan.children.get(&pid).cloned().unwrap_or_default(),
                None => children_of(pid),
            };
            for child in children {
                if !seen.contains(&child) {
                    seen.push(child);
                }
            }
        }
        seen
    }

    fn stat(&self, pid: u32) -> Option<Stat> {
        match &self.scanned {
            Some(scan) => scan.stats.get(&pid).copied(),
            None => read_stat(pid),
        }
    }

    /// The resident memory of `root`'s process tree in bytes (pages shared
    /// between its processes count once per process, as `ps` adds them up):
    /// the part of [`tree_usage`](Self::tree_usage) that costs no more
    /// reading. `None` when `root` is gone.
    pub fn tree_rss_bytes(&self, root: u32) -> Option<u64> {
        self.stat(root)?;
        let page = rustix::param::page_size() as u64;
        let pages = self
            .tree(root)
            .iter()
            .filter_map(|pid| self.stat(*pid))
            .map(|stat| stat.rss_pages)
            .sum::<u64>();
        Some(pages * page)
    }

    /// What the process tree of `root` uses now; `None` when `root` is gone.
    pub fn tree_usage(&self, root: u32) -> Option<TreeUsage> {
        if root == 0 {
            return None;
        }
        let root_stat = self.stat(root)?;
        let ticks_per_second = rustix::param::clock_ticks_per_second().max(1) as f64;
        let page = rustix::param::page_size() as u64;
        let mut usage = TreeUsage {
            uptime: boot_uptime()
                // Both sides count in hundredths of a second at best.
                .map(|up| {
                    ((up - root_stat.start as f64 / ticks_per_second) * 100.0).round() / 100.0
                })
                .map(|up| up.max(0.0))
                .unwrap_or(0.0),
            ..TreeUsage::default()
        };
        for pid in self.tree(root) {
            let Some(stat) = (if pid == root {
                Some(root_stat)
            } else {
                self.stat(pid)
            }) else {
                continue; // gone meanwhile
            };
            usage.processes += 1;
            usage.cpu_seconds += stat.ticks as f64 / ticks_per_second;
            usage.threads += stat.threads;
            usage.rss_bytes += stat.rss_pages * page;
            usage.open_fds += open_fds(pid);
        }
        Some(usage)
    }
}

impl Scan {
    fn read() -> Self {
        let mut scan = Self::default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return scan;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = read_stat(pid) {
                scan.children.entry(stat.ppid).or_default().push(pid);
                scan.stats.insert(pid, stat);
            }
        }
        scan
    }
}

/// A worker's process tree, added up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TreeUsage {
    /// CPU time, user and system, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory in bytes (pages shared between the tree's processes
    /// count once per process, as `ps` adds them up).
    pub rss_bytes: u64,
    /// Open descriptors.
    pub open_fds: u64,
    /// Threads.
    pub threads: u64,
    /// Processes: the worker and its descendants.
    pub processes: u64,
    /// Seconds since the worker process started.
    pub uptime: f64,
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Seconds since boot, from `/proc/uptime`.
fn boot_uptime() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Connections waiting to be accepted on each listening TCP socket, by the
/// socket's inode: the `rx_queue` column of `/proc/net/tcp` and
/// `/proc/net/tcp6`, which for a socket in `LISTEN` is its accept queue.
pub(crate) fn listen_queues() -> HashMap<u64, u64> {
    let mut queues = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            parse_listen_queues(&text, &mut queues);
        }
    }
    queues
}

fn parse_listen_queues(text: &str, out: &mut HashMap<u64, u64>) {
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local remote st tx:rx tr:when retrnsmt uid timeout inode
        if fields.len() < 10 || fields[3] != "0A" {
            continue;
        }
        let rx = fields[4]
            .split_once(':')
            .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok());
        if let (Some(rx), Ok(inode)) = (rx, fields[9].parse::<u64>()) {
            out.insert(inode, rx);
        }
    }
}

/// CPU use as a share of one core, from the change in CPU time between two
/// looks at least a second apart (the first look compares with the start of
/// the process).
#[derive(Debug, Default)]
pub struct CpuMeter {
    /// Per process: the last two looks (time, CPU seconds).
    seen: HashMap<u32, [(Instant, f64); 2]>,
}

/// Looks closer together than this compare with the look before.
const CPU_WINDOW: Duration = Duration::from_secs(1);

impl CpuMeter {
    /// Percent of one core used by the tree of `pid` lately (100 = one core
    /// busy); `uptime` and `cpu_seconds` come from [`TreeUsage`].
    pub fn percent(&mut self, pid: u32, cpu_seconds: f64, uptime: f64) -> f64 {
        let now = Instant::now();
        let started = now
            .checked_sub(Duration::from_secs_f64(uptime.max(0.0)))
            .unwrap_or(now);
        let looks = self
            .seen
            .entry(pid)
            .or_insert([(started, 0.0), (started, 0.0)]);
        if now.duration_since(looks[1].0) >= CPU_WINDOW {
            looks[0] = looks[1];
            looks[1] = (now, cpu_seconds);
        }
        let (then, cpu_then) = looks[0];
        let elapsed = now.duration_since(then).as_secs_f64();
        if elapsed <= 0.0 {
            return 0.0;
        }
        ((cpu_seconds - cpu_then).max(0.0) / elapsed * 100.0).max(0.0)
    }

    /// Forgets processes not in `alive`.
    pub fn retain(&mut self, alive: &[u32]) {
        self.seen.retain(|pid, _| alive.contains(pid));
    }
}

/// CPU use and memory of one process tree, in one call (to measure
/// several, read a [`ProcessTable`] once).
pub fn tree_usage(pid: u32) -> Option<TreeUsage> {
    ProcessTable::read().tree_usage(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trees_memory_counts_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        // The child shows in /proc with pages of its own once it has run
        // after its exec, and its figures settle once it sleeps: on a loaded
        // machine that takes a moment, so read until the sum holds.
        let page = rustix::param::page_size() as u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let table = loop {
            let table = ProcessTable::read();
            let tree = table.tree_rss_bytes(me).unwrap();
            let own = table.stat(me).unwrap().rss_pages * page;
            let child_rss = table.stat(child.id()).map_or(0, |s| s.rss_pages);
            if child_rss > 0 && tree == own + child_rss * page {
                break table;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the tree's memory is its own and its one child's: {tree} != {own} + {child_rss} pages"
            );
            std::thread::yield_now();
        };
        assert_eq!(table.tree_rss_bytes(u32::MAX - 1), None);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 98765 123456789 2048 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                ppid: 1,
                ticks: 300,
                threads: 7,
                start: 98765,
                rss_pages: 2048
            }
        );
    }

    #[test]
    fn listening_sockets_report_their_queue() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000005 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000003 00:00000000 00000000     0        0 4343 1\n";
        let mut queues = HashMap::new();
        parse_listen_queues(text, &mut queues);
        assert_eq!(queues, HashMap::from([(4242, 5)]));
    }

    #[test]
    fn both_ways_of_reading_trees_agree_on_a_tree_with_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let walked = ProcessTable { scanned: None };
        let scanned = ProcessTable {
            scanned: Some(Scan::read()),
        };
        for table in [&walked, &scanned] {
            let tree = table.tree(me);
            assert!(tree.contains(&child.id()), "{tree:?}");
            assert_eq!(tree[0], me);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn this_process_tree_is_measured() {
        let usage = tree_usage(std::process::id()).expect("this process");
        assert!(usage.processes >= 1 && usage.threads >= 1);
        assert!(usage.rss_bytes > 0 && usage.open_fds >= 3);
    }

    #[test]
    fn cpu_percent_compares_looks_a_second_apart() {
        let mut meter = CpuMeter::default();
        // 10 s old, 5 s of CPU: half a core on average.
        let first = meter.percent(1, 5.0, 10.0);
        assert!((first - 50.0).abs() < 1.0, "{first}");
    }
}
