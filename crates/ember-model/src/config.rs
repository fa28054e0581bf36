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
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "glm4",
    "mixtral",
    "qwen3_moe",
    "gpt_oss",
];

/// Deserialises a key that may be absent (outer `None`) or `null` (inner `None`): Gemma 2's
/// soft-caps default to 50/30 when absent but are off when `null`.
fn present<'de, D, T>(deserializer: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

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
    /// Gemma's name for the MLP activation (preferred over `hidden_act`).
    pub hidden_activation: Option<String>,
    /// Gemma 2/3: attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: `cap · tanh(scores / cap)` on attention scores.
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    /// Gemma 2: `cap · tanh(logits / cap)` on the output logits.
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    /// Gemma 3 (transformers 4 style): RoPE base of the sliding-window layers.
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: every n-th layer is global, the others slide (transformers 4 style).
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: the same, as transformers 5 writes it.
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    /// MoE: number of experts (Mixtral, gpt-oss, transformers 5 Qwen3-MoE).
    pub num_local_experts: Option<usize>,
    /// MoE: number of experts (transformers 4 Qwen3-MoE).
    pub num_experts: Option<usize>,
    /// MoE: experts per token.
    pub num_experts_per_tok: Option<usize>,
    /// Qwen3-MoE: width of one expert's MLP.
    pub moe_intermediate_size: Option<usize>,
    /// Qwen3-MoE: renormalise the top-k routing weights.
    pub norm_topk_prob: Option<bool>,
    /// Qwen3-MoE: every n-th layer is sparse.
    pub decoder_sparse_step: Option<usize>,
    /// Qwen3-MoE: layers with a dense MLP instead of experts.
    pub mlp_only_layers: Option<Vec<usize>>,
    /// gpt-oss: clamp of the expert SwiGLU.
    pub swiglu_limit: Option<f64>,
    /// gpt-oss: slope of the expert SwiGLU's sigmoid.
    pub swiglu_alpha: Option<f64>,
    /// Phi-3 (transformers 4 style): context length of pre-training, for longrope.
    pub original_max_position_embeddings: Option<f64>,
    /// Multimodal wrappers (Gemma 3 4B+, ...) nest the language model here.
    pub text_config: Option<Value>,
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
    /// YaRN (gpt-oss, ...): frequencies blended between interpolation and extrapolation by
    /// a linear ramp; cos/sin multiplied by an attention factor.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Rotations above which frequencies are extrapolated.
        beta_fast: f64,
        /// Rotations below which frequencies are interpolated.
        beta_slow: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
        /// Multiplier of cos/sin (`0.1·ln(factor) + 1` unless given).
        attention_factor: f64,
        /// Round the ramp's bounds outwards to whole dimensions.
        truncate: bool,
    },
    /// LongRoPE (Phi-3.5, Phi-4-mini): per-frequency divisors, the short set while every
    /// position is inside the pre-training context, the long set beyond it (chosen per
    /// forward from the largest position id, as transformers does); cos/sin multiplied by an
    /// attention factor.
    LongRope {
        /// Divisors used within the pre-training context, `[rotary_dim / 2]`.
        short_factor: Vec<f64>,
        /// Divisors used beyond it, `[rotary_dim / 2]`.
        long_factor: Vec<f64>,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
        /// Multiplier of cos/sin (`√(1 + ln(factor) / ln(original))` unless given).
        attention_factor: f64,
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
    /// GLM: rotate interleaved pairs `(0,1), (2,3), ...` instead of the two halves.
    pub interleaved: bool,
}

/// Where a decoder block normalises, as the four optional norms and their checkpoint names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormPlacement {
    /// Before attention (`input_layernorm`; absent in OLMo 2).
    pub pre_attn: Option<&'static str>,
    /// On the attention output, before the residual add (Gemma 2/3, OLMo 2, GLM 4).
    pub post_attn: Option<&'static str>,
    /// Before the MLP (`post_attention_layernorm` in Llama naming).
    pub pre_mlp: Option<&'static str>,
    /// On the MLP output, before the residual add (Gemma 2/3, OLMo 2, GLM 4).
    pub post_mlp: Option<&'static str>,
}

