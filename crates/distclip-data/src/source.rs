//! Opening one shard as one streaming read.
//!
//! Local files are read with `std::fs`. Object stores (S3, GCS, Azure, HTTP, and injected stores
//! such as `object_store::memory::InMemory`) are read with a single streaming GET whose body is
//! pumped by a small tokio runtime into a bounded channel, so network reads overlap decoding
//! and nothing is written to disk. If the body breaks mid-stream (connection reset, timeout) the
//! reader resumes with a ranged GET from the byte it had reached, pinned to the object's ETag,
//! so the tar parser above never notices a retried read. Failures that may heal (timeouts,
//! resets, server errors) are retried with exponential backoff up to [`RetryPolicy::attempts`];
//! those that cannot (a local file or object that is not there, permission denied, refused
//! credentials, an object replaced mid-read) fail at once. Both end as [`SourceError`]s, and
//! every retry is counted ([`ShardOpener::retries`]).
//!
//! Credentials and endpoints come from the usual environment variables, read by
//! `object_store`'s `from_env` builders: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_ALLOW_HTTP`,
//! `GOOGLE_SERVICE_ACCOUNT`/`GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`,
//! `AZURE_STORAGE_ACCOUNT_KEY`, and so on.
//!
//! Call [`ShardOpener::open`] and read the stream from ordinary threads, not from inside an
//! async runtime: the reader blocks on its channel.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::spec::{Location, SpecError};

