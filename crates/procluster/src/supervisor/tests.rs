//! Scenario tests: the supervisor driven by a fake shell with a fake clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::*;
use crate::{ExitStatus, Signal, WorkerId};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// What a freshly spawned fake worker does.
#[derive(Clone, Copy, Debug)]
enum Boot {
    /// Reports ready after the delay (zero: at once).
    Ready(Duration),
    /// Exits with code 1 right after spawning.
    Crash,
    /// Never reports ready.
    Never,
}

#[derive(Clone, Copy, Debug)]
struct Proc {
    slot: usize,
    generation: Generation,
    ready: bool,
}

#[derive(Debug)]
enum Action {
    Ready(WorkerId),
    Exit(WorkerId, ExitStatus),
}

/// Fake IO shell: executes commands against simulated processes.
struct Shell {
    sup: Supervisor,
    base: Instant,
    now: Instant,
    next_id: u32,
    alive: BTreeMap<WorkerId, Proc>,
    scheduled: Vec<(Instant, Action)>,
    commands: Vec<(Duration, Command)>,
    events: Vec<(Duration, Event)>,
    max_alive: usize,
    ticks: usize,
    boot: Box<dyn Fn(usize, Generation) -> Boot>,
    /// `None`: workers ignore Disconnect.
    disconnect_exit: Option<Duration>,
    /// Assert that a Disconnect only hits a worker whose slot has another
    /// ready worker (new-first handover).
    check_handover: bool,
    /// Spawns for these slots fail for lack of resources (`EMFILE`).
    short_of_files: Vec<usize>,
}

impl Shell {
    fn new(config: SupervisorConfig) -> Self {
        Self::with_sup(Supervisor::with_jitter(config, || 0.5))
    }

