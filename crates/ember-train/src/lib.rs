//! The Ember trainer: the YAML run config, data (polars → records → tokens + labels →
//! batches), the training step (token-normalised accumulation, torch-style global-norm
//! clipping, AdamW with torch's semantics), schedules, evaluation and checkpoints.
#![warn(missing_docs)]

pub mod config;
pub mod data;
mod error;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod run;
pub mod trainer;

pub use config::RunConfig;
pub use error::{Result, TrainError};
pub use run::{run, Resume, RunOptions, RunSummary};
pub use trainer::{StepStats, Trainer};
