//! `procluster-bench scale`: one primary with many workers under the usual
//! open-file limit of a login shell (soft 1024), for the library (the
//! `hello` example) and the command (`procluster run`).
//!
//! Each primary starts under `sh -c 'ulimit -Sn LIMIT; exec …'`, so it must
//! raise its own limit to get there. Measured: the time until every worker
//! is ready, the primary's CPU while idle, its RSS and descriptors, the
//! time a `procluster status` takes (the command only), and the time from
//! the stop request to the primary's exit with every worker gone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::http::target_dir;
use crate::report::{Row, print_table, to_json};

type BenchError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Workers per primary.
    #[arg(long, default_value_t = 1024)]
    workers: usize,
    /// The soft RLIMIT_NOFILE each primary starts with.
    #[arg(long, default_value_t = 1024)]
    soft_limit: u64,
    /// `procluster status` calls timed (the command only).
    #[arg(long, default_value_t = 30)]
    status_calls: usize,
    /// How long the idle primary's CPU is measured.
    #[arg(long, default_value_t = 5)]
    idle_seconds: u64,
    /// Skip the library's run (the hello example).
    #[arg(long)]
    no_hello: bool,
    /// Skip the command's run.
    #[arg(long)]
    no_cli: bool,
    /// Where `procluster` and `examples/hello` are [default: beside this
    /// binary]; another build's, to compare.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

impl ScaleArgs {
    fn bin_dir(&self) -> PathBuf {
        self.bin_dir.clone().unwrap_or_else(target_dir)
    }
}

/// What one primary's run measured.
struct Figures {
    ready: Duration,
    idle_cpu_percent: f64,
    rss_mb: f64,
    fds: usize,
    status_p50: Option<Duration>,
    status_max: Option<Duration>,
    stop: Duration,
}

/// A primary that is stopped and reaped however the run ends.
struct Primary {
    child: Child,
    name: &'static str,
}

impl Drop for Primary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), rustix::process::Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// `program args…` under a soft open-file limit of `limit`.
fn limited(limit: u64, program: &Path, args: &[String]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -Sn {limit} && exec \"$0\" \"$@\""))
        .arg(program)
        .args(args)
        .stdin(Stdio::null());
    command
}

/// User plus system CPU time of a process, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

