//! The Ember trainer: the YAML run config, data (polars → records → tokens + labels →
//! batches), the training step (token-normalised accumulation, torch-style global-norm
//! clipping, AdamW with torch's semantics), schedules, evaluation and checkpoints.
#![warn(missing_docs)]

/// `eprint!` that ignores a closed or broken stderr: a progress line is never worth a panic
/// in the middle of a training run.
macro_rules! progress {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed or broken stderr (see `progress!`).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
