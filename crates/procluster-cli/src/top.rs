//! `procluster top`: a live view of a running cluster over its control
//! socket. Per worker slot: id, pid, state, uptime, restarts, CPU %,
//! memory, connections per second; the totals; the latest output lines.
//! Keys: `r` reload, `+`/`-` scale by one, `q` quit. Fits 80×24 and drops
//! columns and panes on smaller terminals.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line as TextLine;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::args::{ClientArgs, Scale};
use crate::control::logs::LogsQuery;
use crate::control::{Request, client};
use crate::recent::Line;

/// `procluster top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// How often the view is refreshed.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::args::parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Output lines kept for the view.
const LOG_LINES: usize = 200;

/// What the view shows.
#[derive(Debug, Default)]
pub struct Model {
    /// The last `status` answer.
    pub status: Option<Value>,
    /// Why the last status could not be read.
    pub error: Option<String>,
    /// The latest output lines, oldest first.
    pub logs: VecDeque<Line>,
    /// What the last key did.
    pub notice: Option<String>,
}

impl Model {
    fn push_log(&mut self, line: Line) {
        self.logs.push_back(line);
        while self.logs.len() > LOG_LINES {
            self.logs.pop_front();
        }
    }
}

/// Formats bytes as `12.3M`.
fn bytes(n: Option<u64>) -> String {
    let Some(n) = n else { return "-".into() };
    let units = ["B", "K", "M", "G", "T"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", units[unit])
    }
}

/// Formats seconds as `3d4h`, `2h05m`, `4m07s` or `12s`.
fn uptime(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds else {
        return "-".into();
    };
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Draws the whole view.
pub fn draw(frame: &mut Frame<'_>, model: &Model) {
    let area = frame.area();
    let workers: Vec<&Value> = model
        .status
        .as_ref()
        .and_then(|s| s["workers"].as_array())
        .map(|w| w.iter().collect())
        .unwrap_or_default();
    // Header 1, table (its header, rows, totals, borders), footer 1; the
    // logs pane takes what is left, if anything worth it.
    let table_height = (workers.len() as u16 + 4).min(area.height.saturating_sub(2).max(3));
    let show_logs = area.height >= table_height + 2 + 4;
    let constraints = if show_logs {
        vec![
            Constraint::Length(1),
            Constraint::Length(table_height),
            Constraint::Min(3),
            Constraint::Length(1),
        ]
    } else {
        vec![
            Constraint::Length(1),
            Constraint::Min(0),
            Constraint::Length(1),
        ]
    };
    let parts = Layout::vertical(constraints).split(area);
    draw_header(frame, parts[0], model);
    draw_workers(frame, parts[1], &workers);
    if show_logs {
        draw_logs(frame, parts[2], model);
    }
    let footer = parts[parts.len() - 1];
    let keys = "r reload  + add  - remove  q quit";
    let text = match &model.notice {
        Some(notice) => format!("{keys}  | {notice}"),
        None => keys.to_string(),
    };
    frame.render_widget(
        Paragraph::new(text).style(Style::default().add_modifier(Modifier::REVERSED)),
        footer,
    );
}

fn draw_header(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let text = match (&model.status, &model.error) {
        (_, Some(error)) => format!("procluster top: {error}"),
        (Some(status), None) => {
            let mut text = format!(
                "procluster {}  pid {}  workers {}/{}  gen {}",
                status["name"].as_str().unwrap_or("?"),
                status["pid"],
                status["workers"].as_array().map_or(0, Vec::len),
                status["desired"],
                status["generation"],
            );
            if status["reloading"] == true {
                text.push_str("  RELOADING");
            }
            if status["breaker_tripped"] == true {
                text.push_str("  BREAKER TRIPPED");
            }
            text
        }
        (None, None) => "procluster top: connecting...".into(),
    };
    frame.render_widget(
        Paragraph::new(text).style(Style::default().add_modifier(Modifier::BOLD)),
        area,
    );
}

/// The columns, widest view first; narrower terminals drop from the end of
/// `optional`.
const COLUMNS: [(&str, u16); 9] = [
    ("SLOT", 4),
    ("ID", 5),
    ("PID", 8),
    ("STATE", 8),
    ("CPU%", 6),
    ("MEM", 7),
    ("UPTIME", 7),
    ("RESTARTS", 8),
    ("CONN/S", 7),
];

fn draw_workers(frame: &mut Frame<'_>, area: Rect, workers: &[&Value]) {
    // Columns that fit, each with a space between.
    let mut shown = 0;
    let mut width = 2;
    for (_, w) in COLUMNS {
        if width + w + 1 > area.width {
            break;
        }
        width += w + 1;
        shown += 1;
    }
    let shown = shown.max(4);
    let mut sorted = workers.to_vec();
    sorted.sort_by_key(|w| (w["index"].as_u64(), w["id"].as_u64()));
    let mut rows: Vec<Row<'_>> = sorted
        .iter()
        .map(|w| {
            let cells = [
                cell(&w["index"]),
                cell(&w["id"]),
                cell(&w["pid"]),
                cell(&w["state"]),
                w["cpu_percent"]
                    .as_f64()
                    .map_or("-".into(), |p| format!("{p:.1}")),
                bytes(w["rss_bytes"].as_u64()),
                uptime(w["uptime_s"].as_f64()),
                cell(&w["restarts"]),
                w["connections_per_s"]
                    .as_f64()
                    .map_or("-".into(), |c| format!("{c:.0}")),
            ];
            Row::new(cells.into_iter().take(shown).collect::<Vec<_>>())
        })
        .collect();
    let cpu: f64 = workers
        .iter()
        .filter_map(|w| w["cpu_percent"].as_f64())
        .sum();
    let mem: u64 = workers.iter().filter_map(|w| w["rss_bytes"].as_u64()).sum();
    let restarts: u64 = workers.iter().filter_map(|w| w["restarts"].as_u64()).sum();
    let totals = [
        "all".to_string(),
        String::new(),
        String::new(),
        format!("{} up", workers.len()),
        format!("{cpu:.1}"),
        bytes(Some(mem)),
        String::new(),
        restarts.to_string(),
        String::new(),
    ];
    rows.push(
        Row::new(totals.into_iter().take(shown).collect::<Vec<_>>())
            .style(Style::default().add_modifier(Modifier::BOLD)),
    );
    let header = Row::new(COLUMNS.iter().take(shown).map(|(name, _)| *name))
        .style(Style::default().add_modifier(Modifier::BOLD));
    let widths: Vec<Constraint> = COLUMNS
        .iter()
        .take(shown)
        .map(|(_, w)| Constraint::Length(*w))
        .collect();
    let table = Table::new(rows, widths).header(header).block(
        Block::default()
            .borders(Borders::TOP | Borders::BOTTOM)
            .title(" workers "),
    );
    frame.render_widget(table, area);
}

fn draw_logs(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let inner_height = area.height.saturating_sub(1) as usize;
    let start = model.logs.len().saturating_sub(inner_height);
    let lines: Vec<TextLine<'_>> = model
        .logs
        .iter()
        .skip(start)
        .map(|l| TextLine::from(l.text()))
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::TOP).title(" output ")),
        area,
    );
}

