//! The coordinator's HTTP side, on its own port beside gRPC: `GET /` (the status page, a
//! person's view of the run that updates itself), `GET /api/status` (the same data as JSON),
//! `GET /metrics` (Prometheus text format) and `GET /healthz`. One router over a read-only view
//! of the machine.
//!
//! Every request only reads the machine under its lock and renders outside it; a failure of
//! the HTTP server is logged and never ends the run.

use crate::error::CoordinatorError;
use crate::machine::Machine;
use crate::metrics::{CONTENT_TYPE, render_prometheus};
use crate::persist::RunDir;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Read access to the coordinator's machine, which the HTTP handlers render from.
pub(crate) trait MachineView: Send + Sync + 'static {
    /// Run `f` on the machine (under its lock: keep `f` short).
    fn with_machine<R>(&self, f: impl FnOnce(&Machine) -> R) -> R;

    /// The document of `GET /api/status` (see [`crate::status::status_json`]).
    fn status(&self) -> serde_json::Value;

    /// Latencies the shell measured, if it measures them.
    fn latency(&self) -> Option<crate::metrics::Latency> {
        None
    }
}

/// The status page: static, it fetches `/api/status` itself.
const STATUS_PAGE: &str = include_str!("status.html");

/// The routes, over `view`.
pub(crate) fn router<V: MachineView>(view: Arc<V>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status::<V>))
        .route("/metrics", get(metrics::<V>))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(view)
}

async fn metrics<V: MachineView>(State(view): State<Arc<V>>) -> impl IntoResponse {
    let snapshot = view.with_machine(|m| m.metrics(Instant::now()));
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render_prometheus(&snapshot, view.latency().as_ref()))
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], STATUS_PAGE)
}

async fn status<V: MachineView>(State(view): State<Arc<V>>) -> impl IntoResponse {
    let doc = view.status().to_string();
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], doc)
}

/// Liveness: the process answers. The run's own state is in `/metrics`.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found: the coordinator serves GET / (status page), /api/status, /metrics and /healthz\n")
}

/// A bound HTTP listener, not yet serving.
#[derive(Debug)]
pub(crate) struct HttpListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl HttpListener {
    /// The address actually bound.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Bind `addr` (port 0: a free one) and write the bound address to `RUN_DIR/coordinator.http`.
/// `None`: no HTTP endpoint.
pub(crate) async fn bind(
    addr: Option<&str>,
    dir: &RunDir,
) -> Result<Option<HttpListener>, CoordinatorError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let err = |e: std::io::Error| CoordinatorError::HttpBind {
        addr: addr.to_owned(),
        message: e.to_string(),
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    dir.write_http_addr(&bound.to_string())?;
    Ok(Some(HttpListener {
        listener,
        addr: bound,
    }))
}

/// A running HTTP server.
pub(crate) struct HttpServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Serve `router(view)` on `listener` until [`HttpServer::stop`].
pub(crate) fn spawn<V: MachineView>(listener: HttpListener, view: Arc<V>) -> HttpServer {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = listener.addr;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener.listener, router(view))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!("the HTTP endpoint on {addr} stopped: {e}; training goes on without /metrics");
        }
    });
    HttpServer { stop, task }
}

impl HttpServer {
    /// Stop accepting, let requests in flight finish briefly, then drop what is left.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::ShardInfo;
    use crate::machine::MachineConfig;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed(Mutex<Machine>);

    impl MachineView for Fixed {
        fn with_machine<R>(&self, f: impl FnOnce(&Machine) -> R) -> R {
            f(&self.0.lock().unwrap())
        }

        fn status(&self) -> serde_json::Value {
            let m = self.with_machine(|m| m.metrics(Instant::now()));
            crate::status::status_json(&m, &crate::status::Recent::default(), None, None)
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_answer_and_unknown_paths_say_what_exists() {
        let config = distclip_config::RunConfig::default();
        let shards = vec![ShardInfo { url: "/d/0.tar".into(), weight: 1.0 }];
        let m = Machine::new(MachineConfig::from_run(&config, None), String::new(), "run-h".into(), shards, Instant::now());
        let dir = std::env::temp_dir().join(format!("distclip-http-{}", std::process::id()));
        let run_dir = RunDir::create(&dir).unwrap();
        let listener = bind(Some("127.0.0.1:0"), &run_dir).await.unwrap().unwrap();
        let addr = listener.local_addr();
        let written = std::fs::read_to_string(dir.join("coordinator.http")).unwrap();
        assert_eq!(written.trim(), addr.to_string());
        let server = spawn(listener, Arc::new(Fixed(Mutex::new(m))));

        let r = get(addr, "/metrics").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("content-type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("\ndistclip_run_info{run_id=\"run-h\",state=\"waiting\"} 1\n"), "{r}");
        let r = get(addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
        let r = get(addr, "/").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("text/html") && r.contains("fetch(\"/api/status\""), "{r}");
        let r = get(addr, "/api/status").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("application/json"), "{r}");
        let body: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!((body["run_id"].as_str(), body["state"].as_str(), body["step"].as_u64()), (Some("run-h"), Some("waiting"), Some(0)));
        let r = get(addr, "/nope").await;
        assert!(r.starts_with("HTTP/1.1 404") && r.contains("/metrics"), "{r}");
        server.stop().await;

        // A taken port is an error naming the address and the flag.
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let busy = taken.local_addr().unwrap().to_string();
        let e = bind(Some(&busy), &run_dir).await.unwrap_err().to_string();
        assert!(e.contains(&busy) && e.contains("--http-listen"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