    fn with_sup(sup: Supervisor) -> Self {
        let base = Instant::now();
        Self {
            sup,
            base,
            now: base,
            next_id: 0,
            alive: BTreeMap::new(),
            scheduled: Vec::new(),
            commands: Vec::new(),
            events: Vec::new(),
            max_alive: 0,
            ticks: 0,
            boot: Box::new(|_, _| Boot::Ready(Duration::ZERO)),
            disconnect_exit: Some(Duration::ZERO),
            check_handover: false,
            short_of_files: Vec::new(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    fn start(&mut self) {
        self.sup.start(self.now);
        self.pump();
    }

    /// Executes every pending command (recursively) and collects events.
    fn pump(&mut self) {
        loop {
            while let Some(e) = self.sup.poll_event() {
                self.events.push((self.elapsed(), e));
            }
            let Some(cmd) = self.sup.poll_command() else {
                break;
            };
            self.commands.push((self.elapsed(), cmd.clone()));
            self.execute(cmd);
        }
    }

    fn execute(&mut self, cmd: Command) {
        let now = self.now;
        match cmd {
            Command::Spawn {
                spawn,
                slot,
                generation,
            } => {
                if self.short_of_files.contains(&slot) {
                    let reason = "Too many open files (os error 24)";
                    self.sup.spawn_deferred(spawn, reason, now);
                    return;
                }
                self.next_id += 1;
                let id = WorkerId::new(self.next_id);
                let proc = Proc {
                    slot,
                    generation,
                    ready: false,
                };
                self.alive.insert(id, proc);
                self.max_alive = self.max_alive.max(self.alive.len());
                self.sup.spawned(spawn, id, now);
                match (self.boot)(slot, generation) {
                    Boot::Ready(d) if d.is_zero() => self.deliver(Action::Ready(id)),
                    Boot::Ready(d) => self.scheduled.push((now + d, Action::Ready(id))),
                    Boot::Crash => self.deliver(Action::Exit(id, ExitStatus::exited(1))),
                    Boot::Never => {}
                }
            }
            Command::Disconnect { worker } => {
                if self.check_handover {
                    self.assert_handover(worker);
                }
                match self.disconnect_exit {
                    Some(d) if d.is_zero() => {
                        self.deliver(Action::Exit(worker, ExitStatus::exited(0)))
                    }
                    Some(d) => self
                        .scheduled
                        .push((now + d, Action::Exit(worker, ExitStatus::exited(0)))),
                    None => {}
                }
            }
            Command::Signal { .. } => {}
            Command::Kill { worker } => {
                self.deliver(Action::Exit(worker, ExitStatus::signaled(Signal::KILL)))
            }
        }
    }

    fn assert_handover(&self, old: WorkerId) {
        let Some(p) = self.alive.get(&old) else {
            return;
        };
        let replaced = self
            .alive
            .iter()
            .any(|(id, q)| *id != old && q.slot == p.slot && q.ready);
        assert!(
            replaced,
            "{old:?} disconnected at {:?} before its replacement was ready",
            self.elapsed()
        );
    }

    fn deliver(&mut self, action: Action) {
        let now = self.now;
        match action {
            Action::Ready(id) => {
                if let Some(p) = self.alive.get_mut(&id) {
                    p.ready = true;
                    self.sup.ready(id, now);
                }
            }
            Action::Exit(id, info) => {
                if self.alive.remove(&id).is_some() {
                    self.sup.exited(id, info, now);
                }
            }
        }
    }

    /// Advances the fake clock to `base + t`, handling every deadline and
    /// scheduled action on the way.
    fn run_until(&mut self, t: Duration) {
        let target = self.base + t;
        for _ in 0..1_000_000 {
            let scheduled = self.scheduled.iter().map(|(at, _)| *at).min();
            let next = self.sup.next_deadline().into_iter().chain(scheduled).min();
            match next {
                Some(at) if at <= target => self.step(at),
                _ => return self.step(target),
            }
        }
        panic!("run_until did not converge");
    }

    fn step(&mut self, at: Instant) {
        self.now = self.now.max(at);
        let now = self.now;
        let (due, later) = std::mem::take(&mut self.scheduled)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.scheduled = later;
        for (_, action) in due {
            self.deliver(action);
        }
        self.sup.tick(now);
        self.ticks += 1;
        self.pump();
    }

    fn advance(&mut self, d: Duration) {
        let t = self.elapsed() + d;
        self.run_until(t);
    }

    /// Makes the ready worker of `slot` exit with code 1.
    fn crash(&mut self, slot: usize) {
        let id = self.worker_in(slot);
        self.deliver(Action::Exit(id, ExitStatus::exited(1)));
        self.pump();
    }

    fn worker_in(&self, slot: usize) -> WorkerId {
        self.sup.slot_worker(slot).expect("slot has a worker")
    }

    fn spawns(&self) -> Vec<(Duration, usize, Generation)> {
        self.commands
            .iter()
            .filter_map(|(t, c)| match c {
                Command::Spawn {
                    slot, generation, ..
                } => Some((*t, *slot, *generation)),
                _ => None,
            })
            .collect()
    }

    /// Starts the workers (generation 0 ready at once), then asks for a
    /// reload whose workers boot as `new`. Returns the old workers' ids.
    fn start_then_reload_into(&mut self, new: Boot) -> Vec<WorkerId> {
        self.boot = Box::new(move |_, g| {
            if g == 1 {
                new
            } else {
                Boot::Ready(Duration::ZERO)
            }
        });
        self.start();
        let old: Vec<WorkerId> = self.alive.keys().copied().collect();
        self.sup.reload(self.now);
        self.pump();
        old
    }

    fn count_commands(&self, f: impl Fn(&Command) -> bool) -> usize {
        self.commands.iter().filter(|(_, c)| f(c)).count()
    }

    fn count_events(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| f(e)).count()
    }

    fn last_restart(&self) -> Option<(u32, Duration)> {
        self.events.iter().rev().find_map(|(_, e)| match e {
            Event::RestartScheduled { attempt, delay, .. } => Some((*attempt, *delay)),
            _ => None,
        })
    }

    fn generations_alive(&self) -> Vec<Generation> {
        self.alive.values().map(|p| p.generation).collect()
    }
}

/// Backoff 1s * 2^n capped at 8s; jitter 0.5 with `|| 0.5` gives a 0.75 factor.
fn config(workers: usize) -> SupervisorConfig {
    SupervisorConfig {
        workers,
        backoff: BackoffConfig {
            initial: secs(1),
            multiplier: 2.0,
            max: secs(8),
            jitter: 0.5,
        },
        stable_uptime: secs(10),
        breaker: None,
        kill_timeout: secs(5),
        ready_timeout: secs(10),
        max_surge: 1,
        heartbeat: None,
        recycle: RecycleConfig::default(),
        jitter_seed: 1,
    }
}

#[test]
fn start_spawns_one_worker_per_slot() {
    let mut sh = Shell::new(config(3));
    sh.start();
    let spawns: Vec<_> = sh.spawns().iter().map(|&(_, s, g)| (s, g)).collect();
    assert_eq!(spawns, [(0, 0), (1, 0), (2, 0)]);
    let ready = sh.count_events(|e| matches!(e, Event::WorkerReady { .. }));
    assert_eq!(ready, 3);
    assert_eq!(sh.alive.len(), 3);
    assert_eq!(sh.sup.next_deadline(), None);
}

#[test]
fn crash_backoff_grows_and_resets_after_stable_uptime() {
    let mut sh = Shell::new(config(1));
    sh.start();
    for (attempt, delay) in [(1, 750), (2, 1500), (3, 3000), (4, 6000), (5, 6000)] {
        sh.crash(0);
        assert_eq!(sh.last_restart(), Some((attempt, ms(delay))));
        let before = sh.spawns().len();
        sh.advance(ms(delay - 1));
        assert_eq!(sh.spawns().len(), before, "respawned too early");
        sh.advance(ms(1));
        assert_eq!(sh.spawns().len(), before + 1);
        assert_eq!(sh.alive.len(), 1);
    }
    sh.advance(secs(10));
    let resets = sh.count_events(|e| matches!(e, Event::BackoffReset { slot: 0 }));
    assert_eq!(resets, 1);
    sh.crash(0);
    assert_eq!(sh.last_restart(), Some((1, ms(750))));
}

#[test]
fn spawn_failure_counts_as_crash() {
    let mut sup = Supervisor::with_jitter(config(1), || 0.5);
    let t0 = Instant::now();
    sup.start(t0);
    let Some(Command::Spawn { spawn, .. }) = sup.poll_command() else {
        panic!("expected a spawn");
    };
    sup.spawn_failed(spawn, "ENOENT", t0);
    let events: Vec<_> = std::iter::from_fn(|| sup.poll_event()).collect();
    assert!(events.contains(&Event::WorkerFailed {
        slot: 0,
        cause: CrashCause::SpawnFailed("ENOENT".into()),
    }));
    assert_eq!(sup.next_deadline(), Some(t0 + ms(750)));
}

#[test]
fn breaker_trips_after_k_crashes_in_window() {
    let mut cfg = config(1);
    cfg.breaker = Some(BreakerConfig {
        max_crashes: 3,
        window: secs(60),
        exit_on_trip: false,
    });
    let mut sh = Shell::new(cfg);
    sh.start();
    for _ in 0..3 {
        sh.crash(0);
        sh.advance(secs(10));
    }
    assert!(!sh.sup.is_breaker_tripped());
    let restarts = sh.count_events(|e| matches!(e, Event::RestartScheduled { .. }));
    sh.crash(0);
    assert!(sh.sup.is_breaker_tripped());
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::BreakerTripped { crashes: 4, .. })),
        1
    );
    let after = sh.count_events(|e| matches!(e, Event::RestartScheduled { .. }));
    assert_eq!(after, restarts, "no restart once tripped");
    let spawns = sh.spawns().len();
    sh.advance(secs(3600));
    assert_eq!(sh.spawns().len(), spawns);
    assert!(sh.alive.is_empty());
    assert!(!sh.sup.is_finished());
    sh.sup.reload(sh.now);
    sh.pump();
    assert_eq!(
        sh.count_events(|e| matches!(
            e,
            Event::ReloadRejected {
                reason: RejectReason::BreakerTripped
            }
        )),
        1
    );
    // Operator re-arms the breaker: the slot comes back.
    sh.sup.reset_breaker(sh.now);
    sh.pump();
    assert_eq!(sh.spawns().len(), spawns + 1);
    assert_eq!(sh.alive.len(), 1);
}

