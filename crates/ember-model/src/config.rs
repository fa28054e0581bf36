//! `config.json`: a serde mirror of HuggingFace's file, normalised once into [`DecoderConfig`].
//!
//! The mirror accepts both hub/transformers-4 style (`rope_theta`, `rope_scaling`) and
//! transformers-5 style (`rope_parameters`). The normalised config carries typed quirk flags;
//! the forward pass reads flags, never `model_type`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

pub use crate::family::GroupScores;
use crate::family::{BiasRule, Family, FamilySpec, LayerPattern, RopeRule, WindowRule, WrapperSpec};

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
    /// MLP width (absent in configs without dense MLPs, such as Qwen 3.5-MoE's).
    #[serde(default)]
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
    /// Qwen 3.5-MoE: width of the gated shared expert.
    pub shared_expert_intermediate_size: Option<usize>,
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
    /// Multimodal wrappers (Gemma 3 4B+, Mistral 3, ...) nest the language model here.
    pub text_config: Option<Value>,
    /// SmolLM3: per layer, 1 = RoPE, 0 = no position embedding.
    pub no_rope_layers: Option<Vec<usize>>,
    /// SmolLM3, Llama 4: without `no_rope_layers`, every n-th layer has no RoPE (default 4).
    pub no_rope_layer_interval: Option<usize>,
    /// Llama 4: weightless L2 norm of q and k after RoPE (on RoPE layers).
    pub use_qk_norm: Option<bool>,
    /// Llama 4: the chunk of `chunked_attention` layers (tokens attend within their chunk).
    pub attention_chunk_size: Option<usize>,
    /// Llama 4: query temperature on RoPE-free layers.
    pub attn_temperature_tuning: Option<bool>,
    /// Llama 4: positions per temperature step.
    pub floor_scale: Option<f64>,
    /// Llama 4: temperature slope.
    pub attn_scale: Option<f64>,
    /// Llama 4: the MoE layers (others dense).
    pub moe_layers: Option<Vec<usize>>,
    /// Llama 4: without `moe_layers`, every n-th layer is MoE.
    pub interleave_moe_layer_step: Option<usize>,
    /// Llama 4: width of the dense layers' MLP (`intermediate_size` is the experts').
    pub intermediate_size_mlp: Option<usize>,
    /// Gemma 4: head size of the full-attention layers (default 512) when `per_layer_config`
    /// is absent (hub configs).
    pub global_head_dim: Option<usize>,
    /// Gemma 4: key/value heads of the full-attention layers, with `attention_k_eq_v`.
    pub num_global_key_value_heads: Option<usize>,
    /// transformers 5's per-layer overrides: layer index → `head_dim`, `num_key_value_heads`,
    /// `intermediate_size` (what Gemma 4's config writes for its full-attention layers).
    pub per_layer_config: Option<Value>,
    /// Gemma 4: full-attention layers have no `v_proj`; the values are the keys' projection.
    pub attention_k_eq_v: Option<bool>,
    /// Gemma 4: the last n layers reuse the keys/values of the last earlier layer of their type.
    pub num_kv_shared_layers: Option<usize>,
    /// Gemma 4: the KV-shared layers' MLPs are twice as wide.
    pub use_double_wide_mlp: Option<bool>,
    /// Gemma 4: width of each layer's slice of the per-layer input embeddings (0 = none).
    pub hidden_size_per_layer_input: Option<usize>,
    /// Gemma 4: rows of the per-layer input embedding table.
    pub vocab_size_per_layer_input: Option<usize>,
    /// Gemma 4 (26B-A4B): a MoE block beside the dense MLP in every layer.
    pub enable_moe_block: Option<bool>,
    /// Gemma 4: experts per token.
    pub top_k_experts: Option<usize>,
    /// MLA (DeepSeek-V3): rank of the query bottleneck; `null` = a plain `q_proj` (the family's
    /// default when absent: `Some(Value::Null)` and `None` differ here).
    #[serde(default, deserialize_with = "present_value")]
    pub q_lora_rank: Option<Value>,
    /// MLA: rank of the key/value latent.
    pub kv_lora_rank: Option<usize>,
    /// MLA: per-head query/key width without RoPE.
    pub qk_nope_head_dim: Option<usize>,
    /// MLA: width of the RoPE part of queries and of the one shared RoPE key.
    pub qk_rope_head_dim: Option<usize>,
    /// MLA: per-head value width.
    pub v_head_dim: Option<usize>,
    /// MLA: RoPE on interleaved pairs (default true).
    pub rope_interleave: Option<bool>,
    /// GLM-5 (DeepSeek sparse attention): keys each query's indexer keeps (default 2048).
    pub index_topk: Option<usize>,
    /// Qwen 3.5: Gated DeltaNet query/key heads.
    pub linear_num_key_heads: Option<usize>,
    /// Qwen 3.5: Gated DeltaNet value heads.
    pub linear_num_value_heads: Option<usize>,
    /// Qwen 3.5: Gated DeltaNet query/key width per head.
    pub linear_key_head_dim: Option<usize>,
    /// Qwen 3.5: Gated DeltaNet value width per head.
    pub linear_value_head_dim: Option<usize>,
    /// Qwen 3.5: taps of the causal convolution.
    pub linear_conv_kernel_dim: Option<usize>,
    /// Qwen 3.5: every n-th layer is full attention when `layer_types` is absent (default 4).
    pub full_attention_interval: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: number of routed experts.
    pub n_routed_experts: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: expert groups.
    pub n_group: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: groups a token picks experts from.
    pub topk_group: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: multiplier of the routing weights.
    pub routed_scaling_factor: Option<f64>,
    /// DeepSeek-V3, GLM-4.5: the first layers are dense.
    pub first_k_dense_replace: Option<usize>,
    /// GLM-4.7-Flash: per layer, `dense` or `sparse` (default: the first dense).
    pub mlp_layer_types: Option<Vec<String>>,
    /// DeepSeek-V3, GLM-4.5: the shared expert is this many experts wide.
    pub n_shared_experts: Option<usize>,
    /// GLM-4.5: multi-token-prediction layers stored after the decoder's layers.
    pub num_nextn_predict_layers: Option<usize>,
    /// The same, as transformers 5 names it.
    pub num_mtp_layers: Option<usize>,
    /// Gemma 4: `"all"` makes every token attend both ways (not a causal LM), `"vision"` only
    /// image tokens (text stays causal); Gemma 3 writes a boolean.
    pub use_bidirectional_attention: Option<Value>,
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
    /// Proportional RoPE (Gemma 4's global layers): the first `rope_angles` frequencies
    /// `θ^(-2i/head_dim)`, the other pairs of the head unrotated (frequency 0), all divided by
    /// `factor`; rotate-half over the whole head (unlike partial rotary, which rotates a prefix).
    Proportional {
        /// Divisor of every frequency (default 1).
        factor: f64,
        /// Number of rotated pairs, `⌊partial_rotary_factor · head_dim / 2⌋`.
        rope_angles: usize,
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

/// A key that is present, `null` included (`Some(Value::Null)`); absent keys stay `None`.
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
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
    /// Llama 4: weightless (L2) RMS norm over each head, after RoPE, on RoPE layers only.
    L2AfterRope,
}

