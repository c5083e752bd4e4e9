//! The control link to the coordinator: connecting (TLS, token), the step loop's calls that ride
//! out a coordinator restart, and the heartbeat task beside the step loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distclip_comm::Group;
use distclip_proto::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::WorkerError;
use super::retry::{self, Retry};

/// A coordinator client that sends the run token on every call.
pub(super) type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// Adds the run token to every control-plane call.
#[derive(Clone)]
pub(super) struct TokenInterceptor(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(distclip_proto::auth::HEADER, v.clone());
        }
        Ok(req)
    }
}

/// Connect to the coordinator at `url`, retrying while it is not up yet ([`retry::CONNECT`]).
pub(super) async fn connect(
    url: &str,
    token: Option<&str>,
    tls: Option<&distclip_proto::tls::Tls>,
) -> Result<Client, WorkerError> {
    let err = |message: String| WorkerError::Coordinator { url: url.to_owned(), message };
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| err(format!("not a valid URL ({e}); pass e.g. http://host:port")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    match (tls, endpoint.uri().scheme_str()) {
        (Some(tls), Some("https")) => {
            let host = endpoint.uri().host().unwrap_or_default().to_owned();
            endpoint = endpoint
                .tls_config(tls.client_config(&host))
                .map_err(|e| err(format!("TLS settings: {}", distclip_proto::tls::error_chain(&e))))?;
        }
        (Some(_), _) => return Err(err("TLS is on, so the coordinator URL must start with https://".into())),
        (None, Some("https")) => {
            return Err(err("an https:// URL needs TLS settings (--tls-ca, --tls-cert, --tls-key)".into()));
        }
        (None, _) => {}
    }
    let header = token
        .map(|t| distclip_proto::auth::bearer(t).map_err(err))
        .transpose()?;
    let mut retry = Retry::new(retry::CONNECT);
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(CoordinatorClient::with_interceptor(ch, TokenInterceptor(header))
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20));
            }
            Err(e) if distclip_proto::tls::is_tls_refusal(&e) => {
                return Err(err(format!(
                    "the TLS handshake failed ({}); check that --tls-ca signed the coordinator's certificate and that it names the host dialled (or --tls-server-name)",
                    distclip_proto::tls::error_chain(&e)
                )));
            }
            Err(e) => match retry.next_delay() {
                Some(backoff) => {
                    tracing::debug!("coordinator {url} not reachable yet ({e}); retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                }
                None => {
                    return Err(err(format!(
                        "unreachable for {:?} ({}); check the address and that the coordinator runs",
                        retry::CONNECT.give_up_after.unwrap_or_default(),
                        distclip_proto::tls::error_chain(&e)
                    )));
                }
            },
        }
    }
}

/// The step loop's calls to the coordinator, riding out a coordinator restart
/// ([`retry::COORDINATOR_OUTAGE`]): a call that finds it unreachable is retried with backoff,
/// and when the restarted coordinator no longer knows this worker (NOT_FOUND: it resumed from
/// its run state without its members) the worker joins again with its current step and repeats
/// the call.
pub(super) struct Link {
    pub(super) client: Client,
    pub(super) url: String,
    /// This worker's join, sent again (with the current step) to a restarted coordinator.
    pub(super) join: pb::JoinRequest,
    rejoined: bool,
}

impl Link {
    /// A link that joined with `join`.
    pub(super) fn new(client: Client, url: String, join: pb::JoinRequest) -> Self {
        Self { client, url, join, rejoined: false }
    }

    /// Whether a call joined a restarted coordinator since the last time this was asked.
    pub(super) fn take_rejoined(&mut self) -> bool {
        std::mem::take(&mut self.rejoined)
    }

