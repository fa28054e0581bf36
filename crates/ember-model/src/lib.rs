//! Decoder-only transformers on burn.
//!
//! Load a HuggingFace model folder (`config.json` + safetensors) and compute the logits
//! transformers computes:
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use ember_model::CausalLm;
//! let device = Default::default();
//! let model = CausalLm::<NdArray>::from_dir("path/to/model".as_ref(), &device)?;
//! # Ok::<(), ember_model::ModelError>(())
//! ```
#![warn(missing_docs)]

pub mod allocator;
pub mod config;
pub mod dtype;
mod error;
pub mod family;
pub mod generate;
pub mod gguf;
pub mod linear_attention;
pub mod lora;
pub mod model;
pub mod moe;
pub mod rope;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use config::{DecoderConfig, HfConfig};
pub use dtype::BaseDtype;
pub use error::{ModelError, Result};
pub use lora::LoraReport;
pub use model::{CausalLm, ModelInput, ModelOutput};
pub use tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
pub use weights::Weights;