/// How failing opens and broken streams are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total tries per failure (1 = no retry).
    pub attempts: u32,
    /// Sleep before the second try; doubled each time.
    pub initial_backoff: Duration,
    /// Upper bound on one sleep.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// A policy for tests: `attempts` tries, 1 ms apart.
    pub fn fast(attempts: u32) -> Self {
        Self {
            attempts: attempts.max(1),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Local errors that trying again cannot heal: the path is not there or not a file, or access
/// is refused. (A file being written by another process shows up as a short read, not here.)
fn cannot_heal_io(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(kind, K::NotFound | K::PermissionDenied | K::IsADirectory | K::NotADirectory | K::InvalidInput)
}

/// Object-store errors that trying again cannot heal: not found (HTTP 404), refused (401,
/// 403), a bad path or an unsupported call, or an object replaced since the read began
/// (its ETag no longer matches, so resuming would mix two versions).
fn cannot_heal_store(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    matches!(
        e,
        E::NotFound { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::Precondition { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

/// A shard that could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL itself is malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The object-store client could not be configured (missing credentials, bad endpoint).
    #[error(
        "cannot set up a client for {url}: {message}; check the credentials and endpoint environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_NAME, ...)"
    )]
    Client {
        /// The shard URL.
        url: String,
        /// The client error.
        message: String,
    },
    /// The first GET (or file open) failed every try.
    #[error("cannot open shard {url} {}: {message}", tries(*attempts, *cannot_heal))]
    Open {
        /// The shard URL.
        url: String,
        /// Tries made.
        attempts: u32,
        /// The last error.
        message: String,
        /// Whether the last error was "not found".
        not_found: bool,
        /// Whether the last error was one that trying again cannot heal (so it was not retried).
        cannot_heal: bool,
    },
}

fn tries(attempts: u32, cannot_heal: bool) -> String {
    match (attempts, cannot_heal) {
        (1, true) => "(not retried: this error cannot heal)".to_owned(),
        (1, false) => "(1 attempt)".to_owned(),
        (n, _) => format!("after {n} attempts"),
    }
}

/// Opens shards by URL. Cheap to clone; clones share clients and the IO runtime.
#[derive(Clone)]
pub struct ShardOpener {
    inner: Arc<Inner>,
}

struct Inner {
    retry: RetryPolicy,
    /// Clients per (scheme, bucket), built on first use; injected ones are pre-seeded.
    stores: Mutex<HashMap<(String, String), Arc<dyn ObjectStore>>>,
    runtime: OnceLock<Result<tokio::runtime::Runtime, String>>,
    /// Chunks buffered ahead of the reader per open stream.
    read_ahead: usize,
    /// Store settings (`aws_endpoint`, `aws_allow_http`, ...) applied over the environment.
    options: Vec<(String, String)>,
    /// Retries made (opens and resumed reads), shared with the readers.
    retries: Arc<AtomicU64>,
}

impl std::fmt::Debug for ShardOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardOpener")
            .field("retry", &self.inner.retry)
            .finish_non_exhaustive()
    }
}

impl Default for ShardOpener {
    fn default() -> Self {
        Self::new(RetryPolicy::default())
    }
}

impl ShardOpener {
    /// An opener with the given retry policy.
    pub fn new(retry: RetryPolicy) -> Self {
        Self {
            inner: Arc::new(Inner {
                retry,
                stores: Mutex::new(HashMap::new()),
                runtime: OnceLock::new(),
                read_ahead: 16,
                options: Vec::new(),
                retries: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// Serve URLs `scheme://bucket/...` from `store` (for `memory://` use an empty bucket:
    /// `with_store("memory", "", Arc::new(InMemory::new()))`). Call before sharing the opener.
    pub fn with_store(self, scheme: &str, bucket: &str, store: Arc<dyn ObjectStore>) -> Self {
        if let Ok(mut stores) = self.inner.stores.lock() {
            stores.insert((scheme.to_string(), bucket.to_string()), store);
        }
        self
    }

    /// Store settings that override the environment, as `object_store` config keys: for S3
    /// `aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`,
    /// `aws_allow_http`, ...; for GCS `google_service_account`, ...; for Azure
    /// `azure_storage_account_name`, .... Each store takes the keys it understands. Call before
    /// the first `open` and before cloning.
    pub fn with_options<K: Into<String>, V: Into<String>>(
        mut self,
        options: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let opts: Vec<(String, String)> = options
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.options.extend(opts),
            None => tracing::warn!(
                "ShardOpener::with_options called on a shared opener; options ignored"
            ),
        }
        self
    }

    /// The retry policy in force.
    pub fn retry(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// Retries made so far by this opener and its clones: opens tried again and reads resumed
    /// after a broken stream.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// Open `url` as one streaming read. Retries the open per the policy.
    pub fn open(&self, url: &str) -> Result<ShardStream, SourceError> {
        match Location::parse(url)? {
            Location::Local(path) => self.open_local(url, &path),
            Location::Object {
                scheme,
                bucket,
                key,
            } => {
                let store = self.store(url, &scheme, &bucket)?;
                let runtime = self.runtime(url)?;
                let mut remote = RemoteReader {
                    url: url.to_string(),
                    store,
                    path: StorePath::from(key),
                    handle: runtime,
                    retry: self.inner.retry.clone(),
                    retries: self.inner.retries.clone(),
                    read_ahead: self.inner.read_ahead,
                    offset: 0,
                    size: None,
                    etag: None,
                    chunk: bytes::Bytes::new(),
                    rx: None,
                    failures: 0,
                };
                remote.start()?;
                Ok(ShardStream::Remote(remote))
            }
        }
    }

    /// Whether the shard at `url` exists: a stat for a local file, one HEAD for an object
    /// (no retries: a start-up check, not a read). `Ok(false)` only for "not found"; any other
    /// failure (no credentials, unreachable endpoint, permission denied) is an error.
    pub fn exists(&self, url: &str) -> Result<bool, SourceError> {
        let failed = |message: String| SourceError::Open {
            url: url.to_string(),
            attempts: 1,
            message,
            not_found: false,
            cannot_heal: false,
        };
        match Location::parse(url)? {
            Location::Local(path) => match std::fs::metadata(&path) {
                Ok(m) => Ok(m.is_file()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(failed(e.to_string())),
            },
            Location::Object {
                scheme,
                bucket,
                key,
            } => {
                use object_store::ObjectStoreExt;
                let store = self.store(url, &scheme, &bucket)?;
                let runtime = self.runtime(url)?;
                match runtime.block_on(store.head(&StorePath::from(key))) {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(failed(e.to_string())),
                }
            }
        }
    }

    fn open_local(&self, url: &str, path: &std::path::Path) -> Result<ShardStream, SourceError> {
        let retry = &self.inner.retry;
        let mut failures = 0;
        loop {
            match std::fs::File::open(path) {
                Ok(f) if f.metadata().is_ok_and(|m| m.is_dir()) => {
                    return Err(SourceError::Open {
                        url: url.to_string(),
                        attempts: failures + 1,
                        message: "this is a folder, not a tar shard".into(),
                        not_found: false,
                        cannot_heal: true,
                    });
                }
                Ok(f) => {
                    return Ok(ShardStream::Local(std::io::BufReader::with_capacity(
                        1 << 20,
                        f,
                    )));
                }
                Err(e) => {
                    failures += 1;
                    let cannot_heal = cannot_heal_io(e.kind());
                    if failures >= retry.attempts || cannot_heal {
                        return Err(SourceError::Open {
                            url: url.to_string(),
                            attempts: failures,
                            not_found: e.kind() == std::io::ErrorKind::NotFound,
                            message: e.to_string(),
                            cannot_heal,
                        });
                    }
                    self.inner.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(retry.backoff(failures));
                }
            }
        }
    }

    fn runtime(&self, url: &str) -> Result<tokio::runtime::Handle, SourceError> {
        let rt = self.inner.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("distclip-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        });
        match rt {
            Ok(rt) => Ok(rt.handle().clone()),
            Err(e) => Err(SourceError::Client {
                url: url.to_string(),
                message: format!("cannot start the IO runtime: {e}"),
            }),
        }
    }

    fn store(
        &self,
        url: &str,
        scheme: &str,
        bucket: &str,
    ) -> Result<Arc<dyn ObjectStore>, SourceError> {
        let key = (scheme.to_string(), bucket.to_string());
        let mut stores = self.inner.stores.lock().map_err(|_| SourceError::Client {
            url: url.to_string(),
            message: "client cache poisoned".into(),
        })?;
        if let Some(s) = stores.get(&key) {
            return Ok(s.clone());
        }
        let store = build_store(url, scheme, bucket, &self.inner.options)?;
        stores.insert(key, store.clone());
        Ok(store)
    }
}

/// What [`check_shards`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ShardCheck {
    /// Shards looked at (every local one; a spread-out sample of the remote ones).
    pub checked: usize,
    /// Of those, the ones that exist.
    pub found: usize,
    /// Up to 5 that do not exist.
    pub missing: Vec<String>,
    /// Shards whose check failed for another reason (credentials, endpoint), with the error.
    pub unknown: Vec<(String, String)>,
}

impl ShardCheck {
    /// Checked shards that do not exist.
    pub fn missing_count(&self) -> usize {
        self.checked - self.found - self.unknown.len()
    }
}

/// Check that the shards of a spec exist before a run starts: every local shard (a stat each)
/// and at most `max_remote` remote ones, spread evenly over the list (one HEAD each), so that
/// a spec of 231k objects costs a few requests.
pub fn check_shards(opener: &ShardOpener, urls: &[&str], max_remote: usize) -> ShardCheck {
    let (local, remote): (Vec<&str>, Vec<&str>) = urls
        .iter()
        .partition(|u| matches!(Location::parse(u), Ok(Location::Local(_))));
    let step = remote.len().div_ceil(max_remote.max(1)).max(1);
    let mut check = ShardCheck::default();
    for url in local.into_iter().chain(remote.into_iter().step_by(step)) {
        check.checked += 1;
        match opener.exists(url) {
            Ok(true) => check.found += 1,
            Ok(false) => {
                if check.missing.len() < 5 {
                    check.missing.push(url.to_string());
                }
            }
            Err(e) => check.unknown.push((url.to_string(), e.to_string())),
        }
    }
    check
}

/// Request retries inside `object_store` stay short: ours (with resume) are the outer loop.
fn client_retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(60),
    }
}

/// Streaming a large shard can take longer than object_store's default 30 s request timeout; a
/// timeout mid-body is resumed by the reader anyway, so use a generous one. (HTTP stores; the
/// cloud stores get the same values as config keys in `build_store`.)
fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_timeout(Duration::from_secs(300))
        .with_connect_timeout(Duration::from_secs(10))
}

/// Apply the options whose keys parse as this store's config keys.
fn configure<B, K: std::str::FromStr>(
    mut builder: B,
    options: &[(String, String)],
    set: impl Fn(B, K, &str) -> B,
) -> B {
    for (k, v) in options {
        if let Ok(key) = k.parse::<K>() {
            builder = set(builder, key, v);
        }
    }
    builder
}

pub(crate) fn build_store(
    url: &str,
    scheme: &str,
    bucket: &str,
    options: &[(String, String)],
) -> Result<Arc<dyn ObjectStore>, SourceError> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let client_err = |e: object_store::Error| SourceError::Client {
        url: url.to_string(),
        message: e.to_string(),
    };
    // Our timeouts first, then the caller's options; set key by key so that client settings
    // from the environment (AWS_ALLOW_HTTP, ...) survive.
    let defaults = [("timeout", "300s"), ("connect_timeout", "10s")]
        .map(|(k, v)| (k.to_string(), v.to_string()));
    let options: Vec<(String, String)> = defaults
        .into_iter()
        .chain(options.iter().cloned())
        .collect();
    let options = options.as_slice();
    let store: Arc<dyn ObjectStore> = match scheme {
        "s3" => Arc::new(
            configure(
                AmazonS3Builder::from_env(),
                options,
                |b, k: AmazonS3ConfigKey, v| b.with_config(k, v),
            )
            .with_bucket_name(bucket)
            .with_retry(client_retry())
            .build()
            .map_err(client_err)?,
        ),
        "gs" => Arc::new(
            configure(
                GoogleCloudStorageBuilder::from_env(),
                options,
                |b, k: GoogleConfigKey, v| b.with_config(k, v),
            )
            .with_bucket_name(bucket)
            .with_retry(client_retry())
            .build()
            .map_err(client_err)?,
        ),
        "az" => Arc::new(
            configure(
                MicrosoftAzureBuilder::from_env(),
                options,
                |b, k: AzureConfigKey, v| b.with_config(k, v),
            )
            .with_container_name(bucket)
            .with_retry(client_retry())
            .build()
            .map_err(client_err)?,
        ),
        "http" | "https" => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(format!("{scheme}://{bucket}"))
                .with_retry(client_retry())
                .with_client_options(client_options().with_allow_http(scheme == "http"))
                .build()
                .map_err(client_err)?,
        ),
        _ => {
            return Err(SourceError::Client {
                url: url.to_string(),
                message: format!(
                    "no store is registered for {scheme}://{bucket}; register one with ShardOpener::with_store"
                ),
            });
        }
    };
    Ok(store)
}

/// One shard's bytes, read forward once.
pub enum ShardStream {
    /// A local file.
    Local(std::io::BufReader<std::fs::File>),
    /// An object-store GET, resumed on failure.
    Remote(RemoteReader),
}

impl Read for ShardStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ShardStream::Local(r) => r.read(buf),
            ShardStream::Remote(r) => r.read(buf),
        }
    }
}