    /// Run `f` on the coordinator; `step` is this worker's step, for a join again.
    pub(super) fn call<T, Fut>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        what: &str,
        step: u64,
        f: impl Fn(Client) -> Fut,
    ) -> Result<T, WorkerError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut retry = Retry::new(retry::COORDINATOR_OUTAGE);
        let mut rejoin = false;
        loop {
            let result = if rejoin {
                let req = pb::JoinRequest { step, ..self.join.clone() };
                rt.block_on(self.client.join(req)).map(|_| {
                    tracing::info!(step, "joined the restarted coordinator again");
                    rejoin = false;
                    self.rejoined = true;
                })
            } else {
                match rt.block_on(f(self.client.clone())) {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) => Err(s),
                }
            };
            let Err(status) = result else { continue };
            // UNAVAILABLE: no connection; UNKNOWN: the connection broke mid-call (the
            // coordinator's service never answers UNKNOWN itself). Every call here is safe to
            // repeat: a repeated vote gets the decision already made, or a refusal from a
            // coordinator that restarted.
            let retry_code =
                matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::NotFound);
            let backoff = if retry_code { retry.next_delay() } else { None };
            let Some(backoff) = backoff else {
                let what = if rejoin { "joining again" } else { what };
                return Err(rpc_err(&self.url, what)(status));
            };
            if status.code() == tonic::Code::NotFound {
                rejoin = true;
            }
            tracing::warn!("coordinator {}: {what}: {} ({:?}); retrying in {backoff:?}", self.url, status.message(), status.code());
            std::thread::sleep(backoff);
        }
    }
}

/// A coordinator call's failure as a [`WorkerError`] that says what was being done, with the
/// transport's cause and a hint for TLS refusals.
pub(super) fn rpc_err(url: &str, what: &str) -> impl FnOnce(tonic::Status) -> WorkerError {
    let url = url.to_owned();
    let what = what.to_owned();
    move |s| {
        // A broken connection's status says only "transport error": its cause is in the sources.
        let mut detail = s.message().to_owned();
        if let Some(cause) = std::error::Error::source(&s) {
            let cause = distclip_proto::tls::error_chain(cause);
            detail = if cause.starts_with(&detail) { cause } else { format!("{detail}: {cause}") };
        }
        if distclip_proto::tls::is_tls_refusal(&s) {
            detail.push_str(
                "; the TLS session was refused: under --tls-mutual every worker presents --tls-cert and --tls-key signed by the run's --tls-ca",
            );
        }
        WorkerError::Coordinator { url, message: format!("{what}: {detail} ({:?})", s.code()) }
    }
}

/// Heartbeats on their own task, so a long step never looks like a death. Their answers also
/// say when the coordinator dropped a quorum's step: a collective of that quorum still running
/// here is stopped (its silent peer may never answer).
pub(super) struct Heartbeat {
    /// The step and state sent with each beat.
    beat: Arc<Mutex<(u64, String)>>,
    /// The ring of the quorum this worker is training in.
    group: Arc<Mutex<Option<Arc<Group>>>>,
}

impl Heartbeat {
    /// Start beating every `every_ms` (at least 50 ms) on `rt`.
    pub(super) fn spawn(rt: &tokio::runtime::Runtime, mut client: Client, worker_id: String, every_ms: u64) -> Self {
        let beat = Arc::new(Mutex::new((0u64, String::from("starting"))));
        let group: Arc<Mutex<Option<Arc<Group>>>> = Arc::new(Mutex::new(None));
        let (task_beat, task_group) = (beat.clone(), group.clone());
        let every = Duration::from_millis(every_ms.max(50));
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let (step, state) = task_beat.lock().map(|g| g.clone()).unwrap_or_default();
                match client.heartbeat(pb::HeartbeatRequest { worker_id: worker_id.clone(), step, state }).await {
                    Ok(r) if !r.get_ref().known => tracing::warn!("the coordinator no longer knows this worker"),
                    Ok(r) => {
                        let abandoned = r.get_ref().abandoned_quorum;
                        let group = task_group.lock().ok().and_then(|g| g.clone());
                        if let Some(g) = group.filter(|g| g.quorum_id() == abandoned) {
                            g.abort(&format!("the coordinator dropped the step of quorum {abandoned} (a member died or failed)"));
                        }
                    }
                    Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
                }
            }
        });
        Self { beat, group }
    }

    /// What the next beats say: this worker's step and what it is doing.
    pub(super) fn set_state(&self, step: u64, state: &str) {
        if let Ok(mut g) = self.beat.lock() {
            *g = (step, state.to_owned());
        }
    }

    /// The ring whose collectives an abandoned-quorum answer stops.
    pub(super) fn set_group(&self, group: Option<Arc<Group>>) {
        if let Ok(mut current) = self.group.lock() {
            *current = group;
        }
    }
}