/// What the view reacts to.
enum Input {
    Key(char),
    Status(Result<Value, String>),
    Log(Line),
    Notice(String),
    Resize,
}

/// `procluster top`.
pub async fn top(args: TopArgs) -> ExitCode {
    let path = client::socket_path(&args.client);
    // Fail before taking over the terminal when nobody answers.
    if let Err(error) = client::call(&path, &Request::Status).await {
        eprintln!("procluster: {error}");
        return ExitCode::from(client::NOT_RUNNING);
    }
    let (tx, mut inputs) = mpsc::unbounded_channel();
    spawn_status(path.clone(), args.interval, tx.clone());
    spawn_logs(path.clone(), tx.clone());
    let keys_done = Arc::new(Mutex::new(false));
    spawn_keys(tx.clone(), keys_done.clone());
    let mut terminal = ratatui::init();
    let mut model = Model::default();
    let mut result = ExitCode::SUCCESS;
    loop {
        if let Err(error) = terminal.draw(|f| draw(f, &model)) {
            ratatui::restore();
            eprintln!("procluster: cannot draw: {error}");
            result = ExitCode::FAILURE;
            break;
        }
        let Some(input) = inputs.recv().await else {
            break;
        };
        match input {
            Input::Key('q') => break,
            Input::Key('r') => {
                model.notice = Some("reload requested".into());
                act(&path, Request::Reload { wait: false }, tx.clone());
            }
            Input::Key('+') => {
                act(
                    &path,
                    Request::Scale {
                        scale: Scale::Add(1),
                    },
                    tx.clone(),
                );
            }
            Input::Key('-') => {
                act(
                    &path,
                    Request::Scale {
                        scale: Scale::Remove(1),
                    },
                    tx.clone(),
                );
            }
            Input::Key(_) | Input::Resize => {}
            Input::Status(Ok(status)) => {
                model.status = Some(status);
                model.error = None;
            }
            Input::Status(Err(error)) => model.error = Some(error),
            Input::Log(line) => model.push_log(line),
            Input::Notice(notice) => model.notice = Some(notice),
        }
    }
    *keys_done.lock().unwrap_or_else(|e| e.into_inner()) = true;
    ratatui::restore();
    result
}

