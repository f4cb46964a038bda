//! The `pier` command: `pier serve` runs a node. Later subcommands (status, check, import, sync,
//! warm, gc, bench, config) join here.

mod config;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::LogFormat;

#[derive(Parser)]
#[command(
    name = "pier",
    version,
    about = "Container-image distribution: OCI registry, mirror and peer-to-peer cache in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pier node (the default when no command is given).
    Serve(ServeArgs),
}

#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// Address to listen on [default: 0.0.0.0:5000].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory for blobs and metadata [default: ./pier-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file; flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pier: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
