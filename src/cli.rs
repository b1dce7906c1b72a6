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
    /// Log format; defaults to json when stdout is not a terminal.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level or filter (e.g. info, debug, idemgate=debug); RUST_LOG also works.
    #[arg(long, global = true)]
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
    /// Worker threads; defaults to the CPUs this process may use (affinity
    /// mask, cgroup quota). With one, a single-threaded scheduler runs everything.
    #[arg(long, env = "IDEMGATE_WORKERS")]
    pub workers: Option<std::num::NonZeroUsize>,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The route name.
    #[arg(long)]
    pub route: String,
    /// The client's idempotency key.
    #[arg(long)]
    pub key: String,
    /// The scope (hex SHA-256 of the scope header values).
    #[arg(long)]
    pub scope: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print one stored record as JSON.
    Get(KeyArgs),
    /// Delete a record (lets the next attempt through).
    Purge(KeyArgs),
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
