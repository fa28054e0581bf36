//! `config.json`: a serde mirror of HuggingFace's file, normalised once into [`DecoderConfig`].
//!
//! The mirror accepts both hub/transformers-4 style (`rope_theta`, `rope_scaling`) and
//! transformers-5 style (`rope_parameters`). The normalised config carries typed quirk flags;
//! the forward pass reads flags, never `model_type`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The `model_type`s Ember implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// A serde mirror of the parts of `config.json` Ember reads. Unknown keys are ignored, as
/// transformers ignores them.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// The architecture family, e.g. `llama`.
    pub model_type: String,
    /// Class names, e.g. `LlamaForCausalLM`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// MLP activation (`silu`, `gelu_pytorch_tanh`, ...).
    pub hidden_act: Option<String>,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: Option<usize>,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: Option<f64>,
    /// transformers-4 style RoPE base.
    pub rope_theta: Option<f64>,
    /// transformers-4 style RoPE scaling.
    pub rope_scaling: Option<Value>,
    /// transformers-5 style RoPE parameters (theta and scaling together).
    pub rope_parameters: Option<Value>,
    /// Fraction of the head dimension that is rotated.
    pub partial_rotary_factor: Option<f64>,
    /// Bias on q/k/v/o projections (Llama naming).
    pub attention_bias: Option<bool>,
    /// Bias on the MLP projections.
    pub mlp_bias: Option<bool>,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: Option<bool>,
    /// Sliding-window width of local attention layers.
    pub sliding_window: Option<usize>,
    /// Qwen2/3: whether the sliding window is used at all.
    pub use_sliding_window: Option<bool>,
    /// Qwen2/3: layers from this index on use the sliding window.
    pub max_window_layers: Option<usize>,
    /// Per-layer attention kind: `full_attention` or `sliding_attention`.
    pub layer_types: Option<Vec<String>>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<Value>,
    /// End-of-sequence token id(s).
    pub eos_token_id: Option<Value>,
    /// Padding token id.
    pub pad_token_id: Option<Value>,
    /// Storage dtype (transformers 5).
    pub dtype: Option<String>,
    /// Storage dtype (transformers 4).
    pub torch_dtype: Option<String>,
}

/// How RoPE frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelength threshold (as context / factor) below which frequencies are kept.
        high_freq_factor: f64,
        /// Wavelength threshold above which frequencies are divided by `factor`.
        low_freq_factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The base θ.
    pub theta: f64,
    /// Frequency rescaling.
    pub scaling: RopeScaling,
    /// Number of rotated dimensions of each head (even; `head_dim` unless partial rotary).
    pub rotary_dim: usize,
}

/// MLP activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (SwiGLU gate).
    Silu,
    /// GeLU with the tanh approximation.
    GeluTanh,
    /// Exact (erf) GeLU.
    Gelu,
}

/// The normalised decoder configuration the model is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// The architecture family (for display; the forward pass never reads it).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// RMS norm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// MLP activation.
    pub act: Activation,
    /// Rotary embedding settings.
    pub rope: RopeConfig,
    /// Sliding window per layer (`None` = global attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest trained context.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Storage dtype named by the config (`float32`, `bfloat16`, ...), if any.
    pub torch_dtype: Option<String>,
}

