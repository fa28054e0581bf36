//! One entry per architecture family: everything Ember knows about a `model_type`, in one
//! table. Config normalisation ([`crate::config`]), weight names ([`ModuleNames`]), the LoRA
//! module paths ([`crate::lora`]) and the test lists (one fixture per entry) are derived from
//! it; the forward pass reads the typed flags the config builds from it, never `model_type`.
//!
//! Adding a family is adding a [`FamilySpec`] row (and a fixture under `tests/fixtures/`);
//! a new mechanism (an attention kind, a router) is a new variant of the typed flags.

use ember_lora::FusedMoeTargets;

use crate::config::{LinearAttentionConfig, MoeLayout, NormPlacement, QkNorm};

/// The architecture families Ember implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// Llama 2/3/3.x.
    Llama,
    /// Mistral 7B and its successors with a text-only config.
    Mistral,
    /// Ministral 3 (Mistral 3 family): YaRN and a position-dependent query scale.
    Ministral3,
    /// Qwen 2 / 2.5.
    Qwen2,
    /// Qwen 3 dense.
    Qwen3,
    /// Qwen 3.5 / 3.6 (text decoder): Gated DeltaNet layers with gated full attention.
    Qwen3_5,
    /// Qwen 3.5 / 3.6 MoE (text decoder): Qwen 3.5's layers with a gated-shared-expert MoE.
    Qwen3_5Moe,
    /// Qwen3-Next: Qwen 3.5-MoE's design with fused, per-key-head grouped DeltaNet projections.
    Qwen3Next,
    /// Gemma 1.
    Gemma,
    /// Gemma 2.
    Gemma2,
    /// Gemma 3 (text decoder).
    Gemma3,
    /// Gemma 4 (text decoder): per-layer head sizes, keys as values, KV sharing, per-layer
    /// inputs, MoE beside the dense MLP.
    Gemma4,
    /// Gemma 4 unified (text decoder): Gemma 4 without per-layer inputs and MoE.
    Gemma4Unified,
    /// Phi-3 / 3.5 / Phi-4-mini.
    Phi3,
    /// OLMo 2.
    Olmo2,
    /// OLMo 3: OLMo 2 with sliding-window layers.
    Olmo3,
    /// SmolLM3: Llama with RoPE-free (NoPE) layers.
    SmolLm3,
    /// GLM 4.
    Glm4,
    /// Llama 4 (text decoder): chunked attention, RoPE-free layers with temperature tuning,
    /// L2 q/k norm, MoE with a shared expert interleaved with dense layers.
    Llama4,
    /// Mixtral.
    Mixtral,
    /// Qwen 3 MoE.
    Qwen3Moe,
    /// GLM-4.5–4.7 (MoE): DeepSeek-style group-limited sigmoid routing, shared experts,
    /// dense first layers, partial rotary.
    Glm4Moe,
    /// DeepSeek-V3: multi-head latent attention and DeepSeek MoE.
    DeepseekV3,
    /// GLM-4.7-Flash: DeepSeek-V3's latent attention with GLM-4.5's MoE.
    Glm4MoeLite,
    /// GLM-5 / 5.1: GLM-4.7-Flash's blocks with DeepSeek sparse attention (a top-k key indexer).
    GlmMoeDsa,
    /// Mistral Small 4: latent attention, softmax group-limited routing, shared experts.
    Mistral4,
    /// gpt-oss.
    GptOss,
}

/// Whether a projection has a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasRule {
    /// As `attention_bias` says (default false).
    FromConfig,
    /// Always (Qwen 2's q/k/v).
    Always,
    /// Never, whatever the config says.
    Never,
}

/// Which layers a `sliding_window` key applies to when the config has no `layer_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowRule {
    /// The family's attention never slides; the key is ignored (transformers ignores it too).
    Ignored,
    /// Every layer slides when `sliding_window` is set (Mistral, Mixtral, Phi-3).
    EveryLayer,
    /// Qwen 2/3: only with `use_sliding_window`, from `max_window_layers` on.
    Qwen,
    /// SmolLM3: only with `use_sliding_window`, on the `sliding_attention` layers.
    WhenEnabled,
}

/// The default per-layer attention kinds when the config has no `layer_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPattern {
    /// No layer types: every layer follows [`WindowRule`].
    None,
    /// Every n-th layer (1-based) is global, the others slide (gemma2 and gpt-oss: 2, OLMo 3: 4).
    EveryNthGlobal(usize),
    /// Gemma 3: every `sliding_window_pattern`-th layer is global (default given).
    SlidingWindowPatternKey(usize),
    /// Llama 4: RoPE layers are `chunked_attention` when `attention_chunk_size` is set, the
    /// RoPE-free ones global.
    ChunkedRopeLayers,
    /// Qwen 3.5: every n-th layer (`full_attention_interval`, default given) is
    /// `full_attention`, the others `linear_attention`.
    LinearWithEveryNthFull(usize),
}

/// Which RoPE a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeRule {
    /// One RoPE for every layer.
    Shared,
    /// Per layer type (`rope_parameters.sliding_attention` / `.full_attention`; Gemma 3, OLMo 3).
    PerLayerType,
}