fn idle_cpu_percent(pid: u32, over: Duration) -> Result<f64, BenchError> {
    let before = cpu_time(pid).ok_or("no /proc stat for the primary")?;
    let start = Instant::now();
    std::thread::sleep(over);
    let after = cpu_time(pid).ok_or("no /proc stat for the primary")?;
    Ok((after - before).as_secs_f64() / start.elapsed().as_secs_f64() * 100.0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = &stat[stat.rfind(')')? + 2..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .count()
}

/// Waits for the primary to exit; how long since `from`.
fn wait_exit(primary: &mut Primary, from: Instant) -> Result<Duration, BenchError> {
    let deadline = from + Duration::from_secs(60);
    loop {
        if primary.child.try_wait()?.is_some() {
            return Ok(from.elapsed());
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not stop within 60 s", primary.name).into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn hello(args: &ScaleArgs) -> Result<Figures, BenchError> {
    let program = args.bin_dir().join("examples/hello");
    if !program.exists() {
        return Err(format!(
            "{} is missing: cargo build --release -p procluster --example hello",
            program.display()
        )
        .into());
    }
    let hello_args = [
        "--workers",
        &args.workers.to_string(),
        "--port",
        "0",
        "--policy",
        "shared",
    ]
    .map(String::from);
    let started = Instant::now();
    let child = limited(args.soft_limit, &program, &hello_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut primary = Primary {
        child,
        name: "the hello example",
    };
    let stdout = primary.child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("listening on http://") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(300))
        .map_err(|_| "the hello example's workers did not all listen within 300 s")?;
    let ready = started.elapsed();
    let pid = primary.child.id();
    let idle_cpu_percent = idle_cpu_percent(pid, Duration::from_secs(args.idle_seconds))?;
    let rss_mb = crate::supervision::rss_bytes(pid).unwrap_or(0) as f64 / f64::from(1 << 20);
    let fds = open_fds(pid);
    let workers = children(pid);
    if workers < args.workers {
        return Err(format!("only {workers} of {} workers run", args.workers).into());
    }
    let stop_at = Instant::now();
    signal(pid, rustix::process::Signal::TERM);
    let stop = wait_exit(&mut primary, stop_at)?;
    Ok(Figures {
        ready,
        idle_cpu_percent,
        rss_mb,
        fds,
        status_p50: None,
        status_max: None,
        stop,
    })
}

/// `procluster ARGS --control PATH`, its stdout.
fn procluster(binary: &Path, control: &Path, args: &[&str]) -> Result<String, BenchError> {
    let out = Command::new(binary)
        .args(args)
        .arg("--control")
        .arg(control)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!("procluster {args:?} failed: {:?}", out.status).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ready_workers(binary: &Path, control: &Path) -> Option<usize> {
    let status = procluster(binary, control, &["status", "--json"]).ok()?;
    let status: serde_json::Value = serde_json::from_str(&status).ok()?;
    Some(
        status["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["state"] == "ready")
            .count(),
    )
}

fn cli(args: &ScaleArgs) -> Result<Figures, BenchError> {
    let binary = args.bin_dir().join("procluster");
    if !binary.exists() {
        return Err(format!(
            "{} is missing: cargo build --release -p procluster-cli",
            binary.display()
        )
        .into());
    }
    let dir = std::env::temp_dir().join(format!("procluster-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let control: PathBuf = dir.join("control.sock");
    let run_args: Vec<String> = [
        "run",
        "-w",
        &args.workers.to_string(),
        "-l",
        "127.0.0.1:0",
        "--control",
        control.to_str().ok_or("temp dir is not UTF-8")?,
        "--",
        "sleep",
        "1000000",
    ]
    .map(String::from)
    .to_vec();
    let started = Instant::now();
    let child = limited(args.soft_limit, &binary, &run_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut primary = Primary {
        child,
        name: "procluster run",
    };
    let deadline = started + Duration::from_secs(300);
    loop {
        if ready_workers(&binary, &control) == Some(args.workers) {
            break;
        }
        if Instant::now() > deadline {
            return Err("procluster run's workers were not all ready within 300 s".into());
        }
        if primary.child.try_wait()?.is_some() {
            return Err("procluster run exited before its workers were ready".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready = started.elapsed();
    let pid = primary.child.id();
    let idle_cpu_percent = idle_cpu_percent(pid, Duration::from_secs(args.idle_seconds))?;
    let rss_mb = crate::supervision::rss_bytes(pid).unwrap_or(0) as f64 / f64::from(1 << 20);
    let fds = open_fds(pid);
    let mut calls = Vec::with_capacity(args.status_calls);
    for _ in 0..args.status_calls {
        let at = Instant::now();
        procluster(&binary, &control, &["status", "--json"])?;
        calls.push(at.elapsed());
    }
    calls.sort_unstable();
    let stop_at = Instant::now();
    procluster(&binary, &control, &["stop"])?;
    let stop = wait_exit(&mut primary, stop_at)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Figures {
        ready,
        idle_cpu_percent,
        rss_mb,
        fds,
        status_p50: calls.get(calls.len() / 2).copied(),
        status_max: calls.last().copied(),
        stop,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rows_of(name: &str, workers: usize, figures: &Figures, rows: &mut Vec<Row>) {
    let lower = |label: &str, unit, value| Row::compared(label, unit, value, None, false);
    rows.push(lower(
        &format!("{name}: all {workers} workers ready"),
        "ms",
        ms(figures.ready),
    ));
    rows.push(lower(
        &format!("{name}: idle primary CPU"),
        "% of a core",
        figures.idle_cpu_percent,
    ));
    rows.push(lower(&format!("{name}: primary RSS"), "MB", figures.rss_mb));
    rows.push(lower(
        &format!("{name}: primary descriptors per worker"),
        "fds",
        figures.fds as f64 / workers as f64,
    ));
    if let (Some(p50), Some(max)) = (figures.status_p50, figures.status_max) {
        rows.push(lower(
            &format!("{name}: `procluster status` p50"),
            "ms",
            ms(p50),
        ));
        rows.push(lower(
            &format!("{name}: `procluster status` max"),
            "ms",
            ms(max),
        ));
    }
    rows.push(lower(
        &format!("{name}: stop → primary exited"),
        "ms",
        ms(figures.stop),
    ));
}

fn targets_of(name: &str, figures: &Figures, targets: &mut Vec<(String, bool)>) {
    targets.push((
        format!("{name}: idle primary ≤ 1% CPU"),
        figures.idle_cpu_percent <= 1.0,
    ));
    targets.push((
        format!("{name}: stop ≤ 1 s"),
        figures.stop <= Duration::from_secs(1),
    ));
    if let Some(p50) = figures.status_p50 {
        targets.push((
            format!("{name}: status ≤ 50 ms"),
            p50 <= Duration::from_millis(50),
        ));
    }
}

pub fn run(args: ScaleArgs) -> Result<(), BenchError> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    if !args.no_hello {
        let figures = hello(&args)?;
        rows_of("hello example", args.workers, &figures, &mut rows);
        targets_of("hello example", &figures, &mut targets);
    }
    if !args.no_cli {
        let figures = cli(&args)?;
        rows_of("procluster run", args.workers, &figures, &mut rows);
        targets_of("procluster run", &figures, &mut targets);
    }
    println!(
        "{} workers per primary, each primary started with a soft open-file limit of {}",
        args.workers, args.soft_limit
    );
    print_table(&rows, "value", "-");
    for (name, met) in &targets {
        println!("target {}: {name}", if *met { "MET   " } else { "MISSED" });
    }
    let targets_json: Vec<_> = targets
        .iter()
        .map(|(name, met)| serde_json::json!({ "target": name, "met": met }))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "bench": "scale", "workers": args.workers, "soft_limit": args.soft_limit,
            "rows": to_json(&rows), "targets": targets_json,
        })
    );
    Ok(())
}
