//! One module per subcommand.

pub mod bench;
pub mod bench_collective;
pub mod bench_coordinator;
pub mod bench_data;
pub mod config;
pub mod coordinator;
pub mod cluster_env;
pub mod data;
pub mod demo;
pub mod embed;
pub mod eval;
pub mod init;
pub mod launch;
pub mod models;
pub mod report;
pub mod run_args;
pub mod security;
pub mod shards;
pub mod synth;
pub mod tokenize;
pub mod worker;

use anyhow::Context;

/// Print one JSON value as a single line on stdout. A closed pipe (`distclip models | head`)
/// is not an error: the reader has what it wanted. Any other write failure (a full disk behind
/// a redirect) is, since the result would be lost.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{value}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the result to stdout"),
        _ => Ok(()),
    }
}

/// Pin the CPU thread count for the pure-Rust backend (rayon) and, when linked, libtorch.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(t) = threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("setting the thread pool size")?;
        distclip_model::device::set_libtorch_threads(t);
    }
    Ok(())
}
