//! distclip's WebDataset input pipeline: dataset specs to batches, deterministic and robust.
//!
//! - [`spec`]: `/data/{00000..41455}.tar::s3://bucket/{000..999}.tar@2` to a [`ShardList`].
//! - [`source`]: one streaming read per shard (local, S3, GCS, Azure, HTTP, injected stores),
//!   with retries and mid-stream resume.
//! - [`samples`]: tar members grouped into samples as OpenCLIP groups them, with positions
//!   (shard, index) and skip reasons.
//! - [`transform`]: decode (pixel limit), RandomResizedCrop or the eval transform, tokenize.
//! - [`loader`]: N decode threads, bounded prefetch, seeded shard and sample shuffles, resampled
//!   mode, coordinator-fed shard tasks with skip ranges, batches tagged with positions and
//!   with the shard tasks they complete.
//! - [`writer`], [`synth`]: LAION-layout shard writing and a synthetic shapes dataset.
//! - [`stats`]: stream a spec through the pipeline and count; time decoding alone.
//!
//! The crate knows nothing of the model: batches are plain `Vec<f32>`/`Vec<i64>`.

pub mod caption;
pub mod loader;
pub mod remote_sync;
pub mod samples;
pub mod source;
pub mod spec;
pub mod stats;
pub mod synth;
pub mod transform;
pub mod writer;

pub use caption::CaptionKey;
pub use loader::{Batch, FailedShard, Loader, LoaderConfig, LoaderError, Order, ShardSummary, ShardTask};
pub use samples::{RawSample, SamplePos, ShardEvent, ShardReader, SkipReason};
pub use source::{RetryPolicy, ShardCheck, ShardOpener, SourceError, check_shards};
pub use spec::{Location, Shard, ShardList, SpecError};
pub use stats::{DataStats, StatsOptions};
pub use transform::{Augment, Example, TransformConfig};