#[test]
fn exits_blamed_on_a_task_restart_the_slot_but_do_not_trip_the_breaker() {
    let mut cfg = config(1);
    cfg.breaker = Some(BreakerConfig {
        max_crashes: 1,
        window: secs(60),
        exit_on_trip: false,
    });
    let mut sh = Shell::new(cfg);
    sh.start();
    for _ in 0..5 {
        let id = sh.worker_in(0);
        sh.alive.remove(&id);
        let info = ExitStatus::signaled(Signal::ABRT);
        sh.sup
            .exited_by_task(id, info, "task 7 of pool \"p\"".into(), sh.now);
        sh.pump();
        sh.advance(secs(10));
    }
    assert!(!sh.sup.is_breaker_tripped());
    assert_eq!(
        sh.count_events(|e| matches!(
            e,
            Event::WorkerFailed {
                cause: CrashCause::TaskFault { .. },
                ..
            }
        )),
        5
    );
    assert_eq!(sh.alive.len(), 1, "the slot was restarted each time");
    // A crash of the worker's own still counts: the second one trips.
    sh.crash(0);
    sh.advance(secs(10));
    sh.crash(0);
    assert!(sh.sup.is_breaker_tripped());
}

#[test]
fn breaker_with_exit_on_trip_stops_cluster_as_failed() {
    let mut cfg = config(2);
    cfg.breaker = Some(BreakerConfig {
        max_crashes: 1,
        window: secs(60),
        exit_on_trip: true,
    });
    let mut sh = Shell::new(cfg);
    sh.start();
    sh.crash(0);
    sh.advance(secs(1));
    sh.crash(0);
    assert!(sh.sup.is_finished());
    let outcome = sh.sup.outcome().unwrap();
    assert_eq!(
        outcome,
        Outcome {
            reason: StopReason::BreakerTripped,
            in_time: true
        }
    );
    assert!(outcome.is_failure());
    assert!(sh.alive.is_empty());
}

