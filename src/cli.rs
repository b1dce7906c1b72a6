//! The command line: `serve`, `check` and `keys`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "idemgate",
    version,
    about = "An idempotency-enforcing HTTP reverse proxy"
)]
pub struct Cli {
    /// Log format; defaults to json when the log's stream is not a terminal
    /// (stdout for serve, stderr for check and keys).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level or filter (e.g. info, debug, idemgate=debug); RUST_LOG also works.
    #[arg(long, global = true, value_parser = log_filter)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long, short, env = "IDEMGATE_CONFIG", default_value = "idemgate.yaml")]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (and its admin listener).
    Serve(ServeArgs),
    /// Validate the configuration and print the effective routes.
    Check(ConfigArg),
    /// Inspect and resolve stored idempotency records.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Worker threads (1 to 1024); defaults to the CPUs this process may use
    /// (affinity mask, cgroup quota). With one, a single-threaded scheduler
    /// runs everything.
    #[arg(long, env = "IDEMGATE_WORKERS", value_parser = workers)]
    pub workers: Option<std::num::NonZeroUsize>,
}

/// A worker count: a typo such as `--workers 100000` would start that many
/// threads and never get to listening.
fn workers(text: &str) -> Result<std::num::NonZeroUsize, String> {
    text.parse::<std::num::NonZeroUsize>()
        .ok()
        .filter(|n| n.get() <= 1024)
        .ok_or_else(|| format!("{text:?} is not a number of worker threads from 1 to 1024"))
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The route name.
    #[arg(long)]
    pub route: String,
    /// The client's idempotency key (a quoted one, `"abc"`, is `abc`, as the proxy reads it).
    #[arg(long, value_parser = key_arg)]
    pub key: String,
    /// The scope (hex SHA-256 of the scope header values).
    #[arg(long, value_parser = crate::idempotency::key::parse_scope)]
    pub scope: Option<String>,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    /// Purge a record whose attempt is still running (within its lease)
    /// too: a retry may then run the request again beside it.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print one stored record as JSON.
    Get(KeyArgs),
    /// Delete a record (lets the next attempt through); refused while its
    /// attempt is still running, unless --force.
    Purge(PurgeArgs),
    /// List records whose outcome is unknown.
    Unknown {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A `--log-level` that means what it says. `tracing`'s own parser drops a
/// directive it cannot read and takes a lone unknown word (`debg`) for a
/// target name, which would silence every log line; here both are usage
/// errors. A target is written with its level (`idemgate=debug`).
pub fn log_filter(text: &str) -> Result<String, String> {
    let how = "write a level (trace, debug, info, warn, error, off) or \
               comma-separated target=level directives, such as info,idemgate=debug";
    for directive in text.split(',').map(str::trim) {
        let bare_word = !directive.contains(['=', '[', '{']);
        if directive.is_empty()
            || (bare_word && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()))
        {
            return Err(format!("{directive:?} is not a log level; {how}"));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| format!("{e}; {how}"))?;
    Ok(text.to_owned())
}

/// `--key` in the form the proxy stores it.
fn key_arg(text: &str) -> Result<String, std::convert::Infallible> {
    Ok(crate::idempotency::key::stored_form(text))
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn log_levels_and_directives_are_accepted_and_typos_are_not() {
        for ok in [
            "info",
            "DEBUG",
            "warn,idemgate=debug",
            "idemgate::access=info",
            "off",
        ] {
            assert!(log_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["debg", "", "info,", "idemgate=loud", "verbose"] {
            assert!(log_filter(bad).is_err(), "{bad}");
        }
    }
}
