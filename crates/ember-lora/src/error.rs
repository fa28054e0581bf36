//! The error type of the LoRA crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading, saving or merging adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A LoRA setting is invalid.
    #[error("LoRA config: `{key}`: {message}")]
    InvalidConfig {
        /// The offending key (PEFT's name).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The adapter uses a PEFT feature Ember does not implement.
    #[error("`{path}`: unsupported adapter feature: {feature}")]
    Unsupported {
        /// The adapter_config.json or adapter file.
        path: PathBuf,
        /// What is unsupported, and why.
        feature: String,
    },
    /// `target_modules` matched no layer of the model.
    #[error("target_modules {targets} matched no linear layer of the model (layers look like `{example}`)")]
    NoTargets {
        /// The targets as configured.
        targets: String,
        /// A module path of the model, to show the naming.
        example: String,
    },
    /// A quantized weight is malformed, or a format cannot be written.
    #[error("quantized weight: {message}")]
    InvalidQuantized {
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file is invalid.
    #[error("`{path}` is not valid: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause, with line and column.
        source: serde_json::Error,
    },
    /// A safetensors file is truncated or corrupt.
    #[error("`{path}` is not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the reader reported.
        message: String,
    },
    /// An adapter tensor is missing.
    #[error("`{path}`: missing tensor `{key}`")]
    MissingTensor {
        /// The adapter file.
        path: PathBuf,
        /// The missing key.
        key: String,
    },
    /// An adapter tensor names a module the model does not have, or has an unknown form.
    #[error("`{path}`: tensor `{key}` does not fit the model: {message}")]
    UnexpectedTensor {
        /// The adapter file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why it does not fit.
        message: String,
    },
    /// A tensor has a shape that does not fit the layer it is meant for.
    #[error("tensor `{key}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor's key.
        key: String,
        /// The shape the layer needs.
        expected: Vec<usize>,
        /// The shape that was found.
        found: Vec<usize>,
    },
    /// A merged weight would contain NaN or infinity.
    #[error("merging into `{key}` gives non-finite values; nothing was written")]
    NonFinite {
        /// The weight's key.
        key: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, LoraError>;
