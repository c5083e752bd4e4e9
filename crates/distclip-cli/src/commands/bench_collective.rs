//! `distclip bench collective`: bandwidth of distclip-comm's collectives between N worker
//! processes on loopback, reported as nccl-tests does (algbw = bytes / time; busbw = algbw ·
//! 2(n-1)/n for all-reduce, · (n-1)/n for all-gather and reduce-scatter).
//!
//! The command spawns itself N times with the hidden `--worker-rank` option, so every rank is
//! a separate process with its own runtime, as in training. Each child binds a data-plane
//! server on 127.0.0.1:0 and prints `ADDR host:port`; the parent sends every child the full
//! peer list on stdin; the children connect the ring, check one result, time the ops and print
//! one JSON line; the parent prints rank 0's.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use distclip_comm::{CommOptions, Group, GroupSpec, PeerServer, Transport};

/// Arguments of `distclip bench collective`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Worker processes in the ring.
    #[arg(long)]
    workers: usize,
    /// Message size in bytes, as nccl-tests counts it: each rank's buffer for all_reduce and
    /// reduce_scatter (input), the gathered output for all_gather.
    #[arg(long)]
    bytes: usize,
    /// The collective to time.
    #[arg(long, default_value = "all_reduce", value_parser = ["all_reduce", "all_gather", "reduce_scatter"])]
    op: String,
    /// Timed iterations (after `--warmup` untimed ones, the first of which is checked).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// How tensor bytes travel: `tcp` (framed TCP negotiated through gRPC) or `grpc` (gRPC
    /// client streams).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Bytes per frame (pipelining granularity).
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// TLS between the ranks, on whichever --transport is chosen: what encryption costs.
    #[command(flatten)]
    tls: super::security::TlsArgs,
    /// Internal: run as this rank of a benchmark started by the parent command.
    #[arg(long, hide = true)]
    worker_rank: Option<usize>,
}

/// Run the benchmark: the parent that spawns the ranks, or one rank.
pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.workers >= 1, "--workers must be at least 1");
    ensure!(args.iters >= 1 && args.warmup >= 1, "--iters and --warmup must be at least 1");
    ensure!(
        args.bytes >= 4 * args.workers && args.bytes.is_multiple_of(4 * args.workers),
        "--bytes must be a positive multiple of 4 x workers ({}): whole f32 elements, split evenly",
        4 * args.workers
    );
    args.transport.parse::<Transport>().map_err(anyhow::Error::msg)?;
    match args.worker_rank {
        Some(rank) => worker(args, rank),
        None => parent(args),
    }
}

