//! PEFT-exact LoRA adapters on burn.
//!
//! This crate knows no model architecture. It provides:
//! - [`LoraLinear`]: a frozen linear layer (`weight` [out, in], optional `bias`) with an optional
//!   low-rank adapter, `y = x·Wᵀ + b + s·B(A(dropout(x)))`.
//!
//! Weight paths such as `model.layers.3.self_attn.q_proj` are born in `ember-model` and handed
//! here; this crate never learns a model's names.
#![warn(missing_docs)]

mod error;
mod linear;

pub use error::LoraError;
pub use linear::{linear, LoraAdapter, LoraLinear};