impl NormPlacement {
    /// Llama's pre-norm block.
    pub const PRE: Self = Self {
        pre_attn: Some("input_layernorm"),
        post_attn: None,
        pre_mlp: Some("post_attention_layernorm"),
        post_mlp: None,
    };
    /// Gemma 2/3: pre- and post-norms around both sub-blocks.
    pub const GEMMA_SANDWICH: Self = Self {
        pre_attn: Some("input_layernorm"),
        post_attn: Some("post_attention_layernorm"),
        pre_mlp: Some("pre_feedforward_layernorm"),
        post_mlp: Some("post_feedforward_layernorm"),
    };
    /// GLM 4: the same sandwich under other names.
    pub const GLM_SANDWICH: Self = Self {
        pre_attn: Some("input_layernorm"),
        post_attn: Some("post_self_attn_layernorm"),
        pre_mlp: Some("post_attention_layernorm"),
        post_mlp: Some("post_mlp_layernorm"),
    };
    /// OLMo 2: norms on the sub-block outputs only.
    pub const POST: Self = Self {
        pre_attn: None,
        post_attn: Some("post_attention_layernorm"),
        pre_mlp: None,
        post_mlp: Some("post_feedforward_layernorm"),
    };
}

/// RMS norm of queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// None (Llama).
    None,
    /// Over each head, weight `[head_dim]` (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection, weight `[heads·head_dim]` (OLMo 2).
    Full,
}

/// How the router turns logits into expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Softmax over all experts, keep the top k, optionally renormalise them to sum 1
    /// (Mixtral always; Qwen3-MoE with `norm_topk_prob`).
    SoftmaxTopK {
        /// Divide the kept weights by their sum.
        renormalize: bool,
    },
    /// Keep the top-k logits, softmax over them (gpt-oss).
    TopKSoftmax,
}

/// The activation inside each expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertActivation {
    /// `act(gate) · up`.
    Gated(Activation),
    /// gpt-oss: `gate ≤ limit`, `|up| ≤ limit`, `(up + 1) · gate·σ(alpha·gate)`.
    ClampedSwiGlu {
        /// σ slope.
        alpha: f64,
        /// Clamp bound.
        limit: f64,
    },
}

/// Checkpoint layout of a sparse MoE block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeLayout {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2` (Mixtral).
    Mixtral,
    /// `mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj` (Qwen MoE).
    Qwen,
    /// `mlp.router` (with bias), `mlp.experts.gate_up_proj` `[experts, hidden, 2·inter]` with
    /// gate/up interleaved, `mlp.experts.down_proj` `[experts, inter, hidden]`, biases (gpt-oss).
    GptOss,
}