enum Msg {
    Data(bytes::Bytes),
    Err(String),
}

/// A streaming GET that resumes from its offset when the body breaks.
pub struct RemoteReader {
    url: String,
    store: Arc<dyn ObjectStore>,
    path: StorePath,
    handle: tokio::runtime::Handle,
    retry: RetryPolicy,
    /// The opener's retry count.
    retries: Arc<AtomicU64>,
    read_ahead: usize,
    /// Bytes handed to the caller so far.
    offset: u64,
    /// Object size from the first response, to tell a clean end from a cut one.
    size: Option<u64>,
    /// ETag of the first response, so a resumed read never mixes two versions of the object.
    etag: Option<String>,
    chunk: bytes::Bytes,
    rx: Option<tokio::sync::mpsc::Receiver<Msg>>,
    /// Consecutive failed tries without a byte of progress.
    failures: u32,
}

impl RemoteReader {
    /// Issue a GET from `self.offset`, retrying per the policy; on success start the pump.
    fn start(&mut self) -> Result<(), SourceError> {
        let mut failures = 0;
        loop {
            let opts = GetOptions {
                range: (self.offset > 0).then_some(GetRange::Offset(self.offset)),
                if_match: if self.offset > 0 {
                    self.etag.clone()
                } else {
                    None
                },
                ..Default::default()
            };
            let store = self.store.clone();
            let path = self.path.clone();
            match self
                .handle
                .block_on(async move { store.get_opts(&path, opts).await })
            {
                Ok(result) => {
                    if self.size.is_none() {
                        self.size = Some(result.meta.size);
                        self.etag = result.meta.e_tag.clone();
                    }
                    let (tx, rx) = tokio::sync::mpsc::channel(self.read_ahead);
                    let mut stream = result.into_stream();
                    self.handle.spawn(async move {
                        while let Some(item) = stream.next().await {
                            let (msg, stop) = match item {
                                Ok(b) => (Msg::Data(b), false),
                                Err(e) => (Msg::Err(e.to_string()), true),
                            };
                            // The reader hung up (shard abandoned): stop pulling the body.
                            if tx.send(msg).await.is_err() || stop {
                                return;
                            }
                        }
                    });
                    self.rx = Some(rx);
                    return Ok(());
                }
                Err(e) => {
                    failures += 1;
                    let cannot_heal = cannot_heal_store(&e);
                    if failures >= self.retry.attempts || cannot_heal {
                        return Err(SourceError::Open {
                            url: self.url.clone(),
                            attempts: failures,
                            not_found: matches!(e, object_store::Error::NotFound { .. }),
                            message: e.to_string(),
                            cannot_heal,
                        });
                    }
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(self.retry.backoff(failures));
                }
            }
        }
    }