impl DecoderConfig {
    /// Reads and normalises `config.json` (or any file of that form).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf(&hf, path)
    }

    /// Normalises a parsed config; `path` names the file in errors.
    pub fn from_hf(hf: &HfConfig, path: &Path) -> Result<Self> {
        let invalid = |key: &str, message: String| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let model_type = hf.model_type.as_str();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type) {
            return Err(ModelError::UnsupportedModelType {
                path: path.to_path_buf(),
                model_type: model_type.to_string(),
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            });
        }
        if hf.num_attention_heads == 0 || hf.hidden_size == 0 || hf.num_hidden_layers == 0 {
            return Err(invalid(
                "num_attention_heads",
                "hidden_size, num_hidden_layers and num_attention_heads must be positive".into(),
            ));
        }
        let num_heads = hf.num_attention_heads;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / num_heads);
        let act = match hf.hidden_act.as_deref().unwrap_or("silu") {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => return Err(invalid("hidden_act", format!("unsupported activation `{other}`"))),
        };
        let rope = rope_config(hf, head_dim).map_err(|(key, msg)| invalid(&key, msg))?;

        let qwen = matches!(model_type, "qwen2" | "qwen3");
        let qkv_bias = match model_type {
            "qwen2" => true,
            _ => hf.attention_bias.unwrap_or(false),
        };
        let o_bias = match model_type {
            "qwen2" => false,
            _ => hf.attention_bias.unwrap_or(false),
        };

        let sliding_window = layer_windows(hf, qwen).map_err(|(key, msg)| invalid(&key, msg))?;

        let token = |v: &Option<Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                _ => Vec::new(),
            }
        };

        Ok(Self {
            model_type: model_type.to_string(),
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            qkv_bias,
            o_bias,
            mlp_bias: hf.mlp_bias.unwrap_or(false),
            qk_norm: model_type == "qwen3",
            act,
            rope,
            sliding_window,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            bos_token_id: token(&hf.bos_token_id).first().copied(),
            eos_token_ids: token(&hf.eos_token_id),
            pad_token_id: token(&hf.pad_token_id).first().copied(),
            torch_dtype: hf.dtype.clone().or_else(|| hf.torch_dtype.clone()),
        })
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Reads RoPE settings from either `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (transformers 4). Errors are `(key, message)`.
fn rope_config(hf: &HfConfig, head_dim: usize) -> std::result::Result<RopeConfig, (String, String)> {
    // transformers 5 folds theta into rope_parameters; transformers 4 keeps them apart.
    let (params, key) = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(p @ Value::Object(_)), _) => (Some(p.clone()), "rope_parameters"),
        (_, Some(s @ Value::Object(_))) => (Some(s.clone()), "rope_scaling"),
        _ => (None, "rope_scaling"),
    };
    let get = |name: &str| params.as_ref().and_then(|p| p.get(name)).and_then(Value::as_f64);
    let theta = get("rope_theta").or(hf.rope_theta).unwrap_or(10_000.0);
    let partial = get("partial_rotary_factor").or(hf.partial_rotary_factor).unwrap_or(1.0);
    let rotary_dim = ((head_dim as f64) * partial) as usize;
    if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
        return Err((
            "partial_rotary_factor".into(),
            format!("rotary dimension {rotary_dim} must be even and positive"),
        ));
    }
    let rope_type = params
        .as_ref()
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |name: &str| {
        get(name).ok_or_else(|| (format!("{key}.{name}"), format!("required for rope_type `{rope_type}`")))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            high_freq_factor: need("high_freq_factor")?,
            low_freq_factor: need("low_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err((
                format!("{key}.rope_type"),
                format!("unsupported rope_type `{other}` (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok(RopeConfig {
        theta,
        scaling,
        rotary_dim,
    })
}

/// The sliding window of each layer. Errors are `(key, message)`.
fn layer_windows(hf: &HfConfig, qwen: bool) -> std::result::Result<Vec<Option<usize>>, (String, String)> {
    let n = hf.num_hidden_layers;
    if let Some(types) = &hf.layer_types {
        if types.len() != n {
            return Err((
                "layer_types".into(),
                format!("has {} entries for {n} layers", types.len()),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => hf.sliding_window.map(Some).ok_or_else(|| {
                    (
                        "sliding_window".to_string(),
                        "needed by sliding_attention layers".to_string(),
                    )
                }),
                other => Err(("layer_types".into(), format!("unknown layer type `{other}`"))),
            })
            .collect();
    }
    let window = hf.sliding_window;
    Ok((0..n)
        .map(|i| {
            if qwen {
                // Qwen2/3 (transformers 4 configs): window only if enabled, from max_window_layers on.
                let enabled = hf.use_sliding_window.unwrap_or(false);
                let from = hf.max_window_layers.unwrap_or(0);
                if enabled && i >= from {
                    window
                } else {
                    None
                }
            } else {
                window
            }
        })
        .collect())
}

/// Resolves `dir/config.json`.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
