//! Memory use of a worker process, read from `/proc`.

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
    fn own_process_uses_some_memory() {
        let rss = resident_bytes(std::process::id()).expect("VmRSS of this process");
        assert!(rss > 100 * 1024, "{rss} bytes");
    }
}