    /// The next chunk, resuming the GET when the body breaks before the object's end.
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        loop {
            let msg = self.rx.as_mut().and_then(|rx| rx.blocking_recv());
            let problem = match msg {
                // Only bytes count as progress: a body that breaks before its first byte on every
                // resume must still run out of attempts.
                Some(Msg::Data(b)) if b.is_empty() => continue,
                Some(Msg::Data(b)) => {
                    self.failures = 0;
                    return Ok(Some(b));
                }
                Some(Msg::Err(e)) => e,
                None if self.size.is_none_or(|s| self.offset >= s) => return Ok(None),
                None => format!(
                    "stream ended at byte {} of {}",
                    self.offset,
                    self.size.unwrap_or(0)
                ),
            };
            self.failures += 1;
            if self.failures >= self.retry.attempts {
                return Err(std::io::Error::other(format!(
                    "reading shard {} failed at byte {} after {} attempts: {problem}",
                    self.url, self.offset, self.failures
                )));
            }
            tracing::debug!(url = %self.url, offset = self.offset, error = %problem, "resuming shard read");
            self.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.retry.backoff(self.failures));
            self.rx = None;
            if let Err(e) = self.start() {
                return Err(std::io::Error::other(format!(
                    "resuming shard {} at byte {}: {e}",
                    self.url, self.offset
                )));
            }
        }
    }
}