#[test]
fn crash_at_boot_forever_spawns_exponentially_spaced() {
    let mut cfg = config(1);
    cfg.backoff = BackoffConfig {
        initial: ms(100),
        multiplier: 2.0,
        max: secs(30),
        jitter: 0.2,
    };
    let mut sh = Shell::with_sup(Supervisor::new(cfg));
    sh.boot = Box::new(|_, _| Boot::Crash);
    sh.start();
    sh.run_until(secs(10 * 3600));
    let times: Vec<Duration> = sh.spawns().iter().map(|s| s.0).collect();
    assert!(times.len() >= 1000, "only {} spawns", times.len());
    assert!(times.len() <= 10 * 3600 / 24 + 20, "{} spawns", times.len());
    for (k, pair) in times.windows(2).enumerate() {
        let gap = (pair[1] - pair[0]).as_secs_f64();
        let raw = (0.1 * 2f64.powi(k as i32)).min(30.0);
        assert!(
            gap >= raw * 0.8 - 1e-6 && gap <= raw + 1e-6,
            "gap {k}: {gap}"
        );
    }
    // One tick per spawn (plus slack): no busy loop.
    assert!(sh.ticks <= times.len() + 2, "{} ticks", sh.ticks);
    let crashes = sh.count_events(|e| matches!(e, Event::WorkerFailed { .. }));
    assert_eq!(crashes, times.len());
}

#[test]
fn crash_at_boot_trips_breaker_then_stays_quiet() {
    let mut cfg = config(1);
    cfg.backoff.initial = ms(100);
    cfg.breaker = Some(BreakerConfig {
        max_crashes: 5,
        window: secs(60),
        exit_on_trip: false,
    });
    let mut sh = Shell::new(cfg);
    sh.boot = Box::new(|_, _| Boot::Crash);
    sh.start();
    sh.run_until(secs(10 * 3600));
    assert!(sh.sup.is_breaker_tripped());
    assert_eq!(sh.spawns().len(), 6);
    assert_eq!(sh.sup.next_deadline(), None);
}

#[test]
fn graceful_stop_kills_stragglers_after_kill_timeout() {
    let mut sh = Shell::new(config(2));
    sh.disconnect_exit = None;
    sh.start();
    sh.advance(secs(1));
    sh.sup.stop(sh.now);
    sh.pump();
    let disconnects = sh.count_commands(|c| matches!(c, Command::Disconnect { .. }));
    assert_eq!(disconnects, 2);
    sh.advance(ms(4999));
    assert_eq!(sh.count_commands(|c| matches!(c, Command::Kill { .. })), 0);
    assert!(!sh.sup.is_finished());
    sh.advance(ms(1));
    assert_eq!(sh.count_commands(|c| matches!(c, Command::Kill { .. })), 2);
    assert!(sh.sup.is_finished());
    let outcome = sh.sup.outcome().unwrap();
    assert_eq!(outcome.reason, StopReason::Requested);
    assert!(!outcome.in_time);
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::RestartScheduled { .. })),
        0
    );
}

#[test]
fn graceful_stop_in_time() {
    let mut sh = Shell::new(config(2));
    sh.disconnect_exit = Some(secs(1));
    sh.start();
    sh.sup.stop(sh.now);
    sh.pump();
    sh.advance(secs(1));
    assert!(sh.sup.is_finished());
    assert!(sh.sup.outcome().unwrap().in_time);
    assert_eq!(sh.count_commands(|c| matches!(c, Command::Kill { .. })), 0);
}

#[test]
fn second_stop_kills_at_once() {
    let mut sh = Shell::new(config(3));
    sh.disconnect_exit = None;
    sh.start();
    sh.sup.stop(sh.now);
    sh.pump();
    assert!(!sh.sup.is_finished());
    sh.sup.stop(sh.now);
    sh.pump();
    assert_eq!(sh.count_commands(|c| matches!(c, Command::Kill { .. })), 3);
    assert!(sh.sup.is_finished());
    assert!(!sh.sup.outcome().unwrap().in_time);
}

#[test]
fn stop_while_spawn_pending_waits_for_the_spawn() {
    let mut sup = Supervisor::with_jitter(config(1), || 0.5);
    let t0 = Instant::now();
    sup.start(t0);
    let Some(Command::Spawn { spawn, .. }) = sup.poll_command() else {
        panic!("expected a spawn");
    };
    sup.stop(t0);
    assert!(!sup.is_finished());
    sup.spawned(spawn, WorkerId::new(7), t0);
    assert_eq!(
        sup.poll_command(),
        Some(Command::Disconnect {
            worker: WorkerId::new(7)
        })
    );
    sup.exited(WorkerId::new(7), ExitStatus::exited(0), t0);
    assert!(sup.is_finished());
}

/// Rolls 4 workers to generation 1; returns (shell, duration of the rollout).
fn rolling_reload(max_surge: usize) -> (Shell, Duration) {
    let mut cfg = config(4);
    cfg.max_surge = max_surge;
    let mut sh = Shell::new(cfg);
    sh.boot = Box::new(|_, _| Boot::Ready(secs(2)));
    sh.disconnect_exit = Some(ms(500));
    sh.check_handover = true;
    sh.start();
    sh.advance(secs(10));
    assert_eq!(sh.max_alive, 4);
    sh.sup.reload(sh.now);
    sh.pump();
    sh.advance(secs(60));
    let finished = sh.events.iter().find_map(|(t, e)| match e {
        Event::ReloadFinished { generation: 1 } => Some(*t),
        _ => None,
    });
    let took = finished.expect("reload finished") - secs(10);
    (sh, took)
}

