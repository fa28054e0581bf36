//! The error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading a model folder or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file (config.json, an index, a tokenizer config) is not valid or has wrong types.
    #[error("`{path}` is not valid: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause, with line and column.
        source: serde_json::Error,
    },
    /// The config names an architecture Ember does not implement.
    #[error("unsupported model_type `{model_type}` in `{path}`; supported: {supported}")]
    UnsupportedModelType {
        /// The config.json file.
        path: PathBuf,
        /// The model_type found.
        model_type: String,
        /// Comma-separated supported model types.
        supported: String,
    },
    /// A config key is missing or has a value Ember cannot use.
    #[error("config `{path}`: key `{key}`: {message}")]
    InvalidConfig {
        /// The config.json file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// No weights were found in a model folder.
    #[error("no `model.safetensors` or `model.safetensors.index.json` in `{dir}`")]
    NoWeights {
        /// The model folder.
        dir: PathBuf,
    },
    /// A safetensors file is truncated or corrupt.
    #[error("`{path}` is not a valid safetensors file: {message}")]
    CorruptWeights {
        /// The file.
        path: PathBuf,
        /// What the safetensors reader reported.
        message: String,
    },
    /// The model needs a tensor the checkpoint does not have.
    #[error("missing tensor `{key}` in the checkpoint at `{dir}`")]
    MissingTensor {
        /// The tensor's key.
        key: String,
        /// The model folder.
        dir: PathBuf,
    },
    /// The checkpoint has tensors the model does not use.
    #[error("unexpected tensor(s) in the checkpoint at `{dir}`: {keys}")]
    UnexpectedTensors {
        /// Comma-separated keys.
        keys: String,
        /// The model folder.
        dir: PathBuf,
    },
    /// A tensor's shape differs from what the config implies.
    #[error("tensor `{key}` in `{path}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor's key.
        key: String,
        /// The file holding it.
        path: PathBuf,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype Ember cannot convert.
    #[error("tensor `{key}` in `{path}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor's key.
        key: String,
        /// The file holding it.
        path: PathBuf,
        /// The stored dtype.
        dtype: String,
    },
    /// Tokenizer loading or encoding failed.
    #[error("tokenizer `{path}`: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Attaching, loading or saving an adapter failed.
    #[error(transparent)]
    Lora(#[from] ember_lora::LoraError),
    /// More positions than the model computes exactly (GLM-5's sparse attention).
    #[error("{len} positions are more than this model computes exactly ({limit}): {reason}")]
    SequenceTooLong {
        /// Positions asked for (cache included).
        len: usize,
        /// The most this model handles.
        limit: usize,
        /// Why, and what to do.
        reason: String,
    },
    /// Inputs given to the model are inconsistent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