/// A sparse mixture-of-experts feed-forward block.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Width of one expert's MLP.
    pub intermediate_size: usize,
    /// Routing rule.
    pub routing: Routing,
    /// Expert activation.
    pub activation: ExpertActivation,
    /// Checkpoint layout.
    pub layout: MoeLayout,
    /// Per layer: sparse (`true`) or the dense MLP.
    pub sparse_layers: Vec<bool>,
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
    /// RMS norm of q and k before RoPE (Qwen3, Gemma 3, OLMo 2).
    pub qk_norm: QkNorm,
    /// MLP activation.
    pub act: Activation,
    /// Rotary embedding settings (of the global layers when `local_rope` is set).
    pub rope: RopeConfig,
    /// Gemma 3: RoPE of the sliding-window layers.
    pub local_rope: Option<RopeConfig>,
    /// Norm placement in each block.
    pub norms: NormPlacement,
    /// Gemma: norms scale by `1 + w` (folded into the weight at load).
    pub norm_unit_offset: bool,
    /// Gemma: embeddings are multiplied by `√hidden` (rounded to f32).
    pub embed_scale: Option<f32>,
    /// Multiplier of `q·kᵀ` (`head_dim^-0.5`, or `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f64,
    /// Gemma 2: soft-cap of attention scores.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: soft-cap of output logits.
    pub final_softcap: Option<f64>,
    /// gpt-oss: a learned per-head sink logit joins each softmax (and is dropped after).
    pub attn_sinks: bool,
    /// Phi-3: q, k, v come from one `qkv_proj` (rows `[q; k; v]`).
    pub fused_qkv: bool,
    /// Phi-3, GLM 4: gate and up come from one `gate_up_proj` (rows `[gate; up]`).
    pub fused_gate_up: bool,
    /// Sparse mixture-of-experts MLPs (Mixtral, Qwen3-MoE, gpt-oss).
    pub moe: Option<MoeConfig>,
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
        if hf.text_config.is_some() {
            return Err(invalid(
                "text_config",
                format!(
                    "`{model_type}` is a multimodal wrapper; Ember loads text-only decoders \
                     (for Gemma 3, a `gemma3_text` checkpoint)"
                ),
            ));
        }
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
        // Sizes far beyond any released model are a broken or hostile file: refused before
        // anything is allocated from them.
        let limits: [(&str, Option<usize>, usize); 8] = [
            ("vocab_size", Some(hf.vocab_size), 1 << 24),
            ("hidden_size", Some(hf.hidden_size), 1 << 17),
            ("intermediate_size", Some(hf.intermediate_size), 1 << 20),
            ("num_hidden_layers", Some(hf.num_hidden_layers), 1 << 12),
            ("num_attention_heads", Some(hf.num_attention_heads), 1 << 12),
            ("num_key_value_heads", hf.num_key_value_heads, 1 << 12),
            ("head_dim", hf.head_dim, 1 << 14),
            ("max_position_embeddings", hf.max_position_embeddings, 1 << 32),
        ];
        for (key, value, limit) in limits {
            if let Some(v) = value.filter(|&v| v > limit) {
                return Err(invalid(
                    key,
                    format!("{v} is beyond any supported model (at most {limit})"),
                ));
            }
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
        let gemma = matches!(model_type, "gemma" | "gemma2" | "gemma3_text");
        let (act_key, act_name) = if gemma {
            // transformers' Gemma reads `hidden_activation` only (default gelu_pytorch_tanh).
            (
                "hidden_activation",
                hf.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh"),
            )
        } else {
            ("hidden_act", hf.hidden_act.as_deref().unwrap_or("silu"))
        };
        let act = parse_activation(act_name).map_err(|m| invalid(act_key, m))?;

        let qwen = matches!(model_type, "qwen2" | "qwen3" | "qwen3_moe");
        let qkv_bias = match model_type {
            "qwen2" => true,
            "phi3" => false,
            _ => hf.attention_bias.unwrap_or(false),
        };
        let o_bias = match model_type {
            "qwen2" | "glm4" | "phi3" => false,
            _ => hf.attention_bias.unwrap_or(false),
        };
        let layer_types = layer_types(hf).map_err(|(key, msg)| invalid(&key, msg))?;
        let sliding_window =
            layer_windows(hf, qwen, layer_types.as_deref()).map_err(|(key, msg)| invalid(&key, msg))?;

        let mut rope = rope_config(hf, head_dim, None).map_err(|(key, msg)| invalid(&key, msg))?;
        let mut local_rope = None;
        if model_type == "gemma3_text" {
            rope = rope_config(hf, head_dim, Some("full_attention")).map_err(|(key, msg)| invalid(&key, msg))?;
            local_rope =
                Some(rope_config(hf, head_dim, Some("sliding_attention")).map_err(|(key, msg)| invalid(&key, msg))?);
        }
        if model_type == "glm4" {
            rope.interleaved = true;
            if let Some(local) = local_rope.as_mut() {
                local.interleaved = true;
            }
        }

        let norms = match model_type {
            "gemma2" | "gemma3_text" => NormPlacement::GEMMA_SANDWICH,
            "glm4" => NormPlacement::GLM_SANDWICH,
            "olmo2" => NormPlacement::POST,
            _ => NormPlacement::PRE,
        };
        let qk_norm = match model_type {
            "qwen3" | "qwen3_moe" | "gemma3_text" => QkNorm::PerHead,
            "olmo2" => QkNorm::Full,
            _ => QkNorm::None,
        };
        let attn_scale = match (model_type, hf.query_pre_attn_scalar) {
            ("gemma2" | "gemma3_text", Some(s)) => s.powf(-0.5),
            ("gemma2" | "gemma3_text", None) => 256f64.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let (attn_softcap, final_softcap) = if model_type == "gemma2" {
            (
                hf.attn_logit_softcapping.unwrap_or(Some(50.0)),
                hf.final_logit_softcapping.unwrap_or(Some(30.0)),
            )
        } else {
            (
                hf.attn_logit_softcapping.flatten(),
                hf.final_logit_softcapping.flatten(),
            )
        };
        let moe = moe_config(hf, act).map_err(|(key, msg)| invalid(&key, msg))?;

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
            qk_norm,
            act,
            rope,
            local_rope,
            norms,
            norm_unit_offset: gemma,
            embed_scale: gemma.then(|| (hf.hidden_size as f64).sqrt() as f32),
            attn_scale,
            attn_softcap,
            final_softcap,
            attn_sinks: model_type == "gpt_oss",
            fused_qkv: model_type == "phi3",
            fused_gate_up: matches!(model_type, "phi3" | "glm4"),
            moe,
            sliding_window,
            // transformers' default: Gemma ties the head to the embeddings, the others do not.
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(gemma),
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

fn parse_activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(format!("unsupported activation `{other}`")),
    }
}

