//! The `idemgate` binary: parse the command line, set up logging, load the
//! configuration, then serve until a signal, check, or inspect keys.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use idemgate::cli::{Cli, Command, KeysCommand, LogFormat};
use idemgate::config::Config;
use tracing_subscriber::EnvFilter;

/// mimalloc, not glibc's malloc: hyper re-reserves an 8 KiB read buffer
/// (a size glibc serves from its slow bins) up to twice per request while
/// header values still point into the old one, and the memory store keeps
/// small records for hours among them. Measured (bench/PROFILE.md, ninth
/// round): new keys on the memory store 15-21% less CPU, on Redis 7%,
/// records 13% smaller, pass-through the same; expired records' memory
/// goes back to the system. `no_thp`: no transparent huge pages asked
/// for, so the idle process stays small (14 MB, against 21 MB with them).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logs = init_logging(&cli);
    // One crypto provider for the whole process (see ARCHITECTURE.md).
    idemgate::tls::install_provider();
    let workers = match &cli.command {
        Command::Serve(args) => args.workers,
        _ => None,
    }
    .or_else(|| std::thread::available_parallelism().ok())
    .map_or(1, std::num::NonZeroUsize::get);
    let runtime = runtime(workers);
    let result = match cli.command {
        Command::Check(args) => return check(&args.config),
        Command::Serve(args) => {
            let served = runtime.block_on(serve(&args.config.config));
            // Connections still open at the end of the grace are dropped
            // with the runtime, and their requests logged (503) then: said
            // before "stopped" (regression, an audit: after it).
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            if served.is_ok() {
                tracing::info!("stopped");
            }
            served
        }
        Command::Keys(keys) => runtime.block_on(idemgate_keys(keys)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// On one CPU a single-threaded scheduler (no work-stealing bookkeeping, no
/// cross-thread wake-ups); otherwise a worker thread per CPU.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build().expect("a tokio runtime")
}

/// Logs go to stdout through a background writer, so that a slow reader
/// (a pipe, journald) never stalls request handling; the returned guard
/// flushes what is queued when `main` ends. `check` and `keys` log to
/// stderr: their stdout is their output (regression: a warning of the
/// store's went into `keys --json`'s JSON).
fn init_logging(cli: &Cli) -> tracing_appender::non_blocking::WorkerGuard {
    // `--log-level` was checked when the command line was parsed; RUST_LOG
    // gets the same check, and a bad one is said, not silently replaced.
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (level, bad_rust_log) = match (&cli.log_level, rust_log) {
        (Some(level), _) => (level.clone(), None),
        // `keys` says itself why the store cannot be reached: the redis
        // crate's own warnings (one per node it failed) said it again
        // (noticed by an audit, a cluster outage).
        (None, None) if matches!(cli.command, Command::Keys(_)) => {
            ("info,redis=error".to_owned(), None)
        }
        (None, None) => ("info".to_owned(), None),
        (None, Some(env)) => match idemgate::cli::log_filter(&env) {
            Ok(level) => (level, None),
            Err(error) => ("info".to_owned(), Some(error)),
        },
    };
    let filter = EnvFilter::new(level);
    let to_stdout = matches!(cli.command, Command::Serve(_));
    let json = match cli.log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Pretty) => false,
        None if to_stdout => !std::io::stdout().is_terminal(),
        None => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = if to_stdout {
        tracing_appender::non_blocking(std::io::stdout())
    } else {
        tracing_appender::non_blocking(std::io::stderr())
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init();
    } else {
        // Colours only on a terminal (regression, an audit: escape codes
        // in a file written with `--log-format pretty > file`).
        let terminal = if to_stdout {
            std::io::stdout().is_terminal()
        } else {
            std::io::stderr().is_terminal()
        };
        builder.with_ansi(terminal).init();
    }
    if let Some(error) = bad_rust_log {
        tracing::warn!(error = %error, "RUST_LOG is not a valid filter; logging at info");
    }
    // A panic (a defect) is a log line like the others, with its place,
    // not plain text on stderr; its request is answered 500.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "a defect: a panic (please report this line)");
    }));
    guard
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    let config =
        Config::load(path).map_err(|errors| anyhow::anyhow!("{}: {errors}", path.display()))?;
    for warning in &config.warnings {
        tracing::warn!(warning = %warning, "configuration");
    }
    Ok(config)
}

async fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM between binding and serving must drain and
    // exit 0, not kill the process by the signal's default action.
    let (shutdown, hurry) = shutdown_signals()?;
    // SIGHUP's too (its default action also ends the process), heard from
    // before the file is loaded on.
    let reloads = idemgate::server::Reloads::new(path.to_owned()).hurry_on(hurry);
    let config = load(path)?;
    let open_files = raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(config.listen.address)
        .await
        .with_context(|| format!("cannot bind listen address {}", config.listen.address))?;
    let listeners = idemgate::server::Listeners::with_admin(&config, listener).await?;
    if let Some(admin) = &listeners.admin {
        tracing::info!(address = %admin.local_addr()?, "admin listening");
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(address = %listeners.proxy.local_addr()?, routes = config.routes.len(), workers, open_files, "idemgate listening");
    idemgate::server::serve(config, listeners, shutdown, Some(reloads)).await?;
    Ok(())
}

/// Raises the soft open-file limit to the hard one, as nginx's
/// `worker_rlimit_nofile` or Go's runtime do: a client connection holds a
/// descriptor and most hold an upstream one too, and programs started from
/// a shell get 1,024, which caps the proxy at about 500 clients. Returns the
/// limit now in force; warns when it stays low.
fn raise_open_file_limit() -> u64 {
    const LOW: u64 = 4096;
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(error = %error, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    };
    if limit < LOW {
        tracing::warn!(
            open_files = limit,
            "the open-file limit allows about {} client connections; raise the hard limit (systemd LimitNOFILE, ulimit -Hn)",
            limit / 2
        );
    }
    limit
}

/// The first SIGTERM or SIGINT (shutdown), and the second (the shutdown
/// hurried: the grace ends at once), with both handlers installed before
/// this returns. Regression: a second signal was ignored, and a drain
/// under a long `shutdown_grace` could be ended only by SIGKILL.
fn shutdown_signals() -> anyhow::Result<(impl Future<Output = ()>, impl Future<Output = ()>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let (heard, count) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            // Said before it is acted on (regression, an audit: "SIGTERM
            // received" came after "shutting down", once after "stopped").
            match *heard.borrow() + 1 {
                1 => tracing::info!("{name} received"),
                _ => tracing::warn!(
                    "{name} received while shutting down: ending the shutdown grace now (requests still running are cut off)"
                ),
            }
            heard.send_modify(|n| *n += 1);
        }
    });
    let nth = |n: u32| {
        let mut count = count.clone();
        async move {
            let _ = count.wait_for(|heard| *heard >= n).await;
        }
    };
    Ok((nth(1), nth(2)))
}

/// `idemgate check`: exit 0 and the effective routes, or 1 and every error.
fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{}: {errors}", path.display());
            return ExitCode::FAILURE;
        }
    };
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    print_whole(&format!("{}: valid; {}", path.display(), config.describe()));
    ExitCode::SUCCESS
}

async fn idemgate_keys(command: KeysCommand) -> anyhow::Result<()> {
    print_whole(&idemgate::keys::run(command).await?);
    Ok(())
}

/// Written whole and without a panic when stdout is closed early (`| head`).
fn print_whole(text: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
}
