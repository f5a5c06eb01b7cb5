//! The `shardvol` command: argument parsing, logging set-up, and calls into the library.

mod cli;

use std::io::IsTerminal;

use anyhow::Result;
use clap::Parser;

use cli::args::{Cli, Command};

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Recovery reports what it did itself; the volume's own warnings (journal kept, destaging
    // retried) speak of a server that is not running.
    let default_filter = match cli.command {
        Some(Command::Recover(_)) => "warn,shardvol::volume=error",
        // Reports: what they print is the answer; how the pool was opened is not.
        Some(Command::Status { .. } | Command::Inspect { .. }) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDVOL_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    shardvol::disk::configure_allocator();
    match cli.command {
        Some(Command::Create(a)) => cli::pool::create(a),
        Some(Command::Inspect { pool, json }) => cli::pool::inspect(pool, json),
        Some(Command::Serve(a)) => cli::serve::serve_cmd(a),
        Some(Command::Unlock { pool, share }) => cli::pool::unlock(pool, share),
        Some(Command::Status { pool, json }) => cli::pool::status(pool, json),
        Some(Command::Config(c)) => cli::config::config_cmd(c),
        Some(Command::Key(k)) => cli::keys::key_cmd(k),
        Some(Command::Shares(c)) => cli::keys::shares_cmd(c),
        Some(Command::Scrub(a)) => cli::disks::scrub(a),
        Some(Command::Disk(c)) => cli::disks::disk_cmd(c),
        Some(Command::Audit(c)) => cli::audit::audit(c),
        Some(Command::Recover(a)) => cli::pool::recover(a),
        None => unreachable!("clap prints help when no command is given"),
    }
}