/// How the router turns logits into expert weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Softmax over all experts, keep the top k, optionally renormalise them to sum 1
    /// (Mixtral always; Qwen3-MoE with `norm_topk_prob`).
    SoftmaxTopK {
        /// Divide the kept weights by their sum.
        renormalize: bool,
    },
    /// Keep the top-k logits, softmax over them (gpt-oss).
    TopKSoftmax,
    /// Keep the top-k logits, sigmoid of each (Llama 4).
    TopKSigmoid,
    /// DeepSeek-style: scores (sigmoid, or softmax in DeepSeek-V2 / Mistral 4); experts chosen
    /// on the scores plus a correction bias (`e_score_correction_bias`, where the router has
    /// one) within the `topk_group` best of `n_group` groups (a group's score: its two best
    /// experts); the chosen experts' plain scores, optionally renormalised, times
    /// `routed_scaling_factor`.
    GroupLimited {
        /// How logits become scores.
        scores: GroupScores,
        /// Groups the experts are split into (`n_group`).
        groups: usize,
        /// Groups a token may pick from (`topk_group`).
        top_groups: usize,
        /// Divide the kept scores by their sum (`norm_topk_prob`).
        renormalize: bool,
        /// Multiplier of the routing weights (`routed_scaling_factor`).
        scaling: f64,
    },
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
    /// `feed_forward.router`, `feed_forward.experts.gate_up_proj` `[experts, hidden, 2·inter]`
    /// (`[gate | up]`), `feed_forward.experts.down_proj` `[experts, inter, hidden]`, and a
    /// dense `feed_forward.shared_expert` added to every token; the routing weight scales the
    /// expert's input (Llama 4).
    Llama4,
    /// `router.proj` after a weightless RMS norm and a learned `router.scale` (× hidden^-½),
    /// softmax top-k renormalised then times `router.per_expert_scale`; experts
    /// `experts.gate_up_proj` `[experts, 2·inter, hidden]`, `experts.down_proj`
    /// `[experts, hidden, inter]`; the block runs beside the dense MLP on the un-normed
    /// residual, with its own norms (Gemma 4 26B-A4B).
    Gemma4,
    /// `mlp.gate` (weight and `e_score_correction_bias`), `mlp.experts.gate_up_proj`
    /// `[experts, 2·inter, hidden]`, `mlp.experts.down_proj` `[experts, hidden, inter]`,
    /// `mlp.shared_experts` (a dense MLP `n_shared_experts` experts wide); the first
    /// `first_k_dense_replace` layers dense (DeepSeek-V3, GLM-4.5).
    DeepSeek,
    /// `mlp.gate`, `mlp.experts.gate_up_proj` `[experts, 2·inter, hidden]`,
    /// `mlp.experts.down_proj` `[experts, hidden, inter]`, and `mlp.shared_expert` scaled by
    /// `σ(mlp.shared_expert_gate(x))`; every layer sparse, softmax top-k renormalised
    /// (Qwen 3.5-MoE).
    GatedShared,
}

impl MoeLayout {
    /// The router's module path in transformers 5 relative to the layer
    /// (`model.layers.{i}.`), and whether it is an `nn.Linear` there (LoRA then reaches it by
    /// `target_modules` and `all-linear`) or a router module whose `weight` only
    /// `target_parameters` reaches.
    pub fn router_module(self) -> (&'static str, bool) {
        match self {
            MoeLayout::Mixtral | MoeLayout::Qwen | MoeLayout::DeepSeek | MoeLayout::GatedShared => ("mlp.gate", false),
            MoeLayout::GptOss => ("mlp.router", false),
            // An nn.Linear subclass in transformers, but its forward returns a tuple, so PEFT
            // 0.21.2's LoRA on it fails: `all-linear` leaves it out here.
            MoeLayout::Llama4 => ("feed_forward.router", false),
            MoeLayout::Gemma4 => ("router.proj", true),
        }
    }

    /// The stacked experts' module path in transformers 5 relative to the layer (Mixtral's
    /// `block_sparse_moe` checkpoint names are `mlp` there).
    pub fn experts_module(self) -> &'static str {
        match self {
            MoeLayout::Llama4 => "feed_forward.experts",
            MoeLayout::Gemma4 => "experts",
            _ => "mlp.experts",
        }
    }

    /// How PEFT's flat LoRA of `experts.gate_up_proj` (`gate_up`) or `experts.down_proj`
    /// maps onto each expert's `nn.Linear` view (see [`ember_lora::expert`]).
    pub fn expert_lora_layout(self, gate_up: bool) -> ember_lora::ExpertLoraLayout {
        ember_lora::ExpertLoraLayout {
            swap_roles: self == MoeLayout::Llama4,
            interleaved_gate_up: gate_up && self == MoeLayout::GptOss,
        }
    }

    /// The module name of the always-on dense expert(s) beside the routed ones.
    pub fn shared_expert_module(self) -> &'static str {
        match self {
            MoeLayout::DeepSeek => "shared_experts",
            _ => "shared_expert",
        }
    }
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
    /// Width of the always-on shared expert (Llama 4), `None` without one.
    pub shared_expert_size: Option<usize>,
}

/// What one layer's attention and MLP look like; layers differ in Gemma 4 (full-attention
/// layers are wider with fewer key/value heads, KV-shared layers have double-wide MLPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// Width of one head.
    pub head_dim: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// Width of the dense MLP.
    pub intermediate_size: usize,
    /// No `v_proj`: the values are the key projection's output (Gemma 4's `attention_k_eq_v`).
    pub values_from_keys: bool,
    /// No key/value projections: the layer attends over the keys and values of this earlier
    /// layer (Gemma 4's KV sharing).
    pub kv_shared_from: Option<usize>,
    /// The layer mixes tokens with gated delta-rule linear attention instead (Qwen 3.5's
    /// `linear_attention` layers; see [`DecoderConfig::linear_attention`]).
    pub linear_attention: bool,
}

/// Gated DeltaNet (Qwen 3.5 / 3.6, Qwen3-Next): the sizes of the `linear_attention` layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearAttentionConfig {
    /// Query/key heads (`linear_num_key_heads`).
    pub num_k_heads: usize,
    /// Value heads (`linear_num_value_heads`), a multiple of the key heads.
    pub num_v_heads: usize,
    /// Query/key width per head (`linear_key_head_dim`).
    pub k_dim: usize,
    /// Value width per head (`linear_value_head_dim`).
    pub v_dim: usize,
    /// Taps of the causal convolution (`linear_conv_kernel_dim`).
    pub conv_kernel: usize,
    /// One `in_proj_qkvz` and one `in_proj_ba`, grouped per key head (Qwen3-Next), instead
    /// of Qwen 3.5's four projections.
    pub grouped_projections: bool,
}

/// Multi-head latent attention (DeepSeek-V3): queries through an optional low-rank bottleneck,
/// keys and values expanded per head from a shared latent, plus one RoPE key shared by all heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentAttentionConfig {
    /// Rank of the query bottleneck (`q_a_proj` → norm → `q_b_proj`); `None`: one `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent (what the cache keeps).
    pub kv_lora_rank: usize,
    /// Per-head query/key width without RoPE.
    pub nope_dim: usize,
    /// Width of the RoPE part (queries per head; one key for all heads).
    pub rope_dim: usize,
    /// Per-head value width.
    pub v_dim: usize,
    /// DeepSeek sparse attention (GLM-5): the indexer keeps this many keys per query. Up to
    /// that many positions it keeps them all and attention is exactly MLA; Ember refuses
    /// longer sequences ([`DecoderConfig::check_sequence_length`]).
    pub index_topk: Option<usize>,
}