#[test]
fn rolling_reload_surge_one() {
    let (sh, took) = rolling_reload(1);
    assert_eq!(sh.max_alive, 5);
    assert_eq!(sh.generations_alive(), [1, 1, 1, 1]);
    let moved = sh.count_events(|e| matches!(e, Event::SlotReloaded { generation: 1, .. }));
    assert_eq!(moved, 4);
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::WorkerFailed { .. })),
        0
    );
    assert_eq!(took, secs(8) + ms(1500)); // 4 x (2s boot + 0.5s exit) - last exit
    assert!(!sh.sup.is_reloading());
}

#[test]
fn rolling_reload_surge_two() {
    let (sh, took) = rolling_reload(2);
    assert_eq!(sh.max_alive, 6);
    assert_eq!(sh.generations_alive(), [1, 1, 1, 1]);
    assert_eq!(took, secs(4) + ms(500));
}

#[test]
fn reload_requested_during_reload_is_queued() {
    let mut sh = Shell::new(config(2));
    sh.boot = Box::new(|_, _| Boot::Ready(secs(1)));
    sh.start();
    sh.advance(secs(5));
    sh.sup.reload(sh.now);
    sh.sup.reload(sh.now);
    sh.sup.reload(sh.now);
    sh.pump();
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::ReloadQueued { behind: 1 })),
        2
    );
    sh.advance(secs(60));
    let order: Vec<_> = sh
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ReloadStarted { generation } => Some(("start", *generation)),
            Event::ReloadFinished { generation } => Some(("finish", *generation)),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [("start", 1), ("finish", 1), ("start", 2), ("finish", 2)]
    );
    assert_eq!(sh.generations_alive(), [2, 2]);
}

#[test]
fn reload_fails_when_new_worker_crashes() {
    let mut sh = Shell::new(config(3));
    let old = sh.start_then_reload_into(Boot::Crash);
    sh.advance(secs(60));
    let failed: Vec<_> = sh
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ReloadFailed {
                generation,
                failure,
            } => Some((*generation, failure.clone())),
            _ => None,
        })
        .collect();
    let cause = CrashCause::Exited {
        info: ExitStatus::exited(1),
        before_ready: true,
    };
    assert_eq!(failed, [(1, ReloadFailure::Worker { slot: 0, cause })]);
    let new_spawns: Vec<_> = sh.spawns().into_iter().filter(|s| s.2 == 1).collect();
    assert_eq!(new_spawns.len(), 1);
    assert_eq!(new_spawns[0].1, 0);
    assert_eq!(
        sh.count_commands(|c| matches!(c, Command::Disconnect { .. })),
        0
    );
    assert_eq!(sh.alive.keys().copied().collect::<Vec<_>>(), old);
    assert!(!sh.sup.is_reloading());
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::RestartScheduled { .. })),
        0
    );
}

#[test]
fn reload_fails_on_ready_timeout_and_kills_new_worker() {
    let mut sh = Shell::new(config(2));
    let old = sh.start_then_reload_into(Boot::Never);
    let new = WorkerId::new(3);
    assert!(sh.alive.contains_key(&new));
    sh.advance(ms(9999));
    assert!(sh.sup.is_reloading());
    sh.advance(ms(1));
    // Stopped like any worker (it may serve already), not killed at once.
    assert_eq!(
        sh.count_commands(|c| *c == Command::Disconnect { worker: new }),
        1
    );
    assert_eq!(
        sh.count_commands(|c| *c == Command::Kill { worker: new }),
        0
    );
    let failure = ReloadFailure::Worker {
        slot: 0,
        cause: CrashCause::ReadyTimeout,
    };
    assert_eq!(
        sh.count_events(|e| *e
            == Event::ReloadFailed {
                generation: 1,
                failure: failure.clone()
            }),
        1
    );
    assert_eq!(sh.alive.keys().copied().collect::<Vec<_>>(), old);
    assert_eq!(
        sh.count_commands(|c| matches!(c, Command::Disconnect { .. })),
        1,
        "only the new worker is asked to stop"
    );
    sh.advance(secs(60));
    assert_eq!(sh.spawns().len(), 3);
}

#[test]
fn scale_up_and_down() {
    let mut sh = Shell::new(config(2));
    sh.disconnect_exit = None;
    sh.start();
    sh.sup.scale_to(4, sh.now);
    sh.pump();
    let slots: Vec<_> = sh.spawns().iter().map(|s| s.1).collect();
    assert_eq!(slots, [0, 1, 2, 3]);
    assert_eq!(sh.alive.len(), 4);
    let keep = sh.worker_in(0);
    sh.advance(secs(1));
    sh.sup.scale_to(1, sh.now);
    sh.pump();
    assert_eq!(sh.sup.slot_count(), 1);
    assert_eq!(
        sh.count_commands(|c| matches!(c, Command::Disconnect { .. })),
        3
    );
    sh.advance(secs(5));
    assert_eq!(sh.count_commands(|c| matches!(c, Command::Kill { .. })), 3);
    assert_eq!(sh.alive.keys().copied().collect::<Vec<_>>(), [keep]);
    let expected_exits =
        sh.count_events(|e| matches!(e, Event::WorkerExited { expected: true, .. }));
    assert_eq!(expected_exits, 3);
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::RestartScheduled { .. })),
        0
    );
    assert_eq!(sh.spawns().len(), 4);
}

