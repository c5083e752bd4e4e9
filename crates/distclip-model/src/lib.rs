//! An OpenCLIP-compatible CLIP model in Burn: the ViT image tower, the text transformer, the
//! contrastive losses and checkpoint import/export with OpenCLIP's key names.
//!
//! Numerically it is OpenCLIP's `CLIP` (`open_clip/model.py`, `transformer.py`): weights move
//! both ways, and the parity tests hold embeddings, logits and losses to 1e-4 of OpenCLIP's.
//!
//! ```no_run
//! use distclip_model::{ClipConfig, device::parse_device};
//! let device = parse_device("flex").unwrap();
//! let model = ClipConfig::from_name_or_path("ViT-B-32").unwrap().init(&device);
//! ```

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod device;
pub mod lock;
pub mod loss;
pub mod nn;
pub mod patch_dropout;
pub mod pos_embed;
pub mod vision;

pub use clip::{Clip, l2_normalize};
pub use config::ClipConfig;

/// Errors of model construction and checkpoint I/O.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model config that cannot be parsed or built.
    #[error("model config: {0}")]
    Config(String),
    /// A checkpoint that cannot be read, or does not fit the model.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A device string that names nothing, or a backend not compiled in.
    #[error("device: {0}")]
    Device(String),
    /// Input tensors of the wrong shape.
    #[error("shape: {0}")]
    Shape(String),
}
