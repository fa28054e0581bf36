//! The error type of the trainer crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, preparing data, training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The run config is invalid; the message names file, line and key.
    #[error("{0}")]
    Config(String),
    /// A data file could not be read or has the wrong form.
    #[error("data `{path}`: {message}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// What is wrong, naming the row or column.
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
    /// The model or its tokenizer failed.
    #[error(transparent)]
    Model(#[from] ember_model::ModelError),
    /// An adapter operation failed.
    #[error(transparent)]
    Lora(#[from] ember_lora::LoraError),
    /// The loss became NaN or infinite.
    #[error(
        "loss is {loss} at step {step}; stopping (the last good checkpoint is kept; a lower \
         train.learning_rate or train.max_grad_norm usually helps)"
    )]
    NonFiniteLoss {
        /// The optimizer step.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// The gradient is NaN or has vanished at a high loss: the adapters saturated the model.
    #[error(
        "step {step}: the run diverged (gradient norm {grad_norm:.3e} at loss {loss:.4}): the adapters have \
         saturated the model; lower train.learning_rate (this step used {lr:e}). No final adapter was written; \
         earlier checkpoints are kept"
    )]
    Diverged {
        /// The optimizer step.
        step: usize,
        /// Its loss.
        loss: f64,
        /// Its global gradient norm before clipping.
        grad_norm: f64,
        /// Its learning rate.
        lr: f64,
    },
    /// `output_dir` holds an earlier run and the new one neither resumes nor overwrites it.
    #[error(
        "output_dir `{path}` already holds {found}; resume that run with --resume, replace it with --overwrite, \
         or choose another output_dir"
    )]
    OutputDirInUse {
        /// The output folder.
        path: PathBuf,
        /// What is in it.
        found: String,
    },
    /// A checkpoint is missing or inconsistent.
    #[error("checkpoint `{path}`: {message}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}