fn hang_config() -> SupervisorConfig {
    let mut cfg = config(1);
    cfg.heartbeat = Some(HeartbeatConfig {
        timeout: secs(5),
        signal: Signal::ABRT,
        grace: secs(2),
    });
    cfg
}

#[test]
fn hang_gets_diagnostic_signal_then_kill_then_replacement() {
    let mut sh = Shell::new(hang_config());
    sh.start();
    let w = sh.worker_in(0);
    sh.advance(secs(3));
    sh.sup.heartbeat(w, sh.now);
    sh.advance(ms(4999));
    assert_eq!(
        sh.count_commands(|c| matches!(c, Command::Signal { .. })),
        0
    );
    sh.advance(ms(1));
    let signal = Command::Signal {
        worker: w,
        signal: Signal::ABRT,
    };
    assert_eq!(sh.count_commands(|c| *c == signal), 1);
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::HangDetected { .. })),
        1
    );
    sh.advance(ms(1999));
    assert_eq!(sh.count_commands(|c| matches!(c, Command::Kill { .. })), 0);
    sh.advance(ms(1));
    assert_eq!(sh.count_commands(|c| *c == Command::Kill { worker: w }), 1);
    let hang = Event::WorkerFailed {
        slot: 0,
        cause: CrashCause::Hang,
    };
    assert_eq!(sh.count_events(|e| *e == hang), 1);
    assert_eq!(sh.last_restart(), Some((1, ms(750))));
    sh.advance(ms(750));
    assert_eq!(sh.spawns().len(), 2);
    assert_ne!(sh.worker_in(0), w);
}

#[test]
fn no_hang_detection_before_ready() {
    let mut cfg = hang_config();
    cfg.ready_timeout = secs(60);
    let mut sh = Shell::new(cfg);
    sh.boot = Box::new(|_, _| Boot::Ready(secs(30)));
    sh.start();
    sh.advance(secs(30));
    assert_eq!(
        sh.count_commands(|c| matches!(c, Command::Signal { .. })),
        0
    );
    sh.advance(secs(5));
    assert_eq!(
        sh.count_commands(|c| matches!(c, Command::Signal { .. })),
        1
    );
}

fn recycle_shell(recycle: RecycleConfig, jitter: impl JitterSource + 'static) -> Shell {
    let mut cfg = config(2);
    cfg.recycle = recycle;
    let mut sh = Shell::with_sup(Supervisor::with_jitter(cfg, jitter));
    sh.boot = Box::new(|_, _| Boot::Ready(secs(1)));
    sh.check_handover = true;
    sh.start();
    sh.advance(secs(1));
    sh
}

