//! The command's observability: `--metrics`, `logs` (with `-f`), `status`
//! with CPU and memory, and `top` in a real terminal.

use super::*;

/// A worker that prints `tick ID N` every 20 ms.
const TICKER: &str = "import os, time\nw = os.environ['PROCLUSTER_WORKER_ID']\ni = 0\nwhile True:\n    print('tick %s %d' % (w, i), flush=True)\n    i += 1\n    time.sleep(0.02)\n";

async fn tickers(extra: &[&str]) -> Run {
    let mut args = vec!["-w", "2", "-l", "web=127.0.0.1:0"];
    args.extend_from_slice(extra);
    let run = Run::start(&args, &["python3", "-c", TICKER], &[]).await;
    run.until_ready(2).await;
    // Both workers have printed: the slot filters below find lines of each.
    let status = run.try_status().await.expect("status");
    for worker in status["workers"].as_array().unwrap() {
        run.printed(&format!("tick {} ", worker["id"]), 5).await;
    }
    run
}

/// `(worker, n)` of a `[worker W] tick W N` line.
fn tick(line: &str) -> Option<(u32, u64)> {
    let rest = line.split("tick ").nth(1)?;
    let mut words = rest.split(' ');
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

#[tokio::test]
async fn logs_prints_recent_lines_by_worker_or_slot_and_follows_a_running_cluster() {
    let run = tickers(&[]).await;
    let (code, out, err) = run.ctl(&["logs", "-n", "5"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("[worker ") && tick(l).is_some()),
        "{out}"
    );

    let (code, out, _) = run.ctl(&["logs", "-n", "3", "--slot", "1", "--json"]).await;
    assert_eq!(code, 0);
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{out}");
    assert!(
        records
            .iter()
            .all(|r| r["index"] == 1 && r["stream"] == "stdout"),
        "{out}"
    );
    let last_backlog = tick(records[2]["line"].as_str().unwrap()).unwrap();

    // Following: new lines keep coming, in order per worker.
    let mut follower = Command::new(procluster())
        .args(["logs", "-f", "-n", "0", "--slot", "1", "--control"])
        .arg(&run.control)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("followed lines keep coming")
            .unwrap()
            .expect("the follower's output goes on");
        seen.push(tick(&line).unwrap_or_else(|| panic!("not a tick: {line}")));
    }
    assert!(seen.iter().all(|(w, _)| *w == last_backlog.0), "{seen:?}");
    assert!(
        seen.windows(2).all(|p| p[1].1 == p[0].1 + 1),
        "in order, none lost: {seen:?}"
    );
    assert!(
        seen[0].1 > last_backlog.1,
        "{seen:?} after {last_backlog:?}"
    );
    follower.kill().await.unwrap();
    run.ctl(&["stop"]).await;
}

/// The address of the command's metrics endpoint, from its log.
fn metrics_addr(run: &Run) -> std::net::SocketAddr {
    let address = run
        .stderr
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| {
            l.split("address=http://")
                .nth(1)
                .map(|a| a.trim_end_matches("/metrics").to_string())
        })
        .unwrap_or_else(|| panic!("the metrics address is logged\n{}", run.output()));
    address.parse().unwrap()
}

/// One scrape of the command's metrics endpoint.
async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let answer = procluster_tests::telemetry::http_get(addr, "/metrics", None).await;
    assert_eq!(answer.status, 200);
    prometheus_parse::Scrape::parse(answer.body.lines().map(|l| Ok(l.to_string())))
        .expect("a Prometheus scrape")
}

/// The value of the first sample of `name` with `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_and_status_show_each_workers_cpu_and_memory() {
    let mut run = tickers(&["--metrics", "127.0.0.1:0"]).await;
    let addr = metrics_addr(&run);
    let scrape = scrape(addr).await;
    let sample = |name: &str, labels: &[(&str, &str)]| sample(&scrape, name, labels);
    assert_eq!(sample("procluster_workers_ready", &[]), Some(2.0));
    for slot in ["0", "1"] {
        let rss = sample("procluster_worker_resident_memory_bytes", &[("slot", slot)]).unwrap();
        assert!(rss > 1_000_000.0, "a Python worker's memory: {rss}");
    }
    assert_eq!(
        sample("procluster_listen_queue_depth", &[("listener", "web")]),
        Some(0.0)
    );
    assert_eq!(
        procluster_tests::telemetry::http_get(addr, "/readyz", None)
            .await
            .status,
        200
    );
    let status = run.try_status().await.unwrap();
    for worker in status["workers"].as_array().unwrap() {
        assert!(worker["cpu_percent"].as_f64().is_some(), "{worker}");
        assert!(
            worker["rss_bytes"].as_u64().unwrap() > 1_000_000,
            "{worker}"
        );
    }
    let (_, human, _) = run.ctl(&["status"]).await;
    assert!(
        human.contains("cpu%") && human.contains("memory"),
        "{human}"
    );
    run.ctl(&["stop"]).await;
    assert_eq!(run.exit_code().await, 0);
}

#[tokio::test]
async fn each_reuseport_slots_queue_is_reported() {
    let mut run = tickers(&["--metrics", "127.0.0.1:0", "--policy", "reuseport"]).await;
    let scrape = scrape(metrics_addr(&run)).await;
    for slot in ["0", "1"] {
        assert_eq!(
            sample(
                &scrape,
                "procluster_listen_queue_depth",
                &[("listener", "web"), ("slot", slot)]
            ),
            Some(0.0),
            "slot {slot}'s queue"
        );
    }
    run.ctl(&["stop"]).await;
    assert_eq!(run.exit_code().await, 0);
}

/// Runs `tmux -L SOCKET ARGS`.
fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("tmux")
        .arg("-L")
        .arg(socket)
        .args(args)
        .output()
        .expect("run tmux")
}

#[tokio::test]
async fn top_runs_in_a_real_terminal_and_scales_with_a_key() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "tmux is required (.ci/run installs it)"
        );
        eprintln!("skipped: tmux is not installed");
        return;
    }
    let run = tickers(&[]).await;
    let socket = format!("procluster-top-{}", std::process::id());
    let command = format!(
        "{} top --control {}",
        procluster().display(),
        run.control.display()
    );
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "80",
            "-y",
            "24",
            &command,
        ],
    );
    assert!(started.status.success(), "{started:?}");
    let screen = || {
        String::from_utf8_lossy(&tmux(&socket, &["capture-pane", "-p", "-t", "top"]).stdout)
            .into_owned()
    };
    let status = run.try_status().await.unwrap();
    let pids: Vec<String> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].to_string())
        .collect();
    eventually("top shows both workers and their output", || {
        let screen = screen();
        pids.iter().all(|p| screen.contains(p.as_str()))
            && screen.contains("CPU%")
            && screen.contains("[worker ")
    })
    .await;
    tmux(&socket, &["send-keys", "-t", "top", "+"]);
    eventually("top shows a third worker", || {
        screen().contains("workers 3/3")
    })
    .await;
    run.status_until("3 workers", |s| s["workers"].as_array().unwrap().len() == 3)
        .await;
    tmux(&socket, &["send-keys", "-t", "top", "q"]);
    eventually("top quits on q", || {
        !tmux(&socket, &["has-session", "-t", "top"])
            .status
            .success()
    })
    .await;
    tmux(&socket, &["kill-server"]);
    run.ctl(&["stop"]).await;
}