/// Reads RoPE settings from either `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (transformers 4). `layer_type` selects Gemma 3's
/// per-layer-type parameters (`rope_parameters.sliding_attention`, or `rope_local_base_freq`
/// unscaled in transformers 4 style). Errors are `(key, message)`.
fn rope_config(
    hf: &HfConfig,
    head_dim: usize,
    layer_type: Option<&str>,
) -> std::result::Result<RopeConfig, (String, String)> {
    // transformers 5 folds theta into rope_parameters (per layer type for Gemma 3);
    // transformers 4 keeps them apart.
    let per_type = layer_type.and_then(|t| hf.rope_parameters.as_ref().and_then(|p| p.get(t)));
    let (params, key) = match (per_type, &hf.rope_parameters, &hf.rope_scaling) {
        (Some(p @ Value::Object(_)), _, _) => {
            (Some(p.clone()), format!("rope_parameters.{}", layer_type.unwrap_or("")))
        }
        (None, Some(p @ Value::Object(_)), _) => (Some(p.clone()), "rope_parameters".to_string()),
        (None, _, Some(s @ Value::Object(_))) => (Some(s.clone()), "rope_scaling".to_string()),
        _ => (None, "rope_scaling".to_string()),
    };
    // transformers 4 Gemma 3: sliding layers use rope_local_base_freq and no scaling.
    let (params, local_theta) = match (layer_type, per_type) {
        (Some("sliding_attention"), None) => (None, Some(hf.rope_local_base_freq.unwrap_or(10_000.0))),
        _ => (params, None),
    };
    let get = |name: &str| params.as_ref().and_then(|p| p.get(name)).and_then(Value::as_f64);
    let theta = local_theta.or(get("rope_theta")).or(hf.rope_theta).unwrap_or(10_000.0);
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
        "longrope" => {
            let original = get("original_max_position_embeddings")
                .or(hf.original_max_position_embeddings)
                .ok_or_else(|| {
                    (
                        "original_max_position_embeddings".to_string(),
                        "required for rope_type `longrope`".to_string(),
                    )
                })?;
            let factors = |name: &str| -> std::result::Result<Vec<f64>, (String, String)> {
                let list = params
                    .as_ref()
                    .and_then(|p| p.get(name))
                    .and_then(Value::as_array)
                    .ok_or_else(|| (format!("{key}.{name}"), "required for rope_type `longrope`".to_string()))?;
                let values: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
                if values.len() != list.len() || values.len() != rotary_dim / 2 {
                    return Err((
                        format!("{key}.{name}"),
                        format!(
                            "needs {} numbers (rotary dims / 2), found {}",
                            rotary_dim / 2,
                            list.len()
                        ),
                    ));
                }
                Ok(values)
            };
            let factor = get("factor").unwrap_or(hf.max_position_embeddings.unwrap_or(0) as f64 / original);
            let attention_factor = get("attention_factor").unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / original.ln()).sqrt()
            });
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        "yarn" => {
            let original = get("original_max_position_embeddings")
                .or(hf.original_max_position_embeddings)
                .ok_or_else(|| {
                    (
                        format!("{key}.original_max_position_embeddings"),
                        "required for rope_type `yarn`".to_string(),
                    )
                })?;
            let factor = get("factor").unwrap_or(hf.max_position_embeddings.unwrap_or(0) as f64 / original);
            let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention_factor = match (get("attention_factor"), get("mscale"), get("mscale_all_dim")) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                _ => mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                beta_fast: get("beta_fast").filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: get("beta_slow").filter(|b| *b != 0.0).unwrap_or(1.0),
                original_max_position_embeddings: original,
                attention_factor,
                truncate: params
                    .as_ref()
                    .and_then(|p| p.get("truncate"))
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            }
        }
        other => {
            return Err((
                format!("{key}.rope_type"),
                format!("unsupported rope_type `{other}` (supported: default, linear, llama3, yarn, longrope)"),
            ))
        }
    };
    Ok(RopeConfig {
        theta,
        scaling,
        rotary_dim,
        interleaved: false,
    })
}