/// transformers' defaults of multi-head latent attention's sizes (they differ per config class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentDefaults {
    /// `q_lora_rank` (`None`: a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// `kv_lora_rank`.
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim`.
    pub nope_dim: usize,
    /// `qk_rope_head_dim`.
    pub rope_dim: usize,
    /// `v_head_dim`.
    pub v_dim: usize,
}

/// How a DeepSeek-style router turns logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScores {
    /// `σ(logit)`, chosen with `e_score_correction_bias` added (DeepSeek-V3, GLM).
    Sigmoid,
    /// Softmax over the experts (DeepSeek-V2, Mistral 4).
    Softmax,
}

/// transformers' defaults of a DeepSeek-style MoE (they differ per config class).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupRoutingDefaults {
    /// How logits become scores.
    pub scores: GroupScores,
    /// `n_group`.
    pub groups: usize,
    /// `topk_group`.
    pub top_groups: usize,
    /// `routed_scaling_factor`.
    pub scaling: f64,
    /// `first_k_dense_replace` (also the dense prefix of a default `mlp_layer_types`).
    pub first_dense: usize,
}

/// Everything one family changes, as data.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilySpec {
    /// The family.
    pub family: Family,
    /// `model_type` in config.json.
    pub model_type: &'static str,
    /// transformers' causal-LM class (`architectures` in config.json).
    pub causal_lm_class: &'static str,
    /// What is special, for `ember inspect` and the README table.
    pub summary: &'static str,
    /// Where each block normalises, with the checkpoint's norm names.
    pub norms: NormPlacement,
    /// q/k RMS norm before RoPE.
    pub qk_norm: QkNorm,
    /// Gemma conventions: `√hidden` embedding scale, `hidden_activation` (default GeLU-tanh),
    /// `rope_local_base_freq`.
    pub gemma_conventions: bool,
    /// Norms scale by `1 + w` (Gemma 1–3; Gemma 4 scales by `w`).
    pub norm_weight_offset: bool,
    /// Scores are not scaled (`q·kᵀ · 1`): Gemma 4 normalises q and k instead.
    pub unit_attention_scale: bool,
    /// Gemma 4: a weightless RMS norm of each value head.
    pub value_norm: bool,
    /// Gemma 4's layer mechanisms: per-layer head sizes (`per_layer_config`, or
    /// `global_head_dim`/`num_global_key_value_heads` on full layers), keys as values
    /// (`attention_k_eq_v`), KV sharing (`num_kv_shared_layers`) with double-wide MLPs,
    /// per-layer inputs (`hidden_size_per_layer_input`), `layer_scalar`, last layer global,
    /// `use_bidirectional_attention`.
    pub heterogeneous_layers: bool,
    /// transformers' default of `hidden_size_per_layer_input` (Gemma 4: 256; 0 = none).
    pub default_per_layer_input: usize,
    /// transformers' `rope_parameters` when the config has none (JSON), if not plain RoPE.
    pub default_rope_parameters: Option<&'static str>,
    /// The q/k norm is switched by `use_qk_norm`, with this default (Llama 4: on, GLM-4.5:
    /// off); `None`: always as `qk_norm` says.
    pub qk_norm_switch: Option<bool>,
    /// transformers' `partial_rotary_factor` when the config gives none (GLM-4.5: 0.5).
    pub default_partial_rotary: f64,
    /// Multi-token-prediction layers are stored as extra decoder layers after the last one
    /// (`model.layers.{n}…`, `num_nextn_predict_layers` of them; GLM-4.5): skipped.
    pub trailing_mtp_layers: bool,
    /// Multi-head latent attention (`q_lora_rank`, `kv_lora_rank`, ...; DeepSeek-V3), with the
    /// config class's defaults.
    pub latent_attention: Option<LatentDefaults>,
    /// Gated DeltaNet on the `linear_attention` layers (Qwen 3.5), with the config class's sizes
    /// (the config's keys override them).
    pub linear_attention: Option<LinearAttentionConfig>,
    /// Full-attention `q_proj`s also yield a sigmoid output gate per head (Qwen 3.5).
    pub attention_output_gate: bool,
    /// DeepSeek sparse attention (GLM-5): a per-layer indexer picks `index_topk` keys per query.
    /// Exact while every key is picked (at most `index_topk` positions); longer is refused.
    pub sparse_attention_indexer: bool,
    /// Group-limited routing of a [`MoeLayout::DeepSeek`] block, with the config class's defaults.
    pub group_routing: Option<GroupRoutingDefaults>,
    /// Gemma 2/3: scores scaled by `query_pre_attn_scalar^-0.5` (default 256) instead of
    /// `head_dim^-0.5`.
    pub query_pre_attn_scalar: bool,
    /// transformers' default of `tie_word_embeddings` when the config omits it.
    pub tied_by_default: bool,
    /// Bias on q/k/v.
    pub qkv_bias: BiasRule,
    /// Bias on `o_proj`.
    pub o_bias: BiasRule,
    /// One `qkv_proj` (Phi-3).
    pub fused_qkv: bool,
    /// One `gate_up_proj` (Phi-3, GLM 4).
    pub fused_gate_up: bool,
    /// RoPE on interleaved pairs (GLM).
    pub interleaved_rope: bool,
    /// Where a `sliding_window` key applies without `layer_types`.
    pub window: WindowRule,
    /// Default layer types.
    pub layer_pattern: LayerPattern,
    /// One RoPE or one per layer type.
    pub rope: RopeRule,
    /// Gemma 2: default attention / final logit soft-caps when the keys are absent.
    pub default_softcaps: Option<(f64, f64)>,
    /// gpt-oss: per-head attention sinks.
    pub attn_sinks: bool,
    /// Sparse MoE layout, `None` for dense families.
    pub moe: Option<MoeLayout>,
    /// SmolLM3: `no_rope_layers` / `no_rope_layer_interval` switch RoPE off per layer.
    pub nope_layers: bool,
    /// Ministral 3: queries scaled by `1 + β·ln(1 + ⌊pos / original⌋)`
    /// (`rope_parameters.llama_4_scaling_beta`).
    pub position_query_scale: bool,
    /// Llama 4: queries of RoPE-free layers scaled by a temperature (`attn_temperature_tuning`,
    /// `floor_scale`, `attn_scale`).
    pub temperature_tuning: bool,
    /// The feed-forward block's module name: `mlp`, or Llama 4's `feed_forward`.
    pub mlp_module: &'static str,
    /// transformers 5 fuses this family's experts (and PEFT 0.21 rewrites LoRA targets that
    /// name the v4 expert projections or router to `target_parameters`, see
    /// [`ember_lora::LoraConfig::with_fused_moe_targets`]).
    pub peft_fused_moe: Option<FusedMoeTargets>,
    /// transformers' `default_theta` of the config class: RoPE's θ when the config gives none
    /// (of the global layers; also what OLMo 3's sliding layers get from a transformers-4 style
    /// config, whatever its `rope_theta`).
    pub default_rope_theta: f64,
}

/// A plain pre-norm dense Llama-style decoder; the rows below override what differs.
const LLAMA: FamilySpec = FamilySpec {
    family: Family::Llama,
    model_type: "llama",
    causal_lm_class: "LlamaForCausalLM",
    summary: "pre-norm SwiGLU decoder; llama3 RoPE scaling",
    norms: NormPlacement::PRE,
    qk_norm: QkNorm::None,
    gemma_conventions: false,
    norm_weight_offset: false,
    unit_attention_scale: false,
    value_norm: false,
    heterogeneous_layers: false,
    default_per_layer_input: 0,
    default_rope_parameters: None,
    qk_norm_switch: None,
    default_partial_rotary: 1.0,
    trailing_mtp_layers: false,
    latent_attention: None,
    linear_attention: None,
    attention_output_gate: false,
    sparse_attention_indexer: false,
    group_routing: None,
    query_pre_attn_scalar: false,
    tied_by_default: false,
    qkv_bias: BiasRule::FromConfig,
    o_bias: BiasRule::FromConfig,
    fused_qkv: false,
    fused_gate_up: false,
    interleaved_rope: false,
    window: WindowRule::Ignored,
    layer_pattern: LayerPattern::None,
    rope: RopeRule::Shared,
    default_softcaps: None,
    attn_sinks: false,
    moe: None,
    nope_layers: false,
    position_query_scale: false,
    temperature_tuning: false,
    mlp_module: "mlp",
    peft_fused_moe: None,
    default_rope_theta: 10_000.0,
};

/// PEFT's target rewrite for Mixtral (`_MOE_TARGET_MODULE_MAPPING["mixtral"]`).
const MIXTRAL_FUSED: FusedMoeTargets = FusedMoeTargets {
    renames: &[
        ("gate", "gate.weight"),
        ("w1", "gate_up_proj"),
        ("w3", "gate_up_proj"),
        ("w2", "down_proj"),
    ],
    fused: &[("gate_up_proj", &["w1", "w3"])],
    renamed_modules: &[(".block_sparse_moe.", ".mlp.")],
};

/// PEFT's target rewrite for the families transformers maps as `qwen2_moe` (Qwen2/3-MoE,
/// DeepSeek-V3, GLM-4.5 to GLM-5, Qwen3-Next).
const QWEN2_MOE_FUSED: FusedMoeTargets = FusedMoeTargets {
    renames: &[
        ("gate", "gate.weight"),
        ("gate_proj", "gate_up_proj"),
        ("up_proj", "gate_up_proj"),
        ("down_proj", "down_proj"),
    ],
    fused: &[("gate_up_proj", &["gate_proj", "up_proj"])],
    renamed_modules: &[],
};

/// DeepSeek-style sigmoid routing with transformers' GLM defaults; rows override what differs.
const SIGMOID_GROUPS: GroupRoutingDefaults = GroupRoutingDefaults {
    scores: GroupScores::Sigmoid,
    groups: 1,
    top_groups: 1,
    scaling: 1.0,
    first_dense: 1,
};

/// GLM-4.7-Flash's latent attention sizes (GLM-5 differs in `q_lora_rank`).
const GLM_LATENT: LatentDefaults = LatentDefaults {
    q_lora_rank: Some(768),
    kv_lora_rank: 512,
    nope_dim: 192,
    rope_dim: 64,
    v_dim: 256,
};

/// Qwen 3.5's Gated DeltaNet sizes (transformers' defaults; Qwen3-Next fuses the projections).
const QWEN3_5_LINEAR: LinearAttentionConfig = LinearAttentionConfig {
    num_k_heads: 16,
    num_v_heads: 32,
    k_dim: 128,
    v_dim: 128,
    conv_kernel: 4,
    grouped_projections: false,
};

/// Qwen 3.5's text decoder (its MoE variant and Qwen3-Next override what differs).
const QWEN3_5: FamilySpec = FamilySpec {
    family: Family::Qwen3_5,
    model_type: "qwen3_5_text",
    causal_lm_class: "Qwen3_5ForCausalLM",
    summary: "hybrid: Gated DeltaNet (gated delta rule, causal short convolution, recurrent state) on 3 \
              of 4 layers, full attention with a sigmoid output gate and per-head q/k norm on the rest, \
              (1 + w) norms, partial rotary 0.25",
    qk_norm: QkNorm::PerHead,
    norm_weight_offset: true,
    linear_attention: Some(QWEN3_5_LINEAR),
    attention_output_gate: true,
    layer_pattern: LayerPattern::LinearWithEveryNthFull(4),
    default_partial_rotary: 0.25,
    ..LLAMA
};

/// Gemma 4's text decoder (its unified variant overrides what it lacks).
const GEMMA4: FamilySpec = FamilySpec {
    family: Family::Gemma4,
    model_type: "gemma4_text",
    causal_lm_class: "Gemma4ForCausalLM",
    summary: "Gemma 3 blocks with w norms, unscaled scores, value norm, full layers with their own head size \
              and proportional RoPE, keys as values, KV shared by the last layers (double-wide MLPs there), \
              per-layer inputs, layer scalars, MoE beside the dense MLP (26B-A4B); inside `gemma4` wrappers",
    norms: NormPlacement::GEMMA_SANDWICH,
    qk_norm: QkNorm::PerHead,
    gemma_conventions: true,
    unit_attention_scale: true,
    value_norm: true,
    heterogeneous_layers: true,
    default_per_layer_input: 256,
    default_rope_parameters: Some(
        r#"{"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}"#,
    ),
    tied_by_default: true,
    layer_pattern: LayerPattern::EveryNthGlobal(6),
    rope: RopeRule::PerLayerType,
    moe: Some(MoeLayout::Gemma4),
    default_rope_theta: 1_000_000.0,
    ..LLAMA
};

/// Every supported family, one row each.
pub const FAMILIES: &[FamilySpec] = &[
    LLAMA,
    FamilySpec {
        family: Family::Mistral,
        model_type: "mistral",
        causal_lm_class: "MistralForCausalLM",
        summary: "Llama blocks, sliding window on every layer",
        window: WindowRule::EveryLayer,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Ministral3,
        model_type: "ministral3",
        causal_lm_class: "Ministral3ForCausalLM",
        summary:
            "Mistral blocks, YaRN, position-dependent query scale (llama_4_scaling_beta); inside `mistral3` wrappers",
        window: WindowRule::EveryLayer,
        position_query_scale: true,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Qwen2,
        model_type: "qwen2",
        causal_lm_class: "Qwen2ForCausalLM",
        summary: "q/k/v bias",
        qkv_bias: BiasRule::Always,
        o_bias: BiasRule::Never,
        window: WindowRule::Qwen,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Qwen3,
        model_type: "qwen3",
        causal_lm_class: "Qwen3ForCausalLM",
        summary: "per-head q/k norm",
        qk_norm: QkNorm::PerHead,
        window: WindowRule::Qwen,
        ..LLAMA
    },
    QWEN3_5,
    FamilySpec {
        family: Family::Qwen3_5Moe,
        model_type: "qwen3_5_moe_text",
        causal_lm_class: "Qwen3_5MoeForCausalLM",
        summary: "qwen3_5_text's layers with a sparse MoE in every layer (softmax top-k renormalised, a shared \
                  expert behind a sigmoid gate)",
        moe: Some(MoeLayout::GatedShared),
        ..QWEN3_5
    },
    FamilySpec {
        family: Family::Qwen3Next,
        peft_fused_moe: Some(QWEN2_MOE_FUSED),
        model_type: "qwen3_next",
        causal_lm_class: "Qwen3NextForCausalLM",
        summary: "Qwen3-Next: qwen3_5_moe_text's design with Gated DeltaNet's projections fused per key head \
                  (`in_proj_qkvz`, `in_proj_ba`), dense layers by `mlp_only_layers`/`decoder_sparse_step`",
        linear_attention: Some(LinearAttentionConfig {
            grouped_projections: true,
            ..QWEN3_5_LINEAR
        }),
        moe: Some(MoeLayout::GatedShared),
        ..QWEN3_5
    },
    FamilySpec {
        family: Family::Gemma,
        model_type: "gemma",
        causal_lm_class: "GemmaForCausalLM",
        summary: "(1 + w) norms, √hidden embedding scale, GeLU-tanh, MQA",
        gemma_conventions: true,
        norm_weight_offset: true,
        tied_by_default: true,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Gemma2,
        model_type: "gemma2",
        causal_lm_class: "Gemma2ForCausalLM",
        summary: "Gemma + soft-caps, sandwich norms, query_pre_attn_scalar, alternating sliding/global layers",
        norms: NormPlacement::GEMMA_SANDWICH,
        gemma_conventions: true,
        norm_weight_offset: true,
        query_pre_attn_scalar: true,
        tied_by_default: true,
        layer_pattern: LayerPattern::EveryNthGlobal(2),
        default_softcaps: Some((50.0, 30.0)),
        ..LLAMA
    },
    FamilySpec {
        family: Family::Gemma3,
        model_type: "gemma3_text",
        causal_lm_class: "Gemma3ForCausalLM",
        summary: "Gemma 2 without soft-caps, per-head q/k norm, per-layer-type RoPE; inside `gemma3` wrappers",
        norms: NormPlacement::GEMMA_SANDWICH,
        qk_norm: QkNorm::PerHead,
        gemma_conventions: true,
        norm_weight_offset: true,
        query_pre_attn_scalar: true,
        tied_by_default: true,
        layer_pattern: LayerPattern::SlidingWindowPatternKey(6),
        rope: RopeRule::PerLayerType,
        default_rope_theta: 1_000_000.0,
        ..LLAMA
    },
    GEMMA4,
    FamilySpec {
        family: Family::Gemma4Unified,
        model_type: "gemma4_unified_text",
        causal_lm_class: "Gemma4UnifiedForCausalLM",
        summary: "Gemma 4 without per-layer inputs and MoE; inside `gemma4_unified` wrappers",
        moe: None,
        default_per_layer_input: 0,
        ..GEMMA4
    },
    FamilySpec {
        family: Family::Phi3,
        model_type: "phi3",
        causal_lm_class: "Phi3ForCausalLM",
        summary: "fused qkv_proj and gate_up_proj, partial rotary, LongRoPE",
        qkv_bias: BiasRule::Never,
        o_bias: BiasRule::Never,
        fused_qkv: true,
        fused_gate_up: true,
        window: WindowRule::EveryLayer,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Olmo2,
        model_type: "olmo2",
        causal_lm_class: "Olmo2ForCausalLM",
        summary: "post-norm blocks, q/k norm over the full projection",
        norms: NormPlacement::POST,
        qk_norm: QkNorm::Full,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Olmo3,
        model_type: "olmo3",
        causal_lm_class: "Olmo3ForCausalLM",
        summary: "OLMo 2 + sliding-window layers (every 4th global), per-layer-type RoPE",
        norms: NormPlacement::POST,
        qk_norm: QkNorm::Full,
        layer_pattern: LayerPattern::EveryNthGlobal(4),
        rope: RopeRule::PerLayerType,
        default_rope_theta: 500_000.0,
        ..LLAMA
    },
    FamilySpec {
        family: Family::SmolLm3,
        model_type: "smollm3",
        causal_lm_class: "SmolLM3ForCausalLM",
        summary: "Llama blocks without RoPE on every 4th layer (no_rope_layers), tied",
        tied_by_default: true,
        window: WindowRule::WhenEnabled,
        nope_layers: true,
        default_rope_theta: 2_000_000.0,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Glm4,
        model_type: "glm4",
        causal_lm_class: "Glm4ForCausalLM",
        summary: "fused gate_up_proj, interleaved partial rotary, sandwich norms",
        norms: NormPlacement::GLM_SANDWICH,
        o_bias: BiasRule::Never,
        fused_gate_up: true,
        interleaved_rope: true,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Llama4,
        model_type: "llama4_text",
        causal_lm_class: "Llama4ForCausalLM",
        summary: "chunked attention on RoPE layers, RoPE-free layers with temperature tuning, L2 q/k norm, \
                  interleaved RoPE, top-1 sigmoid MoE scaling the expert input + shared expert, dense/MoE interleaved",
        qk_norm: QkNorm::L2AfterRope,
        qk_norm_switch: Some(true),
        interleaved_rope: true,
        layer_pattern: LayerPattern::ChunkedRopeLayers,
        moe: Some(MoeLayout::Llama4),
        nope_layers: true,
        temperature_tuning: true,
        mlp_module: "feed_forward",
        default_rope_theta: 500_000.0,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Mixtral,
        peft_fused_moe: Some(MIXTRAL_FUSED),
        model_type: "mixtral",
        causal_lm_class: "MixtralForCausalLM",
        summary: "sparse MoE, softmax-top-k renormalised",
        window: WindowRule::EveryLayer,
        moe: Some(MoeLayout::Mixtral),
        default_rope_theta: 1_000_000.0,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Qwen3Moe,
        peft_fused_moe: Some(QWEN2_MOE_FUSED),
        model_type: "qwen3_moe",
        causal_lm_class: "Qwen3MoeForCausalLM",
        summary: "sparse MoE, per-head q/k norm",
        qk_norm: QkNorm::PerHead,
        window: WindowRule::Qwen,
        moe: Some(MoeLayout::Qwen),
        ..LLAMA
    },
    FamilySpec {
        family: Family::Glm4Moe,
        peft_fused_moe: Some(QWEN2_MOE_FUSED),
        model_type: "glm4_moe",
        causal_lm_class: "Glm4MoeForCausalLM",
        summary: "sparse MoE with group-limited sigmoid routing (correction bias, routed scaling) and shared \
                  experts, dense first layers, q/k/v bias, optional per-head q/k norm, partial rotary",
        qk_norm: QkNorm::PerHead,
        qk_norm_switch: Some(false),
        o_bias: BiasRule::Never,
        moe: Some(MoeLayout::DeepSeek),
        group_routing: Some(GroupRoutingDefaults {
            scaling: 1.0,
            first_dense: 1,
            ..SIGMOID_GROUPS
        }),
        default_partial_rotary: 0.5,
        trailing_mtp_layers: true,
        ..LLAMA
    },
    FamilySpec {
        family: Family::DeepseekV3,
        peft_fused_moe: Some(QWEN2_MOE_FUSED),
        model_type: "deepseek_v3",
        causal_lm_class: "DeepseekV3ForCausalLM",
        summary: "multi-head latent attention (low-rank q, key/value latent cached, one shared RoPE key, \
                  interleaved pairs, YaRN mscale² on the scores) and DeepSeek MoE as glm4_moe's",
        moe: Some(MoeLayout::DeepSeek),
        group_routing: Some(GroupRoutingDefaults {
            groups: 8,
            top_groups: 4,
            scaling: 2.5,
            first_dense: 3,
            ..SIGMOID_GROUPS
        }),
        latent_attention: Some(LatentDefaults {
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            nope_dim: 128,
            rope_dim: 64,
            v_dim: 128,
        }),
        trailing_mtp_layers: true,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Glm4MoeLite,
        peft_fused_moe: Some(QWEN2_MOE_FUSED),
        model_type: "glm4_moe_lite",
        causal_lm_class: "Glm4MoeLiteForCausalLM",
        summary: "GLM-4.7-Flash: deepseek_v3's latent attention and MoE, sparse layers by `mlp_layer_types`",
        moe: Some(MoeLayout::DeepSeek),
        group_routing: Some(GroupRoutingDefaults {
            scaling: 1.8,
            first_dense: 1,
            ..SIGMOID_GROUPS
        }),
        latent_attention: Some(GLM_LATENT),
        trailing_mtp_layers: true,
        ..LLAMA
    },
    FamilySpec {
        family: Family::GlmMoeDsa,
        peft_fused_moe: Some(QWEN2_MOE_FUSED),
        model_type: "glm_moe_dsa",
        causal_lm_class: "GlmMoeDsaForCausalLM",
        summary: "GLM-5: glm4_moe_lite's blocks with DeepSeek sparse attention; its indexer keeps every key up \
                  to `index_topk` positions (exact there, longer refused; indexer weights not loaded)",
        moe: Some(MoeLayout::DeepSeek),
        group_routing: Some(GroupRoutingDefaults {
            scaling: 2.5,
            first_dense: 3,
            ..SIGMOID_GROUPS
        }),
        latent_attention: Some(LatentDefaults {
            q_lora_rank: Some(2048),
            ..GLM_LATENT
        }),
        sparse_attention_indexer: true,
        interleaved_rope: true,
        trailing_mtp_layers: true,
        ..LLAMA
    },
    FamilySpec {
        family: Family::Mistral4,
        model_type: "mistral4",
        causal_lm_class: "Mistral4ForCausalLM",
        summary: "Mistral Small 4: latent attention, YaRN and a position-dependent query scale \
                  (llama_4_scaling_beta), softmax group-limited routing without correction bias, shared experts",
        moe: Some(MoeLayout::DeepSeek),
        group_routing: Some(GroupRoutingDefaults {
            scores: GroupScores::Softmax,
            scaling: 1.0,
            first_dense: 0,
            ..SIGMOID_GROUPS
        }),
        latent_attention: Some(LatentDefaults {
            q_lora_rank: Some(1024),
            kv_lora_rank: 256,
            nope_dim: 64,
            rope_dim: 64,
            v_dim: 128,
        }),
        position_query_scale: true,
        default_rope_parameters: Some(
            r#"{"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}"#,
        ),
        ..LLAMA
    },
    FamilySpec {
        family: Family::GptOss,
        model_type: "gpt_oss",
        causal_lm_class: "GptOssForCausalLM",
        summary: "sparse MoE top-k-softmax, attention sinks, clamped SwiGLU, YaRN, alternating sliding/global",
        layer_pattern: LayerPattern::EveryNthGlobal(2),
        attn_sinks: true,
        moe: Some(MoeLayout::GptOss),
        default_rope_theta: 150_000.0,
        ..LLAMA
    },
];

impl FamilySpec {
    /// The row of `model_type`, if Ember implements it.
    pub fn of(model_type: &str) -> Option<&'static FamilySpec> {
        FAMILIES.iter().find(|f| f.model_type == model_type)
    }

    /// The row of `family`.
    pub fn get(family: Family) -> &'static FamilySpec {
        FAMILIES
            .iter()
            .find(|f| f.family == family)
            .expect("every family has a row")
    }
}

/// Every supported `model_type`, comma-separated (for error messages and `--help`).
pub fn supported_model_types() -> String {
    let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.model_type).collect();
    names.extend(WRAPPERS.iter().map(|w| w.model_type));
    names.join(", ")
}

/// A multimodal wrapper: a text decoder under `text_config`, with vision (or audio) towers
/// Ember ignores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrapperSpec {
    /// The wrapper's `model_type`.
    pub model_type: &'static str,
    /// transformers' class.
    pub class: &'static str,
    /// The text decoder's `model_type` when `text_config` does not name one.
    pub default_text_model_type: &'static str,
    /// transformers' default of the wrapper's `tie_word_embeddings` (the wrapper's key decides).
    pub tied_by_default: bool,
    /// Keys naming multimodal placeholder tokens whose positions read the padding token
    /// instead when no image or audio fills them (Gemma 4 wrappers).
    pub placeholder_token_keys: &'static [&'static str],
}

/// The multimodal wrappers whose text decoder Ember loads.
pub const WRAPPERS: &[WrapperSpec] = &[
    WrapperSpec {
        model_type: "mistral3",
        class: "Mistral3ForConditionalGeneration",
        default_text_model_type: "mistral",
        tied_by_default: true,
        placeholder_token_keys: &[],
    },
    WrapperSpec {
        model_type: "llama4",
        class: "Llama4ForConditionalGeneration",
        default_text_model_type: "llama4_text",
        tied_by_default: false,
        placeholder_token_keys: &[],
    },
    WrapperSpec {
        model_type: "gemma3",
        class: "Gemma3ForConditionalGeneration",
        default_text_model_type: "gemma3_text",
        tied_by_default: true,
        placeholder_token_keys: &[],
    },
    WrapperSpec {
        model_type: "gemma4",
        class: "Gemma4ForConditionalGeneration",
        default_text_model_type: "gemma4_text",
        tied_by_default: true,
        placeholder_token_keys: &["image_token_id", "video_token_id", "audio_token_id"],
    },
    WrapperSpec {
        model_type: "gemma4_unified",
        class: "Gemma4UnifiedForConditionalGeneration",
        default_text_model_type: "gemma4_unified_text",
        tied_by_default: true,
        placeholder_token_keys: &["image_token_id", "video_token_id", "audio_token_id"],
    },
    WrapperSpec {
        model_type: "qwen3_5",
        class: "Qwen3_5ForConditionalGeneration",
        default_text_model_type: "qwen3_5_text",
        tied_by_default: false,
        placeholder_token_keys: &[],
    },
    WrapperSpec {
        model_type: "qwen3_5_moe",
        class: "Qwen3_5MoeForConditionalGeneration",
        default_text_model_type: "qwen3_5_moe_text",
        tied_by_default: false,
        placeholder_token_keys: &[],
    },
];

impl WrapperSpec {
    /// The row of `model_type`, if it is a wrapper Ember reads.
    pub fn of(model_type: &str) -> Option<&'static WrapperSpec> {
        WRAPPERS.iter().find(|w| w.model_type == model_type)
    }
}

/// Where the text decoder's modules live: under `model.` in a text-only checkpoint, under
/// `model.language_model.` in a wrapper (transformers 5 module names, which PEFT adapters
/// use), and in a wrapper checkpoint saved in the older layout under `language_model.model.`
/// (what transformers 5 still writes for Mistral 3 and Gemma 3, and what their hub files hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleNames {
    /// Module path of the decoder body: `model` or `model.language_model`.
    pub decoder: String,
    /// The same in the checkpoint's keys: `model`, `model.language_model` or `language_model.model`.
    pub checkpoint_decoder: String,
    /// The output head's key stem in the checkpoint: `lm_head` or `language_model.lm_head`.
    pub checkpoint_lm_head: String,
    /// Whether the model sits in a multimodal wrapper (other components are ignored).
    pub wrapped: bool,
}

impl ModuleNames {
    /// A text-only checkpoint.
    pub fn text_only() -> Self {
        Self {
            decoder: "model".into(),
            checkpoint_decoder: "model".into(),
            checkpoint_lm_head: "lm_head".into(),
            wrapped: false,
        }
    }

    /// The names of a wrapper checkpoint holding `keys`: the older `language_model.model.`
    /// layout when any key uses it, else transformers 5's `model.language_model.`.
    pub fn wrapped<'a>(mut keys: impl Iterator<Item = &'a str>) -> Self {
        let legacy = keys.any(|k| k.starts_with("language_model."));
        Self {
            decoder: "model.language_model".into(),
            checkpoint_decoder: if legacy {
                "language_model.model"
            } else {
                "model.language_model"
            }
            .into(),
            checkpoint_lm_head: if legacy { "language_model.lm_head" } else { "lm_head" }.into(),
            wrapped: true,
        }
    }

    /// The checkpoint key stem of a module path (`model.language_model.layers.0.self_attn.q_proj`
    /// → `language_model.model.layers.0.self_attn.q_proj` in the older wrapper layout); other
    /// wrapper components (`model.vision_tower.…`) lose the `model.` of the older layout.
    pub fn checkpoint_key(&self, module: &str) -> String {
        if let Some(rest) = module
            .strip_prefix(&self.decoder)
            .filter(|r| r.is_empty() || r.starts_with('.'))
        {
            return format!("{}{rest}", self.checkpoint_decoder);
        }
        if let Some(rest) = module
            .strip_prefix("lm_head")
            .filter(|r| r.is_empty() || r.starts_with('.'))
        {
            return format!("{}{rest}", self.checkpoint_lm_head);
        }
        if self.wrapped && self.checkpoint_decoder.starts_with("language_model") {
            if let Some(rest) = module.strip_prefix("model.") {
                return rest.to_string();
            }
        }
        module.to_string()
    }

    /// Whether a module path belongs to the text decoder or its head (not a vision or audio
    /// tower, projector or multi-token-prediction layer).
    pub fn is_text_module(&self, module: &str) -> bool {
        let under = |prefix: &str| module == prefix || module.starts_with(&format!("{prefix}."));
        under(&self.decoder) || under("lm_head")
    }

    /// The names of a checkpoint whose config is `config` and which holds `keys`.
    pub fn for_checkpoint<'a>(config: &crate::config::DecoderConfig, keys: impl Iterator<Item = &'a str>) -> Self {
        if config.wrapper.is_some() {
            Self::wrapped(keys)
        } else {
            Self::text_only()
        }
    }

    /// The checkpoint's components Ember does not load, with their tensor counts: a wrapper's
    /// vision/audio towers and projectors (`vision_tower`, `model.multi_modal_projector`, ...)
    /// and, in any checkpoint, multi-token-prediction layers (`mtp.*`, used for speculative
    /// decoding, not by the causal LM).
    pub fn ignored_components<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Vec<(String, usize)> {
        let mut out: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for key in keys.filter(|k| self.is_ignored_key(k)) {
            let parts: Vec<&str> = key.split('.').collect();
            let take = if parts[0] == "model" && parts.len() > 2 { 2 } else { 1 };
            *out.entry(parts[..take].join(".")).or_default() += 1;
        }
        out.into_iter().collect()
    }

    /// Whether the loader skips a checkpoint key: outside a wrapper's text decoder, or part of
    /// multi-token-prediction layers (`mtp.`, `model.mtp.`, `model.language_model.mtp.`).
    pub fn is_ignored_key(&self, key: &str) -> bool {
        let mtp = key.starts_with("mtp.")
            || key.starts_with(&format!("{}.mtp.", self.checkpoint_decoder))
            || key.starts_with("model.mtp.");
        mtp || (self.wrapped && !self.is_text_key(key))
    }

    /// Whether a checkpoint key belongs to the text decoder or its head.
    pub fn is_text_key(&self, key: &str) -> bool {
        let under = |prefix: &str| key.starts_with(&format!("{prefix}."));
        under(&self.checkpoint_decoder) || under(&self.checkpoint_lm_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_type_has_one_row() {
        for (i, a) in FAMILIES.iter().enumerate() {
            for b in &FAMILIES[i + 1..] {
                assert_ne!(a.model_type, b.model_type);
                assert_ne!(a.family, b.family);
            }
            assert_eq!(FamilySpec::get(a.family).model_type, a.model_type);
            // Group-limited routing is the DeepSeek layout's, and only its.
            assert_eq!(
                a.group_routing.is_some(),
                a.moe == Some(MoeLayout::DeepSeek),
                "{}",
                a.model_type
            );
            assert!(!a.sparse_attention_indexer || a.latent_attention.is_some());
        }
    }

    #[test]
    fn wrapper_names_map_both_layouts() {
        let legacy = ModuleNames::wrapped(["language_model.model.norm.weight"].into_iter());
        assert_eq!(
            legacy.checkpoint_key("model.language_model.layers.0.self_attn.q_proj"),
            "language_model.model.layers.0.self_attn.q_proj"
        );
        assert_eq!(legacy.checkpoint_key("lm_head"), "language_model.lm_head");
        assert_eq!(legacy.checkpoint_key("model.vision_tower.x"), "vision_tower.x");
        let v5 = ModuleNames::wrapped(["model.language_model.norm.weight"].into_iter());
        assert_eq!(
            v5.checkpoint_key("model.language_model.layers.0.mlp.up_proj"),
            "model.language_model.layers.0.mlp.up_proj"
        );
        assert_eq!(v5.checkpoint_key("lm_head"), "lm_head");
        assert!(v5.is_text_module("model.language_model.layers.1.mlp.up_proj"));
        assert!(!v5.is_text_module("model.vision_tower.transformer.layers.0.attention.q_proj"));
        assert!(!v5.is_text_module("model.language_model_x"));
        let text = ModuleNames::text_only();
        assert!(text.is_ignored_key("mtp.layers.0.eh_proj.weight"));
        assert!(text.is_ignored_key("model.mtp.norm.weight"));
        assert!(!text.is_ignored_key("model.layers.0.mlp.up_proj.weight"));
        assert!(v5.is_ignored_key("model.language_model.mtp.fc.weight"));
        assert!(v5.is_ignored_key("model.vision_tower.x.weight"));
        assert_eq!(
            text.ignored_components(["mtp.a", "mtp.b", "model.norm.weight"].into_iter()),
            vec![("mtp".to_string(), 2)]
        );
        let text = ModuleNames::text_only();
        assert_eq!(
            text.checkpoint_key("model.layers.0.mlp.up_proj"),
            "model.layers.0.mlp.up_proj"
        );
    }
}
