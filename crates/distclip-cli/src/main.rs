//! `distclip`: train and use OpenCLIP-compatible CLIP models. The binary only parses arguments
//! and dispatches; each subcommand lives in `commands/`. JSON results go to stdout, logs to
//! stderr.

mod commands;

use clap::{Parser, Subcommand};

/// distclip: data-parallel CLIP training, OpenCLIP-compatible.
#[derive(Parser, Debug)]
#[command(name = "distclip", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr: `human` or `json`.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Tokenize texts exactly as `open_clip.tokenize` does.
    Tokenize(commands::tokenize::Args),
    /// Write a freshly initialised model as OpenCLIP-named safetensors.
    Init(commands::init::Args),
    /// Embed images and texts (L2-normalised), with zero-shot probabilities.
    Embed(commands::embed::Args),
    /// List the built-in model configs with their parameter counts.
    Models(commands::models::Args),
    /// Print the documented default run configuration (TOML) for a model.
    Config(commands::config::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// WebDataset shards: write images and captions as shards.
    #[command(subcommand)]
    Shards(commands::shards::ShardsCommand),
    /// Write the synthetic shapes dataset (train and held-out shards, zero-shot prompts).
    Synth(commands::synth::Args),
    /// Inspect datasets: stream a spec through the input pipeline and count.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Run the coordinator of a training run (membership, quorums, shard ledger, run state).
    Coordinator(commands::coordinator::Args),
    /// Run one training worker: join a coordinator and train until the run finishes.
    Worker(commands::worker::Args),
    /// Start a coordinator and N workers on this machine (loopback) and wait for the run.
    Launch(commands::launch::Args),
    /// Write a throwaway CA and one certificate for every process of a run (TLS, mutual TLS).
    Certs(commands::security::CertsArgs),
    /// Zero-shot classification or image-text retrieval of a model, as JSON.
    Eval(commands::eval::Args),
    /// Plots (PNG) and a Markdown summary of a training run directory.
    Report(commands::report::Args),
    /// The whole system in a few minutes: synthetic data, a 2-worker run, zero-shot before/after.
    Demo(commands::demo::Args),
}

/// Set to `1` to colour human-readable logs even when stderr is not a terminal.
pub const LOG_COLOUR_ENV: &str = "DISTCLIP_LOG_COLOR";

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: a log file or a collector gets plain text.
    // `launch` pipes its children's logs to its own stderr and sets DISTCLIP_LOG_COLOR=1 when
    // that is a terminal.
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() || std::env::var_os(LOG_COLOUR_ENV).is_some_and(|v| v == "1");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let log_format = cli.log_format.clone();
    let result = match cli.command {
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Embed(a) => commands::embed::run(a),
        Command::Models(a) => commands::models::run(a),
        Command::Config(a) => commands::config::run(a),
        Command::Bench(c) => commands::bench::run(c),
        Command::Shards(c) => commands::shards::run(c),
        Command::Synth(a) => commands::synth::run(a),
        Command::Data(c) => commands::data::run(c),
        Command::Coordinator(a) => commands::coordinator::run(a),
        Command::Worker(a) => commands::worker::run(a),
        Command::Launch(a) => commands::launch::run(a, &log_format),
        Command::Certs(a) => commands::security::certs(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Report(a) => commands::report::run(a),
        Command::Demo(a) => commands::demo::run(a, &log_format),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
