//! The Ember trainer: run config, data, training loop, evaluation.
//!
//! A skeleton for now: the model and LoRA crates come first.
#![warn(missing_docs)]

pub use ember_model;