impl Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.next_chunk()? {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! An object store that breaks its GET bodies, to test resume and failure handling.
    use super::*;
    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use object_store::{
        CopyOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
    };
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Delegates to `inner`; the first `refused_gets` GETs fail before any body (like a 503),
    /// and the first `broken_gets` GET bodies after them fail at absolute byte `cut_after`.
    #[derive(Debug)]
    pub struct FlakyStore {
        pub inner: Arc<dyn ObjectStore>,
        pub cut_after: usize,
        pub broken_gets: u32,
        pub refused_gets: u32,
        pub gets: AtomicU32,
        pub ranges: Mutex<Vec<Option<u64>>>,
    }

    impl FlakyStore {
        pub fn new(inner: Arc<dyn ObjectStore>, cut_after: usize, broken_gets: u32) -> Self {
            Self {
                inner,
                cut_after,
                broken_gets,
                refused_gets: 0,
                gets: AtomicU32::new(0),
                ranges: Mutex::new(Vec::new()),
            }
        }
    }

    impl std::fmt::Display for FlakyStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "FlakyStore")
        }
    }

    #[async_trait]
    impl ObjectStore for FlakyStore {
        async fn put_opts(
            &self,
            location: &StorePath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> Result<PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &StorePath,
            opts: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(&self, location: &StorePath, options: GetOptions) -> Result<GetResult> {
            let n = self.gets.fetch_add(1, Ordering::SeqCst);
            self.ranges.lock().unwrap().push(match &options.range {
                Some(GetRange::Offset(o)) => Some(*o),
                _ => None,
            });
            let start = match &options.range {
                Some(GetRange::Offset(o)) => *o,
                _ => 0,
            };
            if n < self.refused_gets {
                return Err(object_store::Error::Generic { store: "flaky", source: "503 Service Unavailable".into() });
            }
            let result = self.inner.get_opts(location, options).await?;
            if n - self.refused_gets >= self.broken_gets {
                return Ok(result);
            }
            // Deliver up to the absolute byte `cut_after`, then fail like a reset connection.
            let cut = (self.cut_after as u64).saturating_sub(start) as usize;
            let meta = result.meta.clone();
            let range = result.range.clone();
            let attributes = result.attributes.clone();
            let body = object_store::collect_bytes(result.into_stream(), None).await?;
            let head = body.slice(..cut.min(body.len()));
            let stream = futures::stream::iter(vec![
                Ok(head),
                Err(object_store::Error::Generic {
                    store: "flaky",
                    source: "connection reset by peer".into(),
                }),
            ]);
            Ok(GetResult {
                payload: GetResultPayload::Stream(Box::pin(stream)),
                meta,
                range,
                attributes,
                extensions: Default::default(),
            })
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<StorePath>>,
        ) -> BoxStream<'static, Result<StorePath>> {
            self.inner.delete_stream(locations)
        }
        fn list(&self, prefix: Option<&StorePath>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&StorePath>) -> Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &StorePath,
            to: &StorePath,
            options: CopyOptions,
        ) -> Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// An in-memory store holding `objects`, as an opener serving `memory:///`.
    pub fn memory_opener(
        objects: &[(&str, Vec<u8>)],
        retry: RetryPolicy,
    ) -> (ShardOpener, Arc<dyn ObjectStore>) {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        put_all(&store, objects);
        (
            ShardOpener::new(retry).with_store("memory", "", store.clone()),
            store,
        )
    }

    /// Put objects into a store (blocking, on a throwaway runtime).
    pub fn put_all(store: &Arc<dyn ObjectStore>, objects: &[(&str, Vec<u8>)]) {
        use object_store::ObjectStoreExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (key, data) in objects {
            rt.block_on(store.put(&StorePath::from(*key), PutPayload::from(data.clone())))
                .unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::sync::atomic::Ordering;

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn read_all(mut s: ShardStream) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn memory_store_streams_the_whole_object() {
        let (opener, _) = memory_opener(&[("d/0.tar", body(100_000))], RetryPolicy::fast(2));
        assert_eq!(
            read_all(opener.open("memory:///d/0.tar").unwrap()).unwrap(),
            body(100_000)
        );
    }

    #[test]
    fn a_missing_object_is_reported_at_once_as_not_found() {
        let (opener, _) = memory_opener(&[], RetryPolicy::fast(3));
        let err = opener.open("memory:///d/404.tar").err().unwrap();
        match &err {
            SourceError::Open {
                url,
                attempts,
                not_found,
                ..
            } => {
                // Not found cannot heal: one try, no retry.
                assert_eq!(
                    (url.as_str(), *attempts, *not_found),
                    ("memory:///d/404.tar", 1, true)
                );
            }
            other => panic!("{other}"),
        }
        assert_eq!(opener.retries(), 0);
        assert!(err.to_string().contains("not retried"), "{err}");
    }

    #[test]
    fn errors_that_may_heal_are_retried_and_counted() {
        let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        put_all(&inner, &[("x.tar", body(1000))]);
        let flaky = Arc::new(FlakyStore { refused_gets: 2, ..FlakyStore::new(inner.clone(), 0, 0) });
        let opener = ShardOpener::new(RetryPolicy::fast(3)).with_store("memory", "", flaky.clone());
        assert_eq!(read_all(opener.open("memory:///x.tar").unwrap()).unwrap(), body(1000));
        assert_eq!((flaky.gets.load(Ordering::SeqCst), opener.retries()), (3, 2));
        // One try fewer than the refusals: the open fails after its attempts.
        let flaky = Arc::new(FlakyStore { refused_gets: 2, ..FlakyStore::new(inner, 0, 0) });
        let opener = ShardOpener::new(RetryPolicy::fast(2)).with_store("memory", "", flaky);
        let err = opener.open("memory:///x.tar").err().unwrap();
        assert!(matches!(err, SourceError::Open { attempts: 2, not_found: false, .. }), "{err}");
        assert!(err.to_string().contains("after 2 attempts") && err.to_string().contains("503"), "{err}");
        assert_eq!(opener.retries(), 1);
    }
    #[test]
    fn exists_tells_present_from_missing_on_disk_and_in_a_store() {
        let (opener, _) = memory_opener(&[("d/0.tar", body(10))], RetryPolicy::fast(3));
        assert!(opener.exists("memory:///d/0.tar").unwrap());
        assert!(!opener.exists("memory:///d/1.tar").unwrap());
        let dir = std::env::temp_dir().join(format!("distclip-exists-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("0.tar");
        std::fs::write(&file, b"x").unwrap();
        assert!(opener.exists(&file.display().to_string()).unwrap());
        assert!(opener.exists(&format!("file://{}", file.display())).unwrap());
        assert!(!opener.exists(&dir.join("1.tar").display().to_string()).unwrap());
        // A folder is not a shard.
        assert!(!opener.exists(&dir.display().to_string()).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_shards_stats_every_local_shard_and_samples_remote_ones() {
        let objects: Vec<(String, Vec<u8>)> = (0..100).map(|i| (format!("d/{i}.tar"), body(1))).collect();
        let refs: Vec<(&str, Vec<u8>)> = objects.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (opener, _) = memory_opener(&refs, RetryPolicy::fast(1));
        // 200 remote shards, the first 100 present: 10 are checked, spread over the list.
        let urls: Vec<String> = (0..200).map(|i| format!("memory:///d/{i}.tar")).collect();
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        let check = check_shards(&opener, &refs, 10);
        assert_eq!((check.checked, check.found, check.missing_count()), (10, 5, 5));
        assert_eq!(check.missing[0], "memory:///d/100.tar");
        // Local shards are all checked; a bucket without a client configured is "unknown".
        let dir = std::env::temp_dir().join(format!("distclip-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0.tar"), b"x").unwrap();
        let local: Vec<String> = (0..3).map(|i| dir.join(format!("{i}.tar")).display().to_string()).collect();
        let mut refs: Vec<&str> = local.iter().map(String::as_str).collect();
        refs.push("memory://no-such-bucket/0.tar");
        let check = check_shards(&opener, &refs, 10);
        assert_eq!((check.checked, check.found, check.missing.len(), check.unknown.len()), (4, 1, 2, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }


    #[test]
    fn a_body_cut_mid_stream_resumes_with_a_ranged_get() {
        let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        put_all(&inner, &[("x.tar", body(50_000))]);
        let flaky = Arc::new(FlakyStore::new(inner, 20_000, 2));
        let opener = ShardOpener::new(RetryPolicy::fast(4)).with_store("memory", "", flaky.clone());
        assert_eq!(
            read_all(opener.open("memory:///x.tar").unwrap()).unwrap(),
            body(50_000)
        );
        assert_eq!(flaky.gets.load(Ordering::SeqCst), 3);
        assert_eq!(opener.retries(), 2);
        // The first body breaks at 20,000; the first resume breaks at once; the second succeeds.
        assert_eq!(
            *flaky.ranges.lock().unwrap(),
            [None, Some(20_000), Some(20_000)]
        );
    }

    #[test]
    fn a_body_that_always_breaks_is_an_error_after_the_retries() {
        let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        put_all(&inner, &[("x.tar", body(50_000))]);
        let flaky = Arc::new(FlakyStore::new(inner, 0, u32::MAX));
        let opener = ShardOpener::new(RetryPolicy::fast(3)).with_store("memory", "", flaky.clone());
        let err = read_all(opener.open("memory:///x.tar").unwrap()).unwrap_err();
        assert!(err.to_string().contains("after 3 attempts"), "{err}");
        assert!(err.to_string().contains("connection reset"), "{err}");
        assert_eq!(flaky.gets.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn local_files_plain_and_file_url() {
        let dir = std::env::temp_dir().join(format!("distclip-data-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.tar");
        std::fs::write(&p, body(3000)).unwrap();
        let opener = ShardOpener::new(RetryPolicy::fast(2));
        assert_eq!(
            read_all(opener.open(p.to_str().unwrap()).unwrap()).unwrap(),
            body(3000)
        );
        let url = format!("file://{}", p.display());
        assert_eq!(read_all(opener.open(&url).unwrap()).unwrap(), body(3000));
        // A missing file and a folder are final: one try each, no retry.
        let err = opener
            .open(dir.join("missing.tar").to_str().unwrap())
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                SourceError::Open {
                    attempts: 1,
                    not_found: true,
                    ..
                }
            ),
            "{err}"
        );
        let err = opener.open(dir.to_str().unwrap()).err().unwrap();
        assert!(matches!(err, SourceError::Open { attempts: 1, cannot_heal: true, .. }), "{err}");
        assert!(err.to_string().contains("folder"), "{err}");
        assert_eq!(opener.retries(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_url_without_a_registered_store_says_how_to_fix_it() {
        let err = ShardOpener::new(RetryPolicy::fast(1))
            .open("memory:///a.tar")
            .err()
            .unwrap();
        assert!(err.to_string().contains("with_store"), "{err}");
    }
}
