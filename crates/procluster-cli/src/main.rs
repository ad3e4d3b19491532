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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
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

/// Prints clap's message, with a hint where a program was given to `run`
/// without the `--` that separates it from procluster's own options.
fn usage_error(error: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let code = error.exit_code();
    let _ = error.print();
    let stray = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) if error.kind() == ErrorKind::UnknownArgument => {
            Some(arg.clone())
        }
        _ => None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(arg) = stray {
        if args.first().is_some_and(|a| a == "run") && !args.iter().any(|a| a == "--") {
            let at = args.iter().position(|a| *a == arg).unwrap_or(args.len());
            let (options, program) = args.split_at(at);
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "\nhint: the program to run goes after `--`, so that its arguments are not \
                     taken for procluster's:\n  procluster {} -- {}\n",
                    options.join(" "),
                    program.join(" ")
                )
                .as_bytes(),
            );
        }
    }
    ExitCode::from(code.clamp(0, 255) as u8)
}