fn parent(args: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the distclip binary to start the ranks")?;
    let mut children = Vec::new();
    for rank in 0..args.workers {
        let child = Command::new(&exe)
            .args(["bench", "collective"])
            .args(["--workers", &args.workers.to_string(), "--bytes", &args.bytes.to_string()])
            .args(["--op", &args.op, "--iters", &args.iters.to_string(), "--warmup", &args.warmup.to_string()])
            .args(["--transport", &args.transport, "--chunk-bytes", &args.chunk_bytes.to_string()])
            .args(["--worker-rank", &rank.to_string()])
            .args(args.tls.to_cli_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
        children.push(child);
    }
    // If anything below fails, the children must not outlive us.
    let result = drive(&mut children);
    for c in &mut children {
        if result.is_err() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    let line = result?;
    let value: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("rank 0 printed `{line}`"))?;
    super::print_json(&value)
}

/// Exchange addresses and collect rank 0's result line.
fn drive(children: &mut [std::process::Child]) -> anyhow::Result<String> {
    let mut readers = Vec::new();
    let mut addrs = Vec::new();
    for (rank, c) in children.iter_mut().enumerate() {
        let mut out = BufReader::new(c.stdout.take().context("child stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let addr = line.trim().strip_prefix("ADDR ").with_context(|| format!("rank {rank} did not report its address (got `{}`)", line.trim()))?;
        addrs.push(addr.to_string());
        readers.push(out);
    }
    let peers = addrs.join(",");
    for c in children.iter_mut() {
        let mut stdin = c.stdin.take().context("child stdin")?;
        writeln!(stdin, "{peers}")?;
    }
    let mut lines = Vec::new();
    for (rank, mut r) in readers.into_iter().enumerate() {
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            bail!("rank {rank} exited without a result (see its error above)");
        }
        lines.push(line.trim().to_string());
    }
    for (rank, c) in children.iter_mut().enumerate() {
        let status = c.wait()?;
        ensure!(status.success(), "rank {rank} failed: {status}");
    }
    Ok(lines.swap_remove(0))
}

fn worker(args: Args, rank: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(worker_async(args, rank))
}

async fn worker_async(args: Args, rank: usize) -> anyhow::Result<()> {
    let w = args.workers;
    let opts = CommOptions {
        timeout: Duration::from_secs(60),
        chunk_bytes: args.chunk_bytes,
        max_chunk_bytes: args.chunk_bytes.max(16 << 20),
        token: None,
        transport: args.transport.parse().map_err(anyhow::Error::msg)?,
        tls: args.tls.load()?,
    };
    let server = PeerServer::bind("127.0.0.1:0".parse()?, opts).await?;
    println!("ADDR {}", server.local_addr());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let peers: Vec<String> = line.trim().split(',').map(str::to_string).collect();
    ensure!(peers.len() == w, "expected {w} peer addresses, got `{}`", line.trim());
    let group = Group::connect(&server, GroupSpec { quorum_id: 1, rank, peers }).await?;
    let n = args.bytes / 4;
    let op = args.op.as_str();
    // Per-rank buffers; values stay small and exact (ones, then zeros) so sums never overflow.
    let (mut buf, local) = match op {
        "all_gather" => (Vec::new(), vec![(rank + 1) as f32; n / w]),
        _ => (vec![1f32; n], Vec::new()),
    };
    let run_once = async |buf: &mut Vec<f32>, local: &[f32]| -> anyhow::Result<Vec<f32>> {
        Ok(match op {
            "all_reduce" => {
                group.all_reduce_sum(buf).await?;
                Vec::new()
            }
            "all_gather" => group.all_gather(local).await?,
            _ => group.reduce_scatter_sum(buf).await?,
        })
    };
    let out = run_once(&mut buf, &local).await?;
    let ok = match op {
        "all_reduce" => buf.iter().all(|&x| x == w as f32),
        "all_gather" => out.len() == n && out.chunks(n / w).enumerate().all(|(r, c)| c.iter().all(|&x| x == (r + 1) as f32)),
        _ => out.iter().all(|&x| x == w as f32),
    };
    ensure!(ok, "rank {rank}: wrong {op} result");
    buf.fill(0.0);
    for _ in 1..args.warmup {
        run_once(&mut buf, &local).await?;
    }
    // Start together: a one-element all-reduce is the barrier.
    group.all_reduce_sum(&mut [0.0]).await?;
    let t = Instant::now();
    for _ in 0..args.iters {
        run_once(&mut buf, &local).await?;
    }
    let mine = t.elapsed().as_secs_f64();
    // The slowest rank defines the op's time.
    let all = group.all_gather(&[mine as f32]).await?;
    let seconds = all.iter().fold(0f32, |a, &b| a.max(b)) as f64 / args.iters as f64;
    let algbw = args.bytes as f64 / seconds / 1e9;
    let factor = match op {
        "all_reduce" => 2.0 * (w as f64 - 1.0) / w as f64,
        _ => (w as f64 - 1.0) / w as f64,
    };
    let result = serde_json::json!({
        "bench": "collective",
        "op": op,
        "workers": w,
        "bytes": args.bytes,
        "iterations": args.iters,
        "warmup": args.warmup,
        "transport": args.transport.as_str(),
        "tls": match (args.tls.tls_ca.is_some(), args.tls.tls_mutual) {
            (false, _) => "off",
            (true, false) => "tls",
            (true, true) => "mutual",
        },
        "chunk_bytes": args.chunk_bytes,
        "seconds": seconds,
        "algbw_GBps": algbw,
        "busbw_GBps": algbw * factor,
    });
    println!("{result}");
    std::io::stdout().flush()?;
    Ok(())
}