/// The attention kind of each layer: `layer_types` when given, else the family's default
/// alternation (Gemma 2 and gpt-oss: sliding, global, ...; Gemma 3: every
/// `sliding_window_pattern`-th layer global). `None` when the family has no layer types.
fn layer_types(hf: &HfConfig) -> std::result::Result<Option<Vec<String>>, (String, String)> {
    let n = hf.num_hidden_layers;
    if let Some(types) = &hf.layer_types {
        if types.len() != n {
            return Err((
                "layer_types".into(),
                format!("has {} entries for {n} layers", types.len()),
            ));
        }
        return Ok(Some(types.clone()));
    }
    let pattern = match hf.model_type.as_str() {
        "gemma2" | "gpt_oss" => 2,
        "gemma3_text" => hf
            .sliding_window_pattern
            .or(hf.sliding_window_pattern_private)
            .unwrap_or(6),
        _ => return Ok(None),
    };
    if pattern == 0 {
        return Err(("sliding_window_pattern".into(), "must be positive".into()));
    }
    Ok(Some(
        (0..n)
            .map(|i| {
                if (i + 1) % pattern == 0 {
                    "full_attention".to_string()
                } else {
                    "sliding_attention".to_string()
                }
            })
            .collect(),
    ))
}

/// The MoE settings, `None` for dense models. Errors are `(key, message)`.
fn moe_config(hf: &HfConfig, act: Activation) -> std::result::Result<Option<MoeConfig>, (String, String)> {
    let layout = match hf.model_type.as_str() {
        "mixtral" => MoeLayout::Mixtral,
        "qwen3_moe" => MoeLayout::Qwen,
        "gpt_oss" => MoeLayout::GptOss,
        _ => return Ok(None),
    };
    let num_experts = hf
        .num_local_experts
        .or(hf.num_experts)
        .ok_or_else(|| ("num_local_experts".to_string(), "required for a MoE model".to_string()))?;
    let top_k = hf.num_experts_per_tok.ok_or_else(|| {
        (
            "num_experts_per_tok".to_string(),
            "required for a MoE model".to_string(),
        )
    })?;
    if top_k == 0 || top_k > num_experts {
        return Err((
            "num_experts_per_tok".into(),
            format!("{top_k} must be between 1 and the {num_experts} experts"),
        ));
    }
    let n = hf.num_hidden_layers;
    let (routing, activation, intermediate_size, sparse_layers) = match layout {
        MoeLayout::Mixtral => (
            Routing::SoftmaxTopK { renormalize: true },
            ExpertActivation::Gated(act),
            hf.intermediate_size,
            vec![true; n],
        ),
        MoeLayout::Qwen => {
            let step = hf.decoder_sparse_step.unwrap_or(1);
            let dense = hf.mlp_only_layers.clone().unwrap_or_default();
            let sparse = (0..n)
                .map(|i| !dense.contains(&i) && num_experts > 0 && step > 0 && (i + 1) % step == 0)
                .collect();
            (
                Routing::SoftmaxTopK {
                    renormalize: hf.norm_topk_prob.unwrap_or(false),
                },
                ExpertActivation::Gated(act),
                hf.moe_intermediate_size.ok_or_else(|| {
                    (
                        "moe_intermediate_size".to_string(),
                        "required for qwen3_moe".to_string(),
                    )
                })?,
                sparse,
            )
        }
        MoeLayout::GptOss => (
            Routing::TopKSoftmax,
            ExpertActivation::ClampedSwiGlu {
                alpha: hf.swiglu_alpha.unwrap_or(1.702),
                limit: hf.swiglu_limit.unwrap_or(7.0),
            },
            hf.intermediate_size,
            vec![true; n],
        ),
    };
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        intermediate_size,
        routing,
        activation,
        layout,
        sparse_layers,
    }))
}

/// The sliding window of each layer. Errors are `(key, message)`.
fn layer_windows(
    hf: &HfConfig,
    qwen: bool,
    layer_types: Option<&[String]>,
) -> std::result::Result<Vec<Option<usize>>, (String, String)> {
    let n = hf.num_hidden_layers;
    if let Some(types) = layer_types {
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
    // Families whose transformers attention never slides ignore a `sliding_window` key.
    let window = match hf.model_type.as_str() {
        "mistral" | "mixtral" | "phi3" | "qwen2" | "qwen3" | "qwen3_moe" => hf.sliding_window,
        _ => None,
    };
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
