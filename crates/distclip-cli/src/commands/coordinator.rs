//! `distclip coordinator`: run the control plane of a training run. It prints
//! `coordinator http listening on HOST:PORT` (Prometheus `/metrics`, `/healthz`; the address
//! also in `RUN_DIR/coordinator.http`) and `coordinator listening on HOST:PORT` (gRPC; also in
//! `RUN_DIR/coordinator.addr`) on stderr once it accepts connections, and the run's outcome as
//! one JSON line on stdout when it ends. The exit status is non-zero if the run failed.

use super::run_args::RunArgs;
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `distclip coordinator`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset spec, e.g. `/data/{00000..00099}.tar` or `s3://bucket/{000..999}.tar::/more/{0..9}.tar@2`
    /// (data.train).
    #[arg(long, value_name = "SPEC")]
    pub data: String,
    /// Run directory: config.toml, state.json, events.jsonl, metrics.jsonl, ledger/. A directory
    /// with a state.json resumes that run.
    #[arg(long, value_name = "DIR")]
    pub run_dir: PathBuf,
    /// Address to listen on; port 0 picks a free one (printed, and written to RUN_DIR/coordinator.addr).
    #[arg(long, default_value = "0.0.0.0:7070", value_name = "ADDR")]
    pub listen: String,
    /// HTTP address of `GET /metrics` (Prometheus) and `GET /healthz`; port 0 picks a free one
    /// (printed, and written to RUN_DIR/coordinator.http); `off`: no HTTP endpoint.
    #[arg(long, default_value = "0.0.0.0:7071", value_name = "ADDR")]
    pub http_listen: String,
    /// Workers needed before training starts (cluster.min_workers).
    #[arg(long, env = "DISTCLIP_MIN_WORKERS")]
    pub min_workers: Option<usize>,
    /// Refuse workers beyond this many (cluster.max_workers; 0: no limit).
    #[arg(long)]
    pub max_workers: Option<usize>,
    /// Resume from a checkpoint: `latest` (the newest good one in RUN_DIR/checkpoints), a
    /// checkpoint directory, or another run directory. Without it, a run directory with a
    /// state.json continues from that state (a coordinator restart under live workers).
    #[arg(long, value_name = "latest|PATH")]
    pub resume: Option<String>,
    /// After the run ends, keep serving the status page, metrics and health until stopped
    /// (SIGINT or SIGTERM) instead of exiting: for a Kubernetes Deployment, which would
    /// otherwise restart the pod.
    #[arg(long)]
    pub keep_serving: bool,
    /// Read the run token from this file (first line) instead of --token / DISTCLIP_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Run options.
    #[command(flatten)]
    pub run: RunArgs,
    /// TLS on the gRPC port.
    #[command(flatten)]
    pub tls: super::security::TlsArgs,
}

/// Run the coordinator until the run ends or Ctrl-C.
pub fn run(args: Args) -> anyhow::Result<()> {
    // The spec as a TOML string, so it is never read as a number or a table.
    let mut extra = vec![format!(
        "data.train={}",
        super::run_args::quoted(&args.data)
    )];
    if let Some(n) = args.min_workers {
        extra.push(format!("cluster.min_workers={n}"));
    }
    if let Some(n) = args.max_workers {
        extra.push(format!("cluster.max_workers={n}"));
    }
    let config = args.run.load(&extra)?;
    // Workers would refuse it one by one: refuse it here, before any joins.
    config
        .data
        .caption_key
        .parse::<distclip_data::CaptionKey>()
        .map_err(|e| anyhow::anyhow!("data.caption_key = {:?}: {e}", config.data.caption_key))?;
    let list = distclip_data::ShardList::parse(&config.data.train)
        .with_context(|| format!("expanding the dataset spec {:?}", config.data.train))?;
    check_shards_exist(&config.data.train, &list)?;
    let shards = list
        .shards
        .into_iter()
        .map(|s| distclip_coordinator::ShardInfo {
            url: s.url,
            weight: s.weight,
        })
        .collect();
    let mut opts = distclip_coordinator::CoordinatorOptions::new(config, shards, &args.run_dir);
    opts.listen = args.listen.clone();
    opts.http_listen = (args.http_listen != "off").then(|| args.http_listen.clone());
    opts.token = super::security::token(args.run.token(), args.token_file.as_deref())?;
    opts.tls = args.tls.load()?;
    opts.resume = args.resume.clone();
    opts.keep_serving = args.keep_serving;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(async move {
        let coordinator = distclip_coordinator::Coordinator::bind(opts).await?;
        // Machine-parsable: launchers wait for these lines (or RUN_DIR/coordinator.addr).
        if let Some(http) = coordinator.http_addr() {
            eprintln!("coordinator http listening on {http}");
        }
        eprintln!("coordinator listening on {}", coordinator.local_addr());
        tracing::info!(run_id = %coordinator.run_id(), "coordinator started");
        // Ctrl-C, or SIGTERM from Kubernetes, Slurm or `docker stop`: the run state is on
        // disk after every call, so stopping loses nothing.
        let stop = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let signal = tokio::select! {
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
                _ = term => "SIGTERM",
            };
            tracing::warn!("{signal}: stopping the coordinator (the run can be resumed from its run directory)");
        };
        anyhow::Ok(coordinator.run(stop).await?)
    })?;
    super::print_json(&serde_json::json!({
        "run_id": outcome.run_id,
        "state": outcome.state,
        "error": outcome.error,
        "step": outcome.step,
        "epoch": outcome.epoch,
        "samples_seen": outcome.samples_seen,
        "run_dir": args.run_dir.display().to_string(),
    }))?;
    match outcome.state.as_str() {
        "finished" => Ok(()),
        "failed" => anyhow::bail!("the run failed: {}", outcome.error.unwrap_or_default()),
        other => anyhow::bail!(
            "the coordinator stopped before the run finished (state: {other}); restart it on the same --run-dir to resume"
        ),
    }
}

/// Refuse a spec none of whose shards exist before any worker starts (a run over it would read
/// nothing), and warn about missing ones. Every local shard is stat'ed; at most 32 objects, spread
/// over the list, get a HEAD. A check that cannot run (no credentials on the coordinator, an
/// endpoint only the workers reach) is a warning, not a refusal: the workers may see more.
fn check_shards_exist(spec: &str, list: &distclip_data::ShardList) -> anyhow::Result<()> {
    let opener = distclip_data::ShardOpener::new(distclip_data::RetryPolicy::fast(1));
    let urls: Vec<&str> = list.shards.iter().map(|s| s.url.as_str()).collect();
    let check = distclip_data::check_shards(&opener, &urls, 32);
    if let Some((url, error)) = check.unknown.first() {
        tracing::warn!(
            unchecked = check.unknown.len(),
            "could not check whether shard {url} exists ({error}); the workers will find out"
        );
    }
    let missing = check.missing_count();
    if check.found == 0 && missing > 0 {
        anyhow::bail!(
            "no shard of the dataset spec {spec:?} exists: {missing} of {} checked are missing (first: {}). \
             Check the path or bucket (`distclip data stats SPEC` reads a spec the way workers will)",
            check.checked,
            check.missing.join(", ")
        );
    }
    if missing > 0 {
        tracing::warn!(
            "{missing} of {} checked shards of {spec:?} do not exist (first: {}); they will be counted as failed",
            check.checked,
            check.missing.join(", ")
        );
    }
    Ok(())
}