/// Sends a request and shows its answer.
fn act(path: &std::path::Path, request: Request, tx: mpsc::UnboundedSender<Input>) {
    let path = path.to_path_buf();
    tokio::spawn(async move {
        let notice = match client::call(&path, &request).await {
            Ok(response) if response.ok => response.message.unwrap_or_else(|| "done".into()),
            Ok(response) => response.error.unwrap_or_else(|| "refused".into()),
            Err(error) => error,
        };
        let _ = tx.send(Input::Notice(notice));
    });
}

fn spawn_status(path: PathBuf, every: Duration, tx: mpsc::UnboundedSender<Input>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
        loop {
            ticks.tick().await;
            let status = match client::call(&path, &Request::Status).await {
                Ok(response) if response.ok => Ok(response.status.unwrap_or_default()),
                Ok(response) => Err(response.error.unwrap_or_default()),
                Err(error) => Err(error),
            };
            if tx.send(Input::Status(status)).is_err() {
                return;
            }
        }
    });
}

fn spawn_logs(path: PathBuf, tx: mpsc::UnboundedSender<Input>) {
    tokio::spawn(async move {
        let query = LogsQuery {
            follow: true,
            worker: None,
            slot: None,
            lines: 50,
        };
        let _ = crate::control::logs::stream(&path, query, |line| {
            tx.send(Input::Log(line.clone())).is_ok()
        })
        .await;
    });
}

/// Reads keys on a thread of its own (the terminal's reads block).
fn spawn_keys(tx: mpsc::UnboundedSender<Input>, done: Arc<Mutex<bool>>) {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    std::thread::spawn(move || {
        while !*done.lock().unwrap_or_else(|e| e.into_inner()) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => return,
            }
            let input = match event::read() {
                Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => match key.code {
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                        Input::Key('q')
                    }
                    KeyCode::Char(c) => Input::Key(c),
                    KeyCode::Esc => Input::Key('q'),
                    _ => continue,
                },
                Ok(Event::Resize(..)) => Input::Resize,
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(input).is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn model(workers: usize) -> Model {
        let workers: Vec<Value> = (0..workers)
            .map(|i| {
                serde_json::json!({
                    "id": i + 1, "index": i, "pid": 4000 + i, "state": "ready",
                    "restarts": i, "uptime_s": 3725.0, "cpu_percent": 12.5,
                    "rss_bytes": 50 * 1024 * 1024,
                })
            })
            .collect();
        let mut model = Model {
            status: Some(serde_json::json!({
                "name": "web", "pid": 100, "desired": workers.len(), "generation": 2,
                "reloading": false, "breaker_tripped": false, "workers": workers,
            })),
            ..Model::default()
        };
        for n in 0..30 {
            model.push_log(Line {
                ts: String::new(),
                worker: 1,
                index: Some(0),
                pid: 4000,
                stream: "stdout".into(),
                line: format!("request {n}"),
            });
        }
        model
    }

    fn render(width: u16, height: u16, model: &Model) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, model)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect()
    }

    #[test]
    fn the_view_fits_80_by_24_with_every_column_totals_and_output() {
        let screen = render(80, 24, &model(4));
        let text = screen.join("\n");
        assert!(
            screen[0].contains("procluster web  pid 100  workers 4/4  gen 2"),
            "{text}"
        );
        for column in [
            "SLOT", "PID", "STATE", "CPU%", "MEM", "UPTIME", "RESTARTS", "CONN/S",
        ] {
            assert!(text.contains(column), "{column} missing:\n{text}");
        }
        for pid in 4000..4004 {
            assert!(text.contains(&pid.to_string()), "{text}");
        }
        assert!(text.contains("50.0M") && text.contains("1h02m"), "{text}");
        assert!(
            text.contains("all") && text.contains("4 up") && text.contains("200.0M"),
            "{text}"
        );
        assert!(
            text.contains("[worker 1] request 29"),
            "latest output shown:\n{text}"
        );
        assert!(
            screen[23].contains("r reload") && screen[23].contains("q quit"),
            "{text}"
        );
    }

    #[test]
    fn a_small_terminal_keeps_the_essentials() {
        let screen = render(40, 8, &model(4));
        let text = screen.join("\n");
        assert!(
            text.contains("SLOT") && text.contains("PID") && text.contains("STATE"),
            "{text}"
        );
        assert!(
            !text.contains("RESTARTS"),
            "narrow: columns dropped\n{text}"
        );
        assert!(!text.contains("output"), "short: no output pane\n{text}");
        assert!(screen[7].contains("q quit"), "{text}");
        // Tiny still draws.
        render(10, 3, &model(2));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(Some(512)), "512B");
        assert_eq!(bytes(Some(3 * 1024 * 1024 / 2)), "1.5M");
        assert_eq!(uptime(Some(59.0)), "59s");
        assert_eq!(uptime(Some(90_000.0)), "1d1h");
    }
}
