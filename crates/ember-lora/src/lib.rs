//! PEFT-exact LoRA adapters on burn.
//!
//! This crate knows no model architecture. It provides:
//! - [`LoraConfig`]: PEFT's settings and target-matching rules;
//! - [`LoraLinear`]: a frozen linear layer (`weight` [out, in], optional `bias`) with an optional
//!   low-rank adapter, `y = x·Wᵀ + b + s·B(A(dropout(x)))`, mergeable in memory;
//! - [`adapter`]: PEFT's `adapter_config.json` + `adapter_model.safetensors`, read and written;
//! - [`expert`]: LoRA on stacked expert weights (PEFT's `target_parameters`), flat ↔ per expert;
//! - [`merge`]: a streaming merge of an adapter into safetensors shards;
//! - [`quant`]: quantized frozen weights (QLoRA) and [`EmberBackend`], Ember's own burn ops;
//! - [`amx`]: bf16 products on Intel AMX tiles (a bf16 frozen base on the CPU);
//! - [`attention`]: fused attention with its own backward pass (one of those ops);
//! - [`threads`]: the worker pool a step runs on, so that the kernels' parallel regions fork
//!   from inside it.
//!
//! Weight paths such as `model.layers.3.self_attn.q_proj` are born in `ember-model` and handed
//! here; this crate never learns a model's names.
#![warn(missing_docs)]

pub mod adapter;
pub mod amx;
pub mod atomic;
pub mod attention;
mod buffer;
pub mod config;
mod error;
pub mod expert;
pub mod fused;
mod linear;
pub mod merge;
pub mod quant;
mod simd;
pub mod threads;

pub use adapter::{AdapterFiles, AdapterTensors};
pub use attention::{attention, AttentionSpec};
pub use config::{FusedMoeTargets, InitLoraWeights, LoraConfig, ModuleLora, MoeTargetPaths, TargetModules};
pub use error::{LoraError, Result};
pub use expert::ExpertLoraLayout;
pub use linear::{linear, matmul_layout, FrozenWeight, LoraAdapter, LoraLinear};
pub use quant::{
    is_tracked, EmberAutodiffBackend, EmberBackend, QuantFormat, QuantMatrix, QuantizedWeight, SharedBytes,
};