fn recycled(sh: &Shell) -> Vec<(usize, RecycleReason)> {
    sh.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Recycled { slot, reason, .. } => Some((*slot, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn recycle_on_memory_limit_new_first() {
    let recycle = RecycleConfig {
        max_rss: Some(100),
        ..RecycleConfig::default()
    };
    let mut sh = recycle_shell(recycle, || 0.5);
    let old = sh.worker_in(1);
    sh.sup.rss(old, 100, sh.now);
    sh.pump();
    assert_eq!(sh.spawns().len(), 2);
    sh.sup.rss(old, 101, sh.now);
    sh.pump();
    assert_eq!(sh.spawns().last().map(|s| (s.1, s.2)), Some((1, 0)));
    assert_eq!(
        sh.count_commands(|c| matches!(c, Command::Disconnect { .. })),
        0
    );
    sh.advance(secs(1));
    assert_eq!(
        sh.count_commands(|c| *c == Command::Disconnect { worker: old }),
        1
    );
    let reason = RecycleReason::Memory {
        rss: 101,
        limit: 100,
    };
    assert_eq!(recycled(&sh), [(1, reason)]);
    assert_eq!(sh.alive.len(), 2);
    assert_ne!(sh.worker_in(1), old);
    assert_eq!(sh.max_alive, 3);
}

#[test]
fn recycle_on_jittered_max_requests() {
    let recycle = RecycleConfig {
        max_requests: Some(100),
        max_requests_jitter: 50,
        ..RecycleConfig::default()
    };
    let mut samples = [0.0, 0.5].into_iter().chain(std::iter::repeat(0.0));
    let mut sh = recycle_shell(recycle, move || samples.next().unwrap_or(0.0));
    let (w0, w1) = (sh.worker_in(0), sh.worker_in(1));
    sh.sup.requests(w0, 100, sh.now);
    sh.sup.requests(w1, 100, sh.now);
    sh.pump();
    sh.advance(secs(1));
    let r0 = RecycleReason::Requests {
        count: 100,
        limit: 100,
    };
    assert_eq!(recycled(&sh), [(0, r0)]);
    sh.sup.requests(w1, 124, sh.now);
    sh.pump();
    sh.advance(secs(1));
    assert_eq!(recycled(&sh).len(), 1);
    sh.sup.requests(w1, 125, sh.now);
    sh.pump();
    sh.advance(secs(1));
    let r1 = RecycleReason::Requests {
        count: 125,
        limit: 125,
    };
    assert_eq!(recycled(&sh), [(0, r0), (1, r1)]);
}

#[test]
fn recycle_on_max_age() {
    let recycle = RecycleConfig {
        max_age: Some(secs(3600)),
        ..RecycleConfig::default()
    };
    let mut sh = recycle_shell(recycle, || 0.5);
    sh.run_until(secs(3600) - ms(1));
    assert_eq!(sh.spawns().len(), 2);
    sh.run_until(secs(3600));
    // Both slots are due; max_surge 1 replaces them one after the other.
    assert_eq!(sh.spawns().len(), 3);
    sh.run_until(secs(3602));
    let slots: Vec<_> = recycled(&sh).iter().map(|r| r.0).collect();
    assert_eq!(slots, [0, 1]);
    assert_eq!(sh.max_alive, 3);
    // The replacements age from their own spawn.
    sh.run_until(secs(7200) - ms(1));
    assert_eq!(recycled(&sh).len(), 2);
    sh.run_until(secs(7203));
    assert_eq!(recycled(&sh).len(), 4);
}

#[test]
fn failed_recycle_keeps_old_worker_and_retries_later() {
    let recycle = RecycleConfig {
        max_rss: Some(100),
        ..RecycleConfig::default()
    };
    let mut sh = recycle_shell(recycle, || 0.5);
    let old = sh.worker_in(0);
    sh.boot = Box::new(|_, _| Boot::Crash);
    sh.sup.rss(old, 500, sh.now);
    sh.pump();
    let failed = sh.count_events(
        |e| matches!(e, Event::RecycleFailed { slot: 0, retry_in, .. } if *retry_in == ms(750)),
    );
    assert_eq!(failed, 1);
    assert_eq!(sh.worker_in(0), old);
    sh.boot = Box::new(|_, _| Boot::Ready(Duration::ZERO));
    sh.advance(ms(750));
    assert_eq!(recycled(&sh).len(), 1);
    assert_ne!(sh.worker_in(0), old);
}

#[test]
fn scale_down_during_reload_lets_it_finish() {
    let mut sh = Shell::new(config(3));
    sh.boot = Box::new(|_, _| Boot::Ready(secs(1)));
    sh.start();
    sh.advance(secs(1));
    sh.sup.reload(sh.now);
    sh.pump();
    sh.sup.scale_to(1, sh.now);
    sh.pump();
    sh.advance(secs(10));
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::ReloadFinished { generation: 1 })),
        1
    );
    assert_eq!(sh.generations_alive(), [1]);
}

#[test]
fn reload_failure_with_surge_two_cancels_other_new_workers() {
    let mut cfg = config(4);
    cfg.max_surge = 2;
    let mut sh = Shell::new(cfg);
    sh.boot = Box::new(|slot, g| match (slot, g) {
        (1, 1) => Boot::Crash,
        _ => Boot::Ready(secs(2)),
    });
    sh.start();
    sh.advance(secs(2));
    let old: Vec<WorkerId> = sh.alive.keys().copied().collect();
    sh.sup.reload(sh.now);
    sh.pump();
    sh.advance(secs(60));
    let failure = ReloadFailure::Worker {
        slot: 1,
        cause: CrashCause::Exited {
            info: ExitStatus::exited(1),
            before_ready: true,
        },
    };
    let failed = Event::ReloadFailed {
        generation: 1,
        failure,
    };
    assert_eq!(sh.count_events(|e| *e == failed), 1);
    // Slot 0's new worker was started in parallel; it is retired, not promoted.
    let new_slots: Vec<_> = sh
        .spawns()
        .iter()
        .filter(|s| s.2 == 1)
        .map(|s| s.1)
        .collect();
    assert_eq!(new_slots, [0, 1]);
    assert_eq!(sh.alive.keys().copied().collect::<Vec<_>>(), old);
    assert_eq!(sh.generations_alive(), [0, 0, 0, 0]);
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::SlotReloaded { .. })),
        0
    );
}

#[test]
fn ready_timeout_outside_reload_stops_gracefully_and_restarts() {
    let mut sh = Shell::new(config(1));
    sh.boot = Box::new(|_, _| Boot::Never);
    sh.start();
    let w = sh.worker_in(0);
    sh.advance(secs(10));
    assert_eq!(
        sh.count_commands(|c| *c == Command::Disconnect { worker: w }),
        1
    );
    assert_eq!(sh.count_commands(|c| *c == Command::Kill { worker: w }), 0);
    let failed = Event::WorkerFailed {
        slot: 0,
        cause: CrashCause::ReadyTimeout,
    };
    assert_eq!(sh.count_events(|e| *e == failed), 1);
    assert_eq!(sh.last_restart(), Some((1, ms(750))));
}

