//! Memory use of a worker, read from `/proc`: its process and every
//! process it started (a program that forks workers of its own, such as
//! gunicorn's arbiter, is measured whole).

use std::collections::HashMap;

/// The resident set size of process `pid` in bytes, from the `VmRSS` line
/// of `/proc/PID/status`: the same number as the second field of
/// `/proc/PID/statm`, but in kB rather than pages, so no page size (and no
/// `sysconf`) is needed. `None` when the process is gone or there is no
/// `/proc`.
pub(super) fn resident_bytes(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// The resident set size of each process of `roots` plus all its
/// descendants, in bytes, from one walk of `/proc`. Pages shared between
/// the processes of a tree (a forking server's copy-on-write memory) count
/// once per process, as `ps` adds them up: an upper bound. A root that is
/// gone has no entry.
pub(super) fn tree_resident_bytes(roots: &[u32]) -> HashMap<u32, u64> {
    let children = children_by_parent();
    roots
        .iter()
        .filter_map(|&root| {
            let own = resident_bytes(root)?;
            let mut total = own;
            let mut stack: Vec<u32> = children.get(&root).cloned().unwrap_or_default();
            let mut seen = 0usize;
            while let Some(pid) = stack.pop() {
                seen += 1;
                if seen > 100_000 {
                    break;
                }
                total += resident_bytes(pid).unwrap_or(0);
                if let Some(more) = children.get(&pid) {
                    stack.extend_from_slice(more);
                }
            }
            Some((root, total))
        })
        .collect()
}

/// Every process's children, from the parent pid in `/proc/PID/stat`.
fn children_by_parent() -> HashMap<u32, Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(parent) = parent_of(&stat) {
            children.entry(parent).or_default().push(pid);
        }
    }
    children
}

/// The parent pid: the second field after the command name, which is in
/// parentheses and may itself contain spaces and parentheses.
fn parent_of(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthread\n"), None);
    }

    #[test]
    fn the_parent_pid_follows_the_command_name() {
        assert_eq!(parent_of("42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parent_of("42 (sh) S 1 42"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn a_tree_weighs_at_least_its_root_and_counts_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let tree = tree_resident_bytes(&[me, u32::MAX - 1]);
        let own = resident_bytes(me).unwrap();
        let child_rss = resident_bytes(child.id()).unwrap_or(0);
        assert!(
            tree[&me] >= own + child_rss / 2,
            "{tree:?} own {own} child {child_rss}"
        );
        assert!(!tree.contains_key(&(u32::MAX - 1)));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn own_process_uses_some_memory() {
        let rss = resident_bytes(std::process::id()).expect("VmRSS of this process");
        assert!(rss > 100 * 1024, "{rss} bytes");
    }
}