/// Gemma 4's per-layer input embeddings: a second token embedding, `[vocab, layers·width]`,
/// mixed with a projection of the input embedding and fed to every layer, `width` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerLayerInputs {
    /// Width of one layer's slice (`hidden_size_per_layer_input`).
    pub width: usize,
    /// Rows of the table (`vocab_size_per_layer_input`).
    pub vocab_size: usize,
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

/// A per-position multiplier of the queries (after RoPE).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QueryScale {
    /// Ministral 3 (Llama 4's long-context trick): `1 + beta·ln(1 + ⌊pos / original⌋)` of the
    /// position ids, on every layer.
    LogPosition {
        /// β (`llama_4_scaling_beta`).
        beta: f64,
        /// The positions per step (`original_max_position_embeddings`).
        original: f64,
    },
    /// Llama 4's attention temperature on RoPE-free layers:
    /// `1 + attn_scale·ln(1 + ⌊(i + 1) / floor_scale⌋)` of the cache index `i` (not the
    /// position id: a left-padded row counts its pads, as transformers does).
    Temperature {
        /// Slope (`attn_scale`).
        attn_scale: f64,
        /// Positions per step (`floor_scale`).
        floor_scale: f64,
    },
}

impl QueryScale {
    /// Whether the scale is read from the cache index rather than the position ids.
    pub fn uses_cache_index(&self) -> bool {
        matches!(self, QueryScale::Temperature { .. })
    }

    /// Whether layers with RoPE get it (Ministral 3) or only RoPE-free ones (Llama 4).
    pub fn on_rope_layers(&self) -> bool {
        matches!(self, QueryScale::LogPosition { .. })
    }
}

