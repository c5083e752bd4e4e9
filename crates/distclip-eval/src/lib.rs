//! Evaluation as OpenCLIP does it (`open_clip_train/zero_shot.py`, `open_clip/zero_shot_classifier.py`,
//! `open_clip_train/train.py::get_clip_metrics`):
//!
//! - **zero-shot classification**: every class name in every prompt template is embedded, the
//!   per-class mean of the normalised embeddings is normalised again, and each image is assigned
//!   the class with the highest cosine similarity; top-1 and top-5 accuracy.
//! - **retrieval**: image→text and text→image recall at 1, 5 and 10 and the mean and median
//!   rank of the true pair, scored in row chunks so that N×N similarities never sit in memory.
//!
//! Inputs come from a WebDataset (labels from a JSON field) or, for zero-shot, an image folder
//! with one subfolder per class.

mod embed;
mod retrieval;
mod suite;
mod zeroshot;

pub use embed::{EvalOptions, Pair, encode_images, encode_texts, read_pairs};
pub use retrieval::{RetrievalMetrics, retrieval, retrieval_from_features};
pub use suite::{Suite, evaluate, zero_shot_path};
pub use zeroshot::{
    Accuracy, ZeroShotFile, ZeroShotTask, accuracy_from_features, classifier, zero_shot_folder,
    zero_shot_webdataset,
};

/// Evaluation failures. Bad samples are skipped and counted, not errors.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The dataset spec or a path is unusable.
    #[error("{0}")]
    Input(String),
    /// A zero-shot task file is malformed.
    #[error("zero-shot tasks {path}: {message}")]
    Tasks {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Nothing could be evaluated.
    #[error("no usable samples in {0} (every sample was skipped or the input is empty)")]
    Empty(String),
    /// The model failed (shapes, device).
    #[error("model: {0}")]
    Model(String),
}
