//! `procluster`: run any program as a cluster of workers that share its
//! ports. See `procluster --help`.

mod args;
mod config;
mod control;
mod listen_spec;
mod logs;
mod readiness;
mod recent;
mod run;
mod shim;
mod systemd;
mod top;
mod users;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The shim execs at once: no runtime, no thread, nothing else first.
    let command = match cli.command {
        Command::Exec(args) => return ExitCode::from(shim::exec(args).clamp(0, 255) as u8),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("procluster: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match command {
            Command::Run(args) => run::run(*args).await,
            Command::Status(args) => control::client::status(args).await,
            Command::Reload(args) => control::client::reload(args).await,
            Command::Scale(args) => control::client::scale(args).await,
            Command::Stop(args) => control::client::stop(args).await,
            Command::Logs(args) => control::logs::logs(args).await,
            Command::Top(args) => top::top(args).await,
            Command::Exec(_) => unreachable!("handled above"),
        }
    })
}