#[test]
fn a_worker_that_ignores_the_stop_after_a_ready_timeout_is_killed_after_kill_timeout() {
    let mut sh = Shell::new(config(1));
    sh.boot = Box::new(|_, _| Boot::Never);
    sh.disconnect_exit = None;
    sh.start();
    let w = sh.worker_in(0);
    sh.advance(secs(10));
    assert_eq!(
        sh.count_commands(|c| *c == Command::Disconnect { worker: w }),
        1
    );
    sh.advance(ms(4999));
    assert_eq!(sh.count_commands(|c| *c == Command::Kill { worker: w }), 0);
    assert_eq!(sh.last_restart(), None, "no restart while it stops");
    sh.advance(ms(1));
    assert_eq!(sh.count_commands(|c| *c == Command::Kill { worker: w }), 1);
    assert_eq!(
        sh.count_events(|e| *e == Event::KillTimeout { worker: w }),
        1
    );
    let failed = Event::WorkerFailed {
        slot: 0,
        cause: CrashCause::ReadyTimeout,
    };
    assert_eq!(sh.count_events(|e| *e == failed), 1);
    assert_eq!(sh.last_restart(), Some((1, ms(750))));
}

#[test]
fn spawns_refused_for_lack_of_resources_are_retried_without_tripping_the_breaker() {
    let mut cfg = config(3);
    cfg.breaker = Some(BreakerConfig {
        max_crashes: 1,
        window: secs(60),
        exit_on_trip: true,
    });
    let mut sh = Shell::new(cfg);
    sh.short_of_files = vec![2];
    sh.start();
    let serving = [sh.worker_in(0), sh.worker_in(1)];
    sh.advance(secs(120));
    let deferred: Vec<(u32, Duration)> = sh
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::SpawnDeferred {
                slot: 2,
                attempt,
                retry_in,
                reason,
            } => {
                assert!(reason.contains("Too many open files"), "{reason}");
                Some((*attempt, *retry_in))
            }
            _ => None,
        })
        .collect();
    // The slot's own backoff: 1 s, 2 s, 4 s, then 8 s (the maximum),
    // jitter taking a quarter off.
    assert!(deferred.len() > 10, "{deferred:?}");
    assert_eq!(
        &deferred[..4],
        [(1, ms(750)), (2, ms(1500)), (3, ms(3000)), (4, ms(6000))]
    );
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::BreakerTripped { .. } | Event::WorkerFailed { .. })),
        0,
        "not the workers' crash loop"
    );
    assert_eq!(
        [sh.worker_in(0), sh.worker_in(1)],
        serving,
        "the others keep serving"
    );
    // Resources come back: the slot starts on its next try, and its
    // deferral count starts over.
    sh.short_of_files.clear();
    sh.advance(secs(8));
    let third = sh.worker_in(2);
    assert!(sh.alive[&third].ready);
    sh.short_of_files = vec![2];
    sh.crash(2);
    let retry = sh.events.iter().rev().find_map(|(_, e)| match e {
        Event::RestartScheduled {
            slot: 2, attempt, ..
        } => Some(*attempt),
        _ => None,
    });
    assert_eq!(retry, Some(1));
}

#[test]
fn a_reload_whose_new_worker_cannot_start_for_lack_of_resources_fails_without_a_crash() {
    let mut sh = Shell::new(config(2));
    sh.start();
    let old = [sh.worker_in(0), sh.worker_in(1)];
    sh.short_of_files = vec![0, 1];
    sh.sup.reload(sh.now);
    sh.pump();
    let failed = sh.events.iter().find_map(|(_, e)| match e {
        Event::ReloadFailed {
            failure: ReloadFailure::Worker { cause, .. },
            ..
        } => Some(cause.clone()),
        _ => None,
    });
    assert!(
        matches!(failed, Some(CrashCause::NoResources(ref why)) if why.contains("open files")),
        "{failed:?}"
    );
    assert_eq!(
        sh.count_events(|e| matches!(e, Event::WorkerFailed { .. })),
        0
    );
    assert_eq!([sh.worker_in(0), sh.worker_in(1)], old);
}

#[test]
fn crash_during_reload_promotes_the_starting_successor() {
    let mut sh = Shell::new(config(1));
    sh.boot = Box::new(|_, _| Boot::Ready(secs(2)));
    sh.start();
    sh.advance(secs(2));
    sh.sup.reload(sh.now);
    sh.pump();
    sh.crash(0);
    // No backoff: the new-generation worker already starting takes the slot.
    assert_eq!(sh.last_restart(), None);
    sh.advance(secs(2));
    assert_eq!(sh.generations_alive(), [1]);
    let finished = Event::ReloadFinished { generation: 1 };
    assert_eq!(sh.count_events(|e| *e == finished), 1);
}