/// The normalised decoder configuration the model is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// The text decoder's `model_type` (for display; the forward pass never reads it).
    pub model_type: String,
    /// The family row the config was normalised with.
    pub family: Family,
    /// The multimodal wrapper's `model_type` when the decoder came from its `text_config`.
    pub wrapper: Option<String>,
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
    /// Attention chunk per layer (Llama 4's `chunked_attention` layers: a token attends to the
    /// earlier tokens of its own chunk, counted from the row's first real token).
    pub attention_chunk: Vec<Option<usize>>,
    /// Per layer: whether RoPE rotates q and k (SmolLM3 has RoPE-free layers).
    pub rope_layers: Vec<bool>,
    /// Per-position query multiplier (Ministral 3).
    pub query_scale: Option<QueryScale>,
    /// Per layer: head size, key/value heads, MLP width, where keys/values come from.
    pub layer_shapes: Vec<LayerShape>,
    /// Gemma 4: weightless RMS norm of each value head.
    pub value_norm: bool,
    /// Gemma 4: per-layer input embeddings.
    pub per_layer_inputs: Option<PerLayerInputs>,
    /// Gemma 4: each layer's output is multiplied by its `layer_scalar`.
    pub layer_scalars: bool,
    /// Multi-token-prediction layers stored after the decoder's layers (GLM-4.5), skipped.
    pub trailing_mtp_layers: usize,
    /// Multi-head latent attention in every layer (DeepSeek-V3).
    pub latent_attention: Option<LatentAttentionConfig>,
    /// Gated DeltaNet's sizes, for the layers whose [`LayerShape::linear_attention`] is set.
    pub linear_attention: Option<LinearAttentionConfig>,
    /// Full-attention `q_proj`s also yield a sigmoid output gate per head (Qwen 3.5).
    pub attention_output_gate: bool,
    /// Multimodal placeholder tokens read as the padding token (Gemma 4 wrappers, as
    /// transformers does when no image, video or audio fills them).
    pub placeholder_token_ids: Vec<u32>,
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
    /// The most positions (cache included) a forward pass computes exactly, if limited: GLM-5's
    /// sparse-attention indexer keeps every key up to `index_topk` positions; beyond that it
    /// would drop keys, which Ember does not implement.
    pub fn max_exact_positions(&self) -> Option<usize> {
        self.latent_attention.and_then(|mla| mla.index_topk)
    }

    /// GLM-5's sparse-attention indexer tensors among `keys` (not loaded: at the lengths Ember
    /// runs they keep every key), with the label `ember inspect` and the loader report.
    pub fn unloaded_indexers<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Option<(String, Vec<&'a str>)> {
        let limit = self.max_exact_positions()?;
        let found: Vec<&str> = keys.filter(|k| k.contains(".self_attn.indexer.")).collect();
        (!found.is_empty()).then(|| {
            (
                format!("sparse-attention indexers (every key kept up to {limit} positions)"),
                found,
            )
        })
    }

    /// Refuses `len` positions (a training row, a prompt plus its new tokens) beyond
    /// [`DecoderConfig::max_exact_positions`].
    pub fn check_sequence_length(&self, len: usize) -> Result<()> {
        match self.max_exact_positions() {
            Some(limit) if len > limit => Err(ModelError::SequenceTooLong {
                len,
                limit,
                reason: format!(
                    "{}'s sparse attention keeps only `index_topk` = {limit} keys per query past that, \
                     and Ember implements it only where it keeps them all; use at most {limit} positions",
                    self.model_type
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Reads and normalises `config.json` (or any file of that form).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json = |source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        };
        let value: Value = serde_json::from_str(&text).map_err(json)?;
        if value.get("text_config").is_some_and(Value::is_object) {
            return Self::from_value(value, path);
        }
        // Parsed from the text again, so that errors carry line and column.
        let hf: HfConfig = serde_json::from_str(&text).map_err(json)?;
        Self::from_hf(&hf, path)
    }

    /// Normalises a parsed `config.json`: a text decoder's, or a multimodal wrapper's whose
    /// `text_config` holds the decoder (its vision/audio settings are ignored). `path` names
    /// the file in errors.
    pub fn from_value(value: Value, path: &Path) -> Result<Self> {
        let json = |source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        };
        let Some(text_config) = value.get("text_config").filter(|v| v.is_object()) else {
            let hf: HfConfig = serde_json::from_value(value).map_err(json)?;
            return Self::from_hf(&hf, path);
        };
        let wrapper_type = value.get("model_type").and_then(Value::as_str).unwrap_or_default();
        let Some(wrapper) = WrapperSpec::of(wrapper_type) else {
            return Err(ModelError::UnsupportedModelType {
                path: path.to_path_buf(),
                model_type: format!("{wrapper_type} (a multimodal wrapper with `text_config`)"),
                supported: crate::family::supported_model_types(),
            });
        };
        let mut text = text_config.clone();
        let object = text.as_object_mut().expect("checked above");
        object
            .entry("model_type")
            .or_insert_with(|| Value::from(wrapper.default_text_model_type));
        // The wrapper's own key decides tying (transformers ties through the outer model).
        let tied = value
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(wrapper.tied_by_default);
        object.insert("tie_word_embeddings".into(), Value::from(tied));
        for key in ["bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"] {
            if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                object.entry(key).or_insert_with(|| v.clone());
            }
        }
        let hf: HfConfig = serde_json::from_value(text).map_err(json)?;
        let mut config = Self::from_hf(&hf, path)?;
        config.wrapper = Some(wrapper.model_type.to_string());
        if config.pad_token_id.is_some() {
            config.placeholder_token_ids = wrapper
                .placeholder_token_keys
                .iter()
                .filter_map(|key| value.get(*key).and_then(Value::as_u64))
                .filter(|&id| id < config.vocab_size as u64)
                .map(|id| id as u32)
                .collect();
        }
        Ok(config)
    }

    /// Normalises a parsed text-decoder config; `path` names the file in errors.
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
                format!("`{model_type}` is a multimodal wrapper; read it with DecoderConfig::from_value"),
            ));
        }
        let Some(spec) = FamilySpec::of(model_type) else {
            return Err(ModelError::UnsupportedModelType {
                path: path.to_path_buf(),
                model_type: model_type.to_string(),
                supported: crate::family::supported_model_types(),
            });
        };
        // Gemma 4 configs without `rope_parameters` get transformers' per-layer-type defaults.
        let with_default_rope;
        let hf = match (spec.default_rope_parameters, &hf.rope_parameters) {
            (Some(default), None) => {
                with_default_rope = HfConfig {
                    rope_parameters: Some(serde_json::from_str(default).expect("valid default rope_parameters")),
                    ..hf.clone()
                };
                &with_default_rope
            }
            _ => hf,
        };
        // Gemma 3 writes `true` (EmbeddingGemma), Gemma 4 `"all"`, for attention both ways.
        let bidirectional = hf.use_bidirectional_attention.as_ref();
        if bidirectional.and_then(Value::as_str) == Some("all") || bidirectional.and_then(Value::as_bool) == Some(true)
        {
            return Err(invalid(
                "use_bidirectional_attention",
                "every token attends both ways (an encoder, not a causal LM); Ember trains causal LMs".into(),
            ));
        }
        if hf.num_attention_heads == 0 || hf.hidden_size == 0 || hf.num_hidden_layers == 0 {
            return Err(invalid(
                "num_attention_heads",
                "hidden_size, num_hidden_layers and num_attention_heads must be positive".into(),
            ));
        }
        // Sizes far beyond any released model are a broken or hostile file: refused before
        // anything is allocated from them.
        let limits: [(&str, Option<usize>, usize); 25] = [
            ("vocab_size", Some(hf.vocab_size), 1 << 24),
            ("vocab_size_per_layer_input", hf.vocab_size_per_layer_input, 1 << 24),
            ("hidden_size_per_layer_input", hf.hidden_size_per_layer_input, 1 << 17),
            ("global_head_dim", hf.global_head_dim, 1 << 14),
            ("num_global_key_value_heads", hf.num_global_key_value_heads, 1 << 12),
            ("num_kv_shared_layers", hf.num_kv_shared_layers, 1 << 12),
            ("hidden_size", Some(hf.hidden_size), 1 << 17),
            ("intermediate_size", Some(hf.intermediate_size), 1 << 20),
            ("num_hidden_layers", Some(hf.num_hidden_layers), 1 << 12),
            ("num_attention_heads", Some(hf.num_attention_heads), 1 << 12),
            ("num_key_value_heads", hf.num_key_value_heads, 1 << 12),
            ("head_dim", hf.head_dim, 1 << 14),
            ("max_position_embeddings", hf.max_position_embeddings, 1 << 32),
            ("num_local_experts", hf.num_local_experts, 1 << 16),
            ("num_experts", hf.num_experts, 1 << 16),
            ("n_routed_experts", hf.n_routed_experts, 1 << 16),
            ("num_experts_per_tok", hf.num_experts_per_tok, 1 << 16),
            ("top_k_experts", hf.top_k_experts, 1 << 16),
            ("moe_intermediate_size", hf.moe_intermediate_size, 1 << 20),
            (
                "shared_expert_intermediate_size",
                hf.shared_expert_intermediate_size,
                1 << 20,
            ),
            ("intermediate_size_mlp", hf.intermediate_size_mlp, 1 << 20),
            ("linear_num_key_heads", hf.linear_num_key_heads, 1 << 12),
            ("linear_num_value_heads", hf.linear_num_value_heads, 1 << 12),
            ("linear_key_head_dim", hf.linear_key_head_dim, 1 << 14),
            ("linear_value_head_dim", hf.linear_value_head_dim, 1 << 14),
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
        let latent_attention =
            match spec.latent_attention {
                Some(defaults) => {
                    let dim = |v: Option<usize>, default: usize, key: &str| match v.unwrap_or(default) {
                        0 => Err(invalid(key, "must be positive".into())),
                        d if d > 1 << 16 => Err(invalid(key, format!("{d} is beyond any supported model"))),
                        d => Ok(d),
                    };
                    let q_lora_rank =
                        match &hf.q_lora_rank {
                            None => defaults.q_lora_rank,
                            Some(Value::Null) if spec.sparse_attention_indexer => {
                                return Err(invalid(
                                    "q_lora_rank",
                                    "is required: the sparse-attention indexer reads the query bottleneck".into(),
                                ))
                            }
                            Some(Value::Null) => None,
                            Some(v) => Some(v.as_u64().filter(|&r| r > 0 && r <= 1 << 16).ok_or_else(|| {
                                invalid("q_lora_rank", format!("{v} must be a positive integer or null"))
                            })? as usize),
                        };
                    let index_topk = match hf.index_topk {
                        _ if !spec.sparse_attention_indexer => None,
                        Some(0) => return Err(invalid("index_topk", "must be positive".into())),
                        k => Some(k.unwrap_or(2048)),
                    };
                    Some(LatentAttentionConfig {
                        q_lora_rank,
                        kv_lora_rank: dim(hf.kv_lora_rank, defaults.kv_lora_rank, "kv_lora_rank")?,
                        nope_dim: dim(hf.qk_nope_head_dim, defaults.nope_dim, "qk_nope_head_dim")?,
                        rope_dim: dim(hf.qk_rope_head_dim, defaults.rope_dim, "qk_rope_head_dim")?,
                        v_dim: dim(hf.v_head_dim, defaults.v_dim, "v_head_dim")?,
                        index_topk,
                    })
                }
                None => None,
            };
        let linear_attention = match spec.linear_attention {
            Some(d) => {
                let dim = |v: Option<usize>, default: usize, key: &str| match v.unwrap_or(default) {
                    0 => Err(invalid(key, "must be positive".into())),
                    x if x > 1 << 14 => Err(invalid(key, format!("{x} is beyond any supported model"))),
                    x => Ok(x),
                };
                let config = LinearAttentionConfig {
                    num_k_heads: dim(hf.linear_num_key_heads, d.num_k_heads, "linear_num_key_heads")?,
                    num_v_heads: dim(hf.linear_num_value_heads, d.num_v_heads, "linear_num_value_heads")?,
                    k_dim: dim(hf.linear_key_head_dim, d.k_dim, "linear_key_head_dim")?,
                    v_dim: dim(hf.linear_value_head_dim, d.v_dim, "linear_value_head_dim")?,
                    conv_kernel: dim(hf.linear_conv_kernel_dim, d.conv_kernel, "linear_conv_kernel_dim")?,
                    ..d
                };
                if !config.num_v_heads.is_multiple_of(config.num_k_heads) {
                    return Err(invalid(
                        "linear_num_value_heads",
                        format!(
                            "{} is not a multiple of linear_num_key_heads {}",
                            config.num_v_heads, config.num_k_heads
                        ),
                    ));
                }
                Some(config)
            }
            None => None,
        };
        // MLA's RoPE runs over the rope part only (transformers sets head_dim to it).
        let head_dim = match latent_attention {
            Some(mla) => mla.rope_dim,
            None => hf.head_dim.unwrap_or(hf.hidden_size / num_heads),
        };
        let gemma = spec.gemma_conventions;
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

        let bias = |rule: BiasRule| match rule {
            BiasRule::FromConfig => hf.attention_bias.unwrap_or(false),
            BiasRule::Always => true,
            BiasRule::Never => false,
        };
        let layer_types = layer_types(hf, spec).map_err(|(key, msg)| invalid(&key, msg))?;
        let sliding_window =
            layer_windows(hf, spec, layer_types.as_deref()).map_err(|(key, msg)| invalid(&key, msg))?;
        let attention_chunk = layer_chunks(hf, layer_types.as_deref()).map_err(|(key, msg)| invalid(&key, msg))?;
        let intermediate_size = match spec.moe {
            // Llama 4's dense layers have their own width (`intermediate_size` is the experts').
            Some(MoeLayout::Llama4) => hf.intermediate_size_mlp.unwrap_or(16384),
            _ => hf.intermediate_size,
        };
        let base_shape = LayerShape {
            head_dim,
            num_kv_heads,
            intermediate_size,
            values_from_keys: false,
            kv_shared_from: None,
            linear_attention: false,
        };
        let layer_shapes = layer_shapes(hf, spec, layer_types.as_deref(), base_shape, num_heads)
            .map_err(|(key, msg)| invalid(&key, msg))?;
        // The full-attention layers' head size (Gemma 4's `global_head_dim`) sizes their RoPE.
        let full_head_dim = layer_types
            .as_deref()
            .and_then(|types| types.iter().position(|t| t == "full_attention"))
            .map_or(head_dim, |i| layer_shapes[i].head_dim);

        let (mut rope, mut local_rope) = match spec.rope {
            RopeRule::Shared => (
                rope_config(hf, spec, head_dim, None).map_err(|(key, msg)| invalid(&key, msg))?,
                None,
            ),
            RopeRule::PerLayerType => (
                rope_config(hf, spec, full_head_dim, Some("full_attention"))
                    .map_err(|(key, msg)| invalid(&key, msg))?,
                Some(
                    rope_config(hf, spec, head_dim, Some("sliding_attention"))
                        .map_err(|(key, msg)| invalid(&key, msg))?,
                ),
            ),
        };
        rope.interleaved =
            spec.interleaved_rope || (spec.latent_attention.is_some() && hf.rope_interleave.unwrap_or(true));
        if let Some(local) = local_rope.as_mut() {
            local.interleaved = spec.interleaved_rope;
        }
        let rope_layers = rope_layers(hf, spec).map_err(|(key, msg)| invalid(&key, msg))?;
        let query_scale = if spec.temperature_tuning {
            let floor_scale = hf.floor_scale.unwrap_or(8192.0);
            if floor_scale <= 0.0 || !floor_scale.is_finite() {
                return Err(invalid(
                    "floor_scale",
                    format!("{floor_scale} must be a positive number"),
                ));
            }
            (hf.attn_temperature_tuning.unwrap_or(true)).then(|| QueryScale::Temperature {
                attn_scale: hf.attn_scale.unwrap_or(0.1),
                floor_scale,
            })
        } else if spec.position_query_scale {
            let (params, key) = rope_parameters(hf, None);
            let get = |name: &str| params.as_ref().and_then(|p| p.get(name)).and_then(Value::as_f64);
            match (get("llama_4_scaling_beta"), get("original_max_position_embeddings")) {
                (Some(beta), Some(original)) if original > 0.0 => Some(QueryScale::LogPosition { beta, original }),
                (Some(_), _) => {
                    return Err(invalid(
                        &format!("{key}.original_max_position_embeddings"),
                        "a positive number is required with llama_4_scaling_beta".into(),
                    ))
                }
                (None, _) => None,
            }
        } else {
            None
        };

        let attn_scale = match (spec.query_pre_attn_scalar, hf.query_pre_attn_scalar) {
            // Gemma 4 normalises q and k instead of scaling the scores.
            _ if spec.unit_attention_scale => 1.0,
            // MLA: over the whole query/key width, times YaRN's mscale² (`mscale_all_dim`).
            _ if latent_attention.is_some() => {
                let mla = latent_attention.expect("checked");
                let plain = ((mla.nope_dim + mla.rope_dim) as f64).powf(-0.5);
                let (params, _) = rope_parameters(hf, None);
                let get = |name: &str| params.as_ref().and_then(|p| p.get(name)).and_then(Value::as_f64);
                let scaled = params
                    .as_ref()
                    .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
                    .and_then(Value::as_str)
                    .is_some_and(|t| t != "default");
                match (scaled, get("mscale_all_dim").filter(|m| *m != 0.0), get("factor")) {
                    (true, Some(all_dim), Some(factor)) if factor > 1.0 => {
                        let mscale = 0.1 * all_dim * factor.ln() + 1.0;
                        plain * mscale * mscale
                    }
                    _ => plain,
                }
            }
            (true, Some(s)) => s.powf(-0.5),
            (true, None) => 256f64.powf(-0.5),
            (false, _) => (head_dim as f64).powf(-0.5),
        };
        let (attn_softcap, final_softcap) = match spec.default_softcaps {
            Some((attn, last)) => (
                hf.attn_logit_softcapping.unwrap_or(Some(attn)),
                hf.final_logit_softcapping.unwrap_or(Some(last)),
            ),
            None => (
                hf.attn_logit_softcapping.flatten(),
                hf.final_logit_softcapping.flatten(),
            ),
        };
        let moe = moe_config(hf, spec, act).map_err(|(key, msg)| invalid(&key, msg))?;
        let has_dense_mlp = moe.as_ref().is_none_or(|m| m.sparse_layers.iter().any(|s| !s))
            || matches!(spec.moe, Some(MoeLayout::Gemma4));
        if intermediate_size == 0 && has_dense_mlp {
            return Err(invalid(
                "intermediate_size",
                "required: the width of the dense MLPs".into(),
            ));
        }
        let per_layer_inputs = match hf.hidden_size_per_layer_input {
            _ if !spec.heterogeneous_layers => None,
            Some(0) => None,
            None if spec.default_per_layer_input == 0 => None,
            width => Some(PerLayerInputs {
                width: width.unwrap_or(spec.default_per_layer_input),
                vocab_size: hf.vocab_size_per_layer_input.unwrap_or(262_144),
            }),
        };

        let token = |v: &Option<Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                _ => Vec::new(),
            }
        };

        Ok(Self {
            model_type: model_type.to_string(),
            family: spec.family,
            wrapper: None,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            qkv_bias: bias(spec.qkv_bias),
            o_bias: bias(spec.o_bias),
            mlp_bias: hf.mlp_bias.unwrap_or(false),
            qk_norm: match spec.qk_norm_switch {
                Some(default) if !hf.use_qk_norm.unwrap_or(default) => QkNorm::None,
                _ => spec.qk_norm,
            },
            act,
            rope,
            local_rope,
            norms: spec.norms.clone(),
            norm_unit_offset: spec.norm_weight_offset,
            embed_scale: gemma.then(|| (hf.hidden_size as f64).sqrt() as f32),
            attn_scale,
            attn_softcap,
            final_softcap,
            attn_sinks: spec.attn_sinks,
            fused_qkv: spec.fused_qkv,
            fused_gate_up: spec.fused_gate_up,
            moe,
            sliding_window,
            attention_chunk,
            rope_layers,
            query_scale,
            layer_shapes,
            value_norm: spec.value_norm,
            per_layer_inputs,
            layer_scalars: spec.heterogeneous_layers,
            placeholder_token_ids: Vec::new(),
            latent_attention,
            linear_attention,
            attention_output_gate: spec.attention_output_gate,
            trailing_mtp_layers: if spec.trailing_mtp_layers {
                // (transformers ignores `model.layers.{n}` whatever the config says)
                hf.num_nextn_predict_layers
                    .or(hf.num_mtp_layers)
                    .unwrap_or(1)
                    .min(1 << 8)
            } else {
                0
            },
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(spec.tied_by_default),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            bos_token_id: token(&hf.bos_token_id).first().copied(),
            eos_token_ids: token(&hf.eos_token_id),
            pad_token_id: token(&hf.pad_token_id).first().copied(),
            torch_dtype: hf.dtype.clone().or_else(|| hf.torch_dtype.clone()),
        })
    }

    /// The family row this config was normalised with.
    pub fn spec(&self) -> &'static FamilySpec {
        FamilySpec::get(self.family)
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

/// The `rope_type`s Ember implements.
const SUPPORTED_ROPE_TYPES: &str = "default, linear, llama3, yarn, longrope, proportional";

/// The RoPE parameter object that applies (`rope_parameters`, per layer type when given, or
/// transformers 4's `rope_scaling`) and the key it came from.
fn rope_parameters(hf: &HfConfig, layer_type: Option<&str>) -> (Option<Value>, String) {
    let per_type = layer_type.and_then(|t| hf.rope_parameters.as_ref().and_then(|p| p.get(t)));
    match (per_type, &hf.rope_parameters, &hf.rope_scaling) {
        (Some(p @ Value::Object(_)), _, _) => {
            (Some(p.clone()), format!("rope_parameters.{}", layer_type.unwrap_or("")))
        }
        (None, Some(p @ Value::Object(_)), _) => (Some(p.clone()), "rope_parameters".to_string()),
        (None, _, Some(s @ Value::Object(_))) => (Some(s.clone()), "rope_scaling".to_string()),
        _ => (None, "rope_scaling".to_string()),
    }
}

/// Reads RoPE settings from either `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (transformers 4). `layer_type` selects the per-layer-type
/// parameters of Gemma 3 and OLMo 3 (`rope_parameters.sliding_attention`; in transformers 4
/// style the sliding layers are unscaled, with Gemma 3's `rope_local_base_freq` or the shared
/// `rope_theta`). Errors are `(key, message)`.
fn rope_config(
    hf: &HfConfig,
    spec: &FamilySpec,
    head_dim: usize,
    layer_type: Option<&str>,
) -> std::result::Result<RopeConfig, (String, String)> {
    let per_type = layer_type.and_then(|t| hf.rope_parameters.as_ref().and_then(|p| p.get(t)));
    let (params, key) = rope_parameters(hf, layer_type);
    let (params, local_theta) = match (layer_type, per_type) {
        (Some("sliding_attention"), None) if spec.gemma_conventions => {
            (None, Some(hf.rope_local_base_freq.unwrap_or(10_000.0)))
        }
        // transformers' Olmo3Config pops `rope_theta` for the global layers and gives the
        // sliding ones its class default.
        (Some("sliding_attention"), None) => (None, Some(spec.default_rope_theta)),
        _ => (params, None),
    };
    let get = |name: &str| params.as_ref().and_then(|p| p.get(name)).and_then(Value::as_f64);
    let theta = local_theta
        .or(get("rope_theta"))
        .or(hf.rope_theta)
        .unwrap_or(spec.default_rope_theta);
    // MLA rotates its whole RoPE part (`head_dim` here); Mistral 4's config states that as
    // `partial_rotary_factor` = rope / (nope + rope) of a wider head, which is not applied twice.
    let partial = match spec.latent_attention {
        Some(_) => 1.0,
        None => get("partial_rotary_factor")
            .or(hf.partial_rotary_factor)
            .unwrap_or(spec.default_partial_rotary),
    };
    let rope_type = params
        .as_ref()
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    // Proportional RoPE rotates over the whole head, with zero frequencies past its angles.
    let rotary_dim = if rope_type == "proportional" {
        head_dim
    } else {
        ((head_dim as f64) * partial) as usize
    };
    if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 || !(0.0..=1.0).contains(&partial) {
        return Err((
            "partial_rotary_factor".into(),
            format!("rotary dimension {rotary_dim} must be even and positive"),
        ));
    }
    let need = |name: &str| {
        get(name).ok_or_else(|| (format!("{key}.{name}"), format!("required for rope_type `{rope_type}`")))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "proportional" => RopeScaling::Proportional {
            factor: get("factor").filter(|f| *f > 0.0).unwrap_or(1.0),
            // transformers: int(partial_rotary_factor * head_dim // 2)
            rope_angles: ((partial * head_dim as f64) / 2.0).floor() as usize,
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
                format!("unsupported rope_type `{other}` (supported: {SUPPORTED_ROPE_TYPES})"),
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
fn layer_types(hf: &HfConfig, spec: &FamilySpec) -> std::result::Result<Option<Vec<String>>, (String, String)> {
    let n = hf.num_hidden_layers;
    if let Some(types) = &hf.layer_types {
        if types.len() != n {
            return Err((
                "layer_types".into(),
                format!("has {} entries for {n} layers", types.len()),
            ));
        }
        let mut types = types.clone();
        if spec.heterogeneous_layers {
            // transformers forces Gemma 4's last layer to full attention (with a warning).
            types[n - 1] = "full_attention".into();
        }
        return Ok(Some(types));
    }
    let pattern = match spec.layer_pattern {
        LayerPattern::ChunkedRopeLayers => {
            // Llama 4: RoPE layers attend in chunks when a chunk size is set.
            let rope = rope_layers(hf, spec)?;
            let chunked = hf.attention_chunk_size.is_some();
            return Ok(Some(
                rope.iter()
                    .map(|&r| {
                        if r && chunked {
                            "chunked_attention"
                        } else {
                            "full_attention"
                        }
                        .to_string()
                    })
                    .collect(),
            ));
        }
        LayerPattern::EveryNthGlobal(n) => n,
        LayerPattern::SlidingWindowPatternKey(default) => hf
            .sliding_window_pattern
            .or(hf.sliding_window_pattern_private)
            .unwrap_or(default),
        LayerPattern::LinearWithEveryNthFull(default) => {
            let every = hf.full_attention_interval.unwrap_or(default);
            if every == 0 {
                return Err(("full_attention_interval".into(), "must be positive".into()));
            }
            return Ok(Some(
                (0..n)
                    .map(|i| {
                        if (i + 1) % every == 0 {
                            "full_attention"
                        } else {
                            "linear_attention"
                        }
                        .to_string()
                    })
                    .collect(),
            ));
        }
        LayerPattern::None => return Ok(None),
    };
    if pattern == 0 {
        return Err(("sliding_window_pattern".into(), "must be positive".into()));
    }
    Ok(Some(
        (0..n)
            .map(|i| {
                if (i + 1) % pattern == 0 || (spec.heterogeneous_layers && i + 1 == n) {
                    "full_attention".to_string()
                } else {
                    "sliding_attention".to_string()
                }
            })
            .collect(),
    ))
}

/// The MoE settings, `None` for dense models. Errors are `(key, message)`.
fn moe_config(
    hf: &HfConfig,
    spec: &FamilySpec,
    act: Activation,
) -> std::result::Result<Option<MoeConfig>, (String, String)> {
    let Some(layout) = spec.moe else {
        return Ok(None);
    };
    if layout == MoeLayout::Gemma4 && !hf.enable_moe_block.unwrap_or(false) {
        return Ok(None);
    }
    let (experts_key, top_k_key, top_k) = match layout {
        MoeLayout::Gemma4 => ("num_experts", "top_k_experts", hf.top_k_experts),
        MoeLayout::DeepSeek => ("n_routed_experts", "num_experts_per_tok", hf.num_experts_per_tok),
        _ => ("num_local_experts", "num_experts_per_tok", hf.num_experts_per_tok),
    };
    let num_experts = hf
        .num_local_experts
        .or(hf.num_experts)
        .or(hf.n_routed_experts)
        .filter(|&n| n <= 1 << 16)
        .ok_or_else(|| {
            (
                experts_key.to_string(),
                "required for a MoE model (at most 65536)".to_string(),
            )
        })?;
    let top_k = top_k.ok_or_else(|| (top_k_key.to_string(), "required for a MoE model".to_string()))?;
    if top_k == 0 || top_k > num_experts {
        return Err((
            top_k_key.into(),
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
        MoeLayout::Llama4 => {
            let sparse = match &hf.moe_layers {
                Some(list) => (0..n).map(|i| list.contains(&i)).collect(),
                None => {
                    let step = hf.interleave_moe_layer_step.unwrap_or(1);
                    if step == 0 {
                        return Err(("interleave_moe_layer_step".into(), "must be positive".into()));
                    }
                    (0..n).map(|i| (i + 1) % step == 0).collect()
                }
            };
            (
                Routing::TopKSigmoid,
                ExpertActivation::Gated(act),
                hf.intermediate_size,
                sparse,
            )
        }
        MoeLayout::Gemma4 => (
            Routing::SoftmaxTopK { renormalize: true },
            ExpertActivation::Gated(act),
            hf.moe_intermediate_size.ok_or_else(|| {
                (
                    "moe_intermediate_size".to_string(),
                    "required with enable_moe_block".to_string(),
                )
            })?,
            vec![true; n],
        ),
        MoeLayout::DeepSeek => {
            let defaults = spec
                .group_routing
                .expect("a DeepSeek-layout family names its routing defaults");
            let groups = hf.n_group.unwrap_or(defaults.groups);
            let top_groups = hf.topk_group.unwrap_or(defaults.top_groups);
            // A group scores by its two best experts.
            if groups == 0 || !num_experts.is_multiple_of(groups) || num_experts / groups < 2 {
                return Err((
                    "n_group".into(),
                    format!("{groups} groups must split the {num_experts} experts into groups of 2 or more"),
                ));
            }
            if top_groups == 0 || top_groups > groups || top_k > top_groups * (num_experts / groups) {
                return Err((
                    "topk_group".into(),
                    format!(
                        "{top_groups} of {groups} groups must be at least 1, at most the groups, and hold the \
                         {top_k} experts per token"
                    ),
                ));
            }
            let sparse = match &hf.mlp_layer_types {
                Some(types) if types.len() != n => {
                    return Err((
                        "mlp_layer_types".into(),
                        format!("has {} entries for {n} layers", types.len()),
                    ))
                }
                Some(types) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sparse" => Ok(true),
                        "dense" => Ok(false),
                        other => Err((
                            "mlp_layer_types".to_string(),
                            format!("`{other}` is neither `dense` nor `sparse`"),
                        )),
                    })
                    .collect::<std::result::Result<Vec<bool>, _>>()?,
                None => {
                    let dense = hf.first_k_dense_replace.unwrap_or(defaults.first_dense);
                    (0..n).map(|i| i >= dense).collect()
                }
            };
            (
                Routing::GroupLimited {
                    scores: defaults.scores,
                    groups,
                    top_groups,
                    renormalize: hf.norm_topk_prob.unwrap_or(true),
                    scaling: hf.routed_scaling_factor.unwrap_or(defaults.scaling),
                },
                ExpertActivation::Gated(act),
                hf.moe_intermediate_size.ok_or_else(|| {
                    (
                        "moe_intermediate_size".to_string(),
                        "required for a DeepSeek-style MoE".to_string(),
                    )
                })?,
                sparse,
            )
        }
        MoeLayout::GatedShared => {
            // Qwen3-Next: dense layers by `mlp_only_layers` / `decoder_sparse_step` (Qwen 3.5-MoE
            // has neither: every layer sparse).
            let step = hf.decoder_sparse_step.unwrap_or(1);
            let dense = hf.mlp_only_layers.clone().unwrap_or_default();
            (
                Routing::SoftmaxTopK {
                    renormalize: hf.norm_topk_prob.unwrap_or(true),
                },
                ExpertActivation::Gated(act),
                hf.moe_intermediate_size.ok_or_else(|| {
                    (
                        "moe_intermediate_size".to_string(),
                        "required for a MoE model".to_string(),
                    )
                })?,
                (0..n)
                    .map(|i| !dense.contains(&i) && step > 0 && (i + 1) % step == 0)
                    .collect(),
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
        shared_expert_size: match layout {
            MoeLayout::Llama4 => Some(hf.intermediate_size),
            MoeLayout::DeepSeek => Some(intermediate_size * hf.n_shared_experts.unwrap_or(1)).filter(|&w| w > 0),
            MoeLayout::GatedShared => Some(hf.shared_expert_intermediate_size.ok_or_else(|| {
                (
                    "shared_expert_intermediate_size".to_string(),
                    "required for a MoE model with a shared expert".to_string(),
                )
            })?),
            _ => None,
        },
    }))
}

/// The sliding window of each layer. Errors are `(key, message)`.
fn layer_windows(
    hf: &HfConfig,
    spec: &FamilySpec,
    layer_types: Option<&[String]>,
) -> std::result::Result<Vec<Option<usize>>, (String, String)> {
    let n = hf.num_hidden_layers;
    // SmolLM3 writes `layer_types` but slides only with `use_sliding_window`.
    let disabled = spec.window == WindowRule::WhenEnabled && !hf.use_sliding_window.unwrap_or(false);
    if let Some(types) = layer_types.filter(|_| !disabled) {
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" | "chunked_attention" => Ok(None),
                // GLM-5's sparse attention sees every key within the lengths Ember runs.
                "indexed_attention" if spec.sparse_attention_indexer => Ok(None),
                "linear_attention" if spec.linear_attention.is_some() => Ok(None),
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
    let window = match spec.window {
        // Families whose transformers attention never slides ignore a `sliding_window` key.
        WindowRule::Ignored | WindowRule::WhenEnabled => None,
        WindowRule::EveryLayer | WindowRule::Qwen => hf.sliding_window,
    };
    Ok((0..n)
        .map(|i| {
            if spec.window == WindowRule::Qwen {
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

/// The attention chunk of each layer (`chunked_attention` layers). Errors are `(key, message)`.
fn layer_chunks(
    hf: &HfConfig,
    layer_types: Option<&[String]>,
) -> std::result::Result<Vec<Option<usize>>, (String, String)> {
    let n = hf.num_hidden_layers;
    let Some(types) = layer_types else {
        return Ok(vec![None; n]);
    };
    types
        .iter()
        .map(|t| match t.as_str() {
            "chunked_attention" => match hf.attention_chunk_size {
                Some(c) if c > 0 && c <= 1 << 32 => Ok(Some(c)),
                _ => Err((
                    "attention_chunk_size".to_string(),
                    "a size between 1 and 2^32 is needed by chunked_attention layers".to_string(),
                )),
            },
            _ => Ok(None),
        })
        .collect()
}

/// Per layer, whether RoPE applies: SmolLM3's `no_rope_layers` (1 = RoPE), or without it
/// every `no_rope_layer_interval`-th layer (default 4) RoPE-free; every layer elsewhere.
/// Each layer's head size, key/value heads, MLP width and key/value source: `base` for every
/// layer, except in Gemma 4 (`per_layer_config` overrides, or `global_head_dim` and
/// `num_global_key_value_heads` on full-attention layers; keys as values off the sliding
/// layers with `attention_k_eq_v`; the last `num_kv_shared_layers` reuse the keys/values of
/// the last earlier layer of their type, with double-wide MLPs under `use_double_wide_mlp`).
/// Errors are `(key, message)`.
fn layer_shapes(
    hf: &HfConfig,
    spec: &FamilySpec,
    layer_types: Option<&[String]>,
    base: LayerShape,
    num_heads: usize,
) -> std::result::Result<Vec<LayerShape>, (String, String)> {
    let n = hf.num_hidden_layers;
    let mut shapes = vec![base; n];
    if spec.linear_attention.is_some() {
        for (shape, kind) in shapes.iter_mut().zip(layer_types.into_iter().flatten()) {
            shape.linear_attention = kind == "linear_attention";
        }
    }
    if !spec.heterogeneous_layers {
        return Ok(shapes);
    }
    let type_of = |i: usize| layer_types.map_or("full_attention", |t| t[i].as_str());
    let k_eq_v = hf.attention_k_eq_v.unwrap_or(false);
    match &hf.per_layer_config {
        None | Some(Value::Null) => {
            for (i, shape) in shapes.iter_mut().enumerate() {
                if type_of(i) == "full_attention" {
                    shape.head_dim = hf.global_head_dim.unwrap_or(512);
                    if let Some(heads) = hf.num_global_key_value_heads.filter(|_| k_eq_v) {
                        shape.num_kv_heads = heads;
                    }
                }
            }
        }
        Some(Value::Object(overrides)) => {
            for (key, settings) in overrides {
                let layers: Vec<usize> = match key.parse::<usize>() {
                    Ok(i) if i < n => vec![i],
                    _ => (0..n).filter(|&i| type_of(i) == key).collect(),
                };
                if layers.is_empty() {
                    return Err((
                        format!("per_layer_config.{key}"),
                        format!("is neither a layer index below {n} nor a layer type of layer_types"),
                    ));
                }
                let Some(settings) = settings.as_object() else {
                    return Err((format!("per_layer_config.{key}"), "must be an object".into()));
                };
                for (name, value) in settings {
                    let at = format!("per_layer_config.{key}.{name}");
                    let v = value
                        .as_u64()
                        .filter(|&v| v > 0 && v <= 1 << 20)
                        .ok_or_else(|| (at.clone(), format!("{value} must be a positive integer")))?
                        as usize;
                    for &i in &layers {
                        match name.as_str() {
                            "head_dim" => shapes[i].head_dim = v,
                            "num_key_value_heads" => shapes[i].num_kv_heads = v,
                            "intermediate_size" => shapes[i].intermediate_size = v,
                            _ => {
                                return Err((
                                    at,
                                    "is not a per-layer setting Ember implements \
                                     (head_dim, num_key_value_heads, intermediate_size)"
                                        .into(),
                                ))
                            }
                        }
                    }
                }
            }
        }
        Some(_) => return Err(("per_layer_config".into(), "must be an object".into())),
    }
    for (i, shape) in shapes.iter_mut().enumerate() {
        shape.values_from_keys = k_eq_v && type_of(i) != "sliding_attention";
        if !num_heads.is_multiple_of(shape.num_kv_heads) {
            return Err((
                "per_layer_config".into(),
                format!(
                    "layer {i}: {} key/value heads do not divide the {num_heads} query heads",
                    shape.num_kv_heads
                ),
            ));
        }
    }
    // One RoPE per layer type: its head size must be the same on every layer of the type.
    for i in 0..n {
        if let Some(j) = (0..i).find(|&j| type_of(j) == type_of(i)) {
            if shapes[j].head_dim != shapes[i].head_dim {
                return Err((
                    "per_layer_config".into(),
                    format!(
                        "layers {j} and {i} are both {} with head sizes {} and {}",
                        type_of(i),
                        shapes[j].head_dim,
                        shapes[i].head_dim
                    ),
                ));
            }
        }
    }
    let shared = hf.num_kv_shared_layers.unwrap_or(0);
    if shared >= n && shared > 0 {
        return Err((
            "num_kv_shared_layers".into(),
            format!("{shared} leaves no layer of the {n} to compute keys and values"),
        ));
    }
    let first_shared = n - shared;
    for i in first_shared..n {
        let Some(source) = (0..first_shared).rev().find(|&j| type_of(j) == type_of(i)) else {
            return Err((
                "num_kv_shared_layers".into(),
                format!(
                    "layer {i} ({}) would reuse keys/values, but no earlier layer of that type computes them",
                    type_of(i)
                ),
            ));
        };
        let from = shapes[source];
        if (from.head_dim, from.num_kv_heads) != (shapes[i].head_dim, shapes[i].num_kv_heads) {
            return Err((
                "num_kv_shared_layers".into(),
                format!("layer {i} reuses layer {source}'s keys/values, whose head size or count differs"),
            ));
        }
        shapes[i].kv_shared_from = Some(source);
        shapes[i].values_from_keys = false;
        if hf.use_double_wide_mlp.unwrap_or(false) {
            shapes[i].intermediate_size *= 2;
        }
    }
    Ok(shapes)
}

fn rope_layers(hf: &HfConfig, spec: &FamilySpec) -> std::result::Result<Vec<bool>, (String, String)> {
    let n = hf.num_hidden_layers;
    if !spec.nope_layers {
        return Ok(vec![true; n]);
    }
    if let Some(list) = &hf.no_rope_layers {
        if list.len() != n {
            return Err((
                "no_rope_layers".into(),
                format!("has {} entries for {n} layers", list.len()),
            ));
        }
        return Ok(list.iter().map(|&x| x != 0).collect());
    }
    let interval = hf.no_rope_layer_interval.unwrap_or(4);
    if interval == 0 {
        return Err(("no_rope_layer_interval".into(), "must be positive".into()));
    }
    Ok((0..n).map(|i| (i + 1) % interval != 0).collect())
}

/// Resolves `dir/config.json`.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
