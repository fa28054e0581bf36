//! The decoder-only transformer: one forward pass for every supported family, steered by the
//! typed flags of [`DecoderConfig`]. [`CausalLm::load`] maps HF checkpoint keys
//! (`model.layers.3.self_attn.q_proj`) onto the fields.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};
use ember_lora::EmberBackend;
use ember_lora::{attention, AttentionSpec, FrozenWeight, LoraLinear};

use crate::config::{Activation, DecoderConfig, MoeLayout, QkNorm, QueryScale};
use crate::dtype::BaseDtype;
use crate::error::{ModelError, Result};
use crate::family::ModuleNames;
use crate::linear_attention::{DeltaNetInputs, GatedDeltaNet, GroupedInputs, RecurrentState, SplitInputs};
use crate::moe::SparseMoe;
use crate::rope::{RopeFrequencies, RopeTables};
use crate::weights::Weights;

/// The value added to masked attention scores (transformers uses the dtype's minimum).
const MASK_VALUE: f32 = f32::MIN;

/// Token embedding table (`embed_tokens`).
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]` (quantized under `base_dtype: gguf`).
    pub weight: FrozenWeight<B>,
}

impl<B: EmberBackend> Embedding<B> {
    /// Looks up token rows.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        // Always f32 rows: the residual stream is f32 whatever the table's storage.
        self.weight.rows(ids)
    }
}

/// Root-mean-square layer norm, `x / √(mean(x²) + ε) · w`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`.
    pub weight: Param<Tensor<B, 1>>,
    /// ε.
    pub eps: f64,
}

impl<B: EmberBackend> RmsNorm<B> {
    /// Normalises over the last dimension.
    ///
    /// # Shapes
    /// - `x`: `[..., dim]`
    /// - output: same as `x`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        ember_lora::fused::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// Separate query, key and value projections.
#[derive(Module, Debug)]
pub struct SplitQkv<B: Backend> {
    /// `[heads·head_dim, hidden]`.
    pub q_proj: LoraLinear<B>,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: LoraLinear<B>,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: LoraLinear<B>,
}

/// Query and key projections whose key output is also the values (Gemma 4's
/// `attention_k_eq_v` on full-attention layers).
#[derive(Module, Debug)]
pub struct KeysAsValues<B: Backend> {
    /// `[heads·head_dim, hidden]`.
    pub q_proj: LoraLinear<B>,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: LoraLinear<B>,
}

/// How queries, keys and values are projected.
// One per layer; boxing would buy nothing and burn modules do not derive through Box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum QkvProjection<B: Backend> {
    /// `q_proj`, `k_proj`, `v_proj`.
    Split(SplitQkv<B>),
    /// One `qkv_proj`, rows `[q; k; v]` (Phi-3); LoRA adapts it as one matrix, as PEFT does.
    Fused(LoraLinear<B>),
    /// `q_proj` and `k_proj`; the values are the key projection before its norm and RoPE.
    KeysAsValues(KeysAsValues<B>),
    /// `q_proj` only: keys and values come from an earlier layer (Gemma 4's KV sharing).
    QueryOnly(LoraLinear<B>),
}

/// Multi-head attention with grouped key/value heads (`self_attn`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// The q/k/v projections.
    pub qkv: QkvProjection<B>,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: LoraLinear<B>,
    /// RMS norm of queries (per head or over the projection, see `qk_norm`).
    pub q_norm: Option<RmsNorm<B>>,
    /// RMS norm of keys.
    pub k_norm: Option<RmsNorm<B>>,
    /// Per-head sink logits, `[heads]` (gpt-oss).
    pub sinks: Option<Param<Tensor<B, 1>>>,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Where `q_norm`/`k_norm` apply.
    #[module(skip)]
    pub qk_norm: QkNorm,
    /// Multiplier of `q·kᵀ`.
    #[module(skip)]
    pub scale: f64,
    /// Soft-cap of the scores (Gemma 2).
    #[module(skip)]
    pub softcap: Option<f64>,
    /// ε of the weightless L2 q/k norm (Llama 4) and of the value norm (Gemma 4).
    #[module(skip)]
    pub norm_eps: f64,
    /// Weightless RMS norm of each value head (Gemma 4).
    #[module(skip)]
    pub value_norm: bool,
    /// `q_proj` also yields a per-head output gate (`[query | gate]` per head); the output is
    /// multiplied by its sigmoid (Qwen 3.5's full-attention layers).
    #[module(skip)]
    pub output_gate: bool,
    /// Attention's products in bf16 on the CPU's AMX tiles (a bf16 base held on the host; see
    /// [`AttentionSpec::bf16_products`]).
    #[module(skip)]
    pub bf16_products: bool,
}

/// What a layer's attention needs besides its input: positions as RoPE tables and query
/// scales, and the mask.
#[derive(Debug, Clone)]
pub struct AttentionInputs<'a, B: Backend> {
    /// The cos/sin tables of this layer; `None` for RoPE-free layers (SmolLM3).
    pub rope: Option<&'a RopeTables<B>>,
    /// Per-position query multipliers, `[batch, 1, seq, 1]` (Ministral 3).
    pub query_scale: Option<&'a Tensor<B, 4>>,
    /// Additive mask, `[batch, 1, seq, past + seq]`.
    pub mask: Tensor<B, 4>,
    /// Keys and values of the layer this one shares them with (Gemma 4's KV-shared layers),
    /// cache included, `[batch, kv_heads, past + seq, head_dim]` each.
    pub shared_kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// The new positions' padding, 1 real and 0 pad, `[batch, seq]` (linear attention zeroes
    /// padded inputs; `None` without padding).
    pub padding: Option<Tensor<B, 2>>,
    /// Packed rows, for linear attention (whose state must not run from one sample into the
    /// next): per row, the position ranges of its runs of equal segment id, in order; `None`
    /// when no row holds more than one run.
    pub packed_runs: Option<&'a [Vec<std::ops::Range<usize>>]>,
}

/// What one layer keeps between decoding steps; one variant per attention kind.
#[derive(Debug, Clone)]
pub enum LayerCache<B: Backend> {
    /// Keys and values after RoPE, before head repetition, `[batch, kv_heads, len, head_dim]`.
    KeyValue {
        /// Keys.
        keys: Tensor<B, 4>,
        /// Values.
        values: Tensor<B, 4>,
    },
    /// Nothing of its own: the layer attends over another layer's keys and values (Gemma 4's
    /// KV-shared layers).
    Shared,
    /// Multi-head latent attention: the normed key/value latent `[batch, len, kv_lora_rank]`
    /// and the shared RoPE key after RoPE `[batch, 1, len, rope_dim]` (keys and values are
    /// expanded from them at each step).
    Latent {
        /// The latent.
        latent: Tensor<B, 3>,
        /// The RoPE key.
        rope_keys: Tensor<B, 4>,
    },
    /// Linear attention: the convolution's last inputs and the delta-rule state (Qwen 3.5).
    Recurrent(RecurrentState<B>),
}

impl<B: Backend> LayerCache<B> {
    /// Keeps the first `len` positions (a scoring pass that continues from a shorter prefix);
    /// `None` for a recurrent state, which cannot be rewound (run the prefix again).
    pub fn truncate(self, len: usize) -> Option<Self> {
        match self {
            LayerCache::KeyValue { keys, values } => Some(LayerCache::KeyValue {
                keys: keys.narrow(2, 0, len),
                values: values.narrow(2, 0, len),
            }),
            LayerCache::Shared => Some(LayerCache::Shared),
            LayerCache::Latent { latent, rope_keys } => Some(LayerCache::Latent {
                latent: latent.narrow(1, 0, len),
                rope_keys: rope_keys.narrow(2, 0, len),
            }),
            LayerCache::Recurrent(_) => None,
        }
    }
}

/// A layer's token mixer; one variant per attention kind (part 2 of the 2026 families adds
/// latent and linear attention beside it).
// One per layer; boxing would buy nothing and burn modules do not derive through Box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum SelfAttention<B: Backend> {
    /// Softmax attention with grouped key/value heads and a key/value cache.
    Grouped(Attention<B>),
    /// Multi-head latent attention (DeepSeek-V3) with a latent cache.
    Latent(LatentAttention<B>),
    /// Gated delta-rule linear attention (Qwen 3.5) with a recurrent state (`linear_attn`).
    Linear(GatedDeltaNet<B>),
}

/// MLA's query projection.
// One per layer; boxing would buy nothing and burn modules do not derive through Box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum LatentQuery<B: Backend> {
    /// One `q_proj`, `[heads·(nope + rope), hidden]`.
    Direct(LoraLinear<B>),
    /// `q_b_proj(norm(q_a_proj(x)))`.
    LowRank(LowRankQuery<B>),
}

/// A query bottleneck: `q_a_proj` `[rank, hidden]`, `q_a_layernorm`, `q_b_proj`
/// `[heads·(nope + rope), rank]`.
#[derive(Module, Debug)]
pub struct LowRankQuery<B: Backend> {
    /// Down-projection.
    pub q_a_proj: LoraLinear<B>,
    /// Norm of the bottleneck.
    pub q_a_layernorm: RmsNorm<B>,
    /// Up-projection.
    pub q_b_proj: LoraLinear<B>,
}

/// Multi-head latent attention (`self_attn` of DeepSeek-V3): keys and values are expanded per
/// head from a normed latent (`kv_b_proj`), plus one RoPE key all heads share; the cache keeps
/// the latent and the RoPE key only.
#[derive(Module, Debug)]
pub struct LatentAttention<B: Backend> {
    /// Query projection.
    pub query: LatentQuery<B>,
    /// `[kv_lora_rank + rope, hidden]`: the latent and the RoPE key.
    pub kv_a_proj_with_mqa: LoraLinear<B>,
    /// Norm of the latent.
    pub kv_a_layernorm: RmsNorm<B>,
    /// `[heads·(nope + v), kv_lora_rank]`: per-head keys (without RoPE) and values.
    pub kv_b_proj: LoraLinear<B>,
    /// `[hidden, heads·v]`.
    pub o_proj: LoraLinear<B>,
    /// Number of heads.
    pub num_heads: usize,
    /// Rank of the latent.
    pub kv_lora_rank: usize,
    /// Per-head key/query width without RoPE.
    pub nope_dim: usize,
    /// Width of the RoPE part.
    pub rope_dim: usize,
    /// Per-head value width.
    pub v_dim: usize,
    /// Multiplier of `q·kᵀ`.
    #[module(skip)]
    pub scale: f64,
    /// GLM-5's sparse attention keeps every key up to this many (`index_topk`); more are
    /// refused ([`DecoderConfig::check_sequence_length`] says so before a run starts).
    #[module(skip)]
    pub max_keys: Option<usize>,
    /// Attention's products in bf16 on the CPU's AMX tiles (a bf16 base held on the host; see
    /// [`AttentionSpec::bf16_products`]).
    #[module(skip)]
    pub bf16_products: bool,
}

impl<B: EmberBackend> LatentAttention<B> {
    /// Attends over the cached latent plus the new positions; returns the output and the
    /// extended latent and RoPE key.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `inputs.mask`: additive, `[batch, 1, seq, past + seq]`
    /// - `cache`: latent `[batch, past, kv_lora_rank]`, RoPE key `[batch, 1, past, rope_dim]`
    /// - output: `[batch, seq, hidden]`, and the cache with `past + seq` positions
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<'_, B>,
        cache: Option<(Tensor<B, 3>, Tensor<B, 4>)>,
    ) -> (Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 4>)) {
        let [batch, seq, _] = x.dims();
        let (heads, nope, rope, v_dim, rank) = (
            self.num_heads,
            self.nope_dim,
            self.rope_dim,
            self.v_dim,
            self.kv_lora_rank,
        );
        let q = match &self.query {
            LatentQuery::Direct(q_proj) => q_proj.forward(x.clone()),
            LatentQuery::LowRank(p) => p
                .q_b_proj
                .forward(p.q_a_layernorm.forward(p.q_a_proj.forward(x.clone()))),
        };
        let q = q.reshape([batch, seq, heads, nope + rope]).swap_dims(1, 2);
        let q_nope = q.clone().narrow(3, 0, nope);
        let mut q_rope = q.narrow(3, nope, rope);
        let compressed = self.kv_a_proj_with_mqa.forward(x);
        let mut latent = self.kv_a_layernorm.forward(compressed.clone().narrow(2, 0, rank));
        let mut rope_keys = compressed.narrow(2, rank, rope).reshape([batch, 1, seq, rope]);
        if let Some(tables) = inputs.rope {
            q_rope = tables.apply(q_rope);
            rope_keys = tables.apply(rope_keys);
        }
        if let Some((past_latent, past_rope)) = cache {
            latent = Tensor::cat(vec![past_latent, latent], 1);
            rope_keys = Tensor::cat(vec![past_rope, rope_keys], 2);
        }
        let keys_len = latent.dims()[1];
        if let Some(limit) = self.max_keys {
            assert!(
                keys_len <= limit,
                "{keys_len} positions: the sparse-attention indexer keeps only {limit} keys per query \
                 beyond which Ember is not exact (DecoderConfig::check_sequence_length refuses this earlier)"
            );
        }
        let kv = self
            .kv_b_proj
            .forward(latent.clone())
            .reshape([batch, keys_len, heads, nope + v_dim])
            .swap_dims(1, 2);
        let k_nope = kv.clone().narrow(3, 0, nope);
        let values = kv.narrow(3, nope, v_dim);
        let keys = Tensor::cat(
            vec![k_nope, rope_keys.clone().expand([batch, heads, keys_len, rope])],
            3,
        );
        let mut q = Tensor::cat(vec![q_nope, q_rope], 3);
        if let Some(scale) = inputs.query_scale {
            q = q * scale.clone();
        }
        let spec = AttentionSpec {
            scale: self.scale as f32,
            softcap: None,
            causal: true,
            bf16_products: self.bf16_products,
        };
        let out = attention(q, keys, values, Some(inputs.mask.clone()), None, spec)
            .swap_dims(1, 2)
            .reshape([batch, seq, heads * v_dim]);
        (self.o_proj.forward(out), (latent, rope_keys))
    }
}

impl<B: EmberBackend> SelfAttention<B> {
    /// Mixes the sequence, continuing from `cache`; returns the output and the new cache.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<'_, B>,
        cache: Option<LayerCache<B>>,
    ) -> (Tensor<B, 3>, LayerCache<B>) {
        match self {
            SelfAttention::Grouped(attention) => {
                let past = cache.and_then(|c| match c {
                    LayerCache::KeyValue { keys, values } => Some((keys, values)),
                    _ => None,
                });
                let (out, (keys, values)) = attention.forward_cached(x, inputs, past);
                if matches!(attention.qkv, QkvProjection::QueryOnly(_)) {
                    (out, LayerCache::Shared)
                } else {
                    (out, LayerCache::KeyValue { keys, values })
                }
            }
            SelfAttention::Latent(attention) => {
                let past = cache.and_then(|c| match c {
                    LayerCache::Latent { latent, rope_keys } => Some((latent, rope_keys)),
                    _ => None,
                });
                let (out, (latent, rope_keys)) = attention.forward_cached(x, inputs, past);
                (out, LayerCache::Latent { latent, rope_keys })
            }
            SelfAttention::Linear(mixer) => {
                let past = cache.and_then(|c| match c {
                    LayerCache::Recurrent(state) => Some(state),
                    _ => None,
                });
                let (out, state) = match inputs.packed_runs {
                    Some(runs) => {
                        debug_assert!(past.is_none(), "packed rows start from an empty state");
                        mixer.forward_packed(x, inputs.padding.as_ref(), runs)
                    }
                    None => mixer.forward_cached(x, inputs.padding.as_ref(), past),
                };
                (out, LayerCache::Recurrent(state))
            }
        }
    }
}

impl<B: EmberBackend> Attention<B> {
    /// Attends causally over the sequence.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `inputs.mask`: additive, `[batch, 1, seq, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &AttentionInputs<'_, B>) -> Tensor<B, 3> {
        self.forward_cached(x, inputs, None).0
    }

    /// Attends over cached keys/values plus the new positions; returns the output and the
    /// extended cache (keys/values before head repetition).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `inputs.mask`: additive, `[batch, 1, seq, past + seq]`
    /// - `cache`: keys and values `[batch, kv_heads, past, head_dim]`
    /// - output: `[batch, seq, hidden]`, cache `[batch, kv_heads, past + seq, head_dim]`
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<'_, B>,
        cache: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> (Tensor<B, 3>, (Tensor<B, 4>, Tensor<B, 4>)) {
        let [batch, seq, _] = x.dims();
        let (heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let (q, kv) = match &self.qkv {
            QkvProjection::Split(p) => (
                p.q_proj.forward(x.clone()),
                Some((p.k_proj.forward(x.clone()), p.v_proj.forward(x))),
            ),
            QkvProjection::Fused(qkv_proj) => {
                let qkv = qkv_proj.forward(x);
                (
                    qkv.clone().narrow(2, 0, q_width),
                    Some((
                        qkv.clone().narrow(2, q_width, kv_width),
                        qkv.narrow(2, q_width + kv_width, kv_width),
                    )),
                )
            }
            QkvProjection::KeysAsValues(p) => {
                let k = p.k_proj.forward(x.clone());
                (p.q_proj.forward(x), Some((k.clone(), k)))
            }
            QkvProjection::QueryOnly(q_proj) => (q_proj.forward(x), None),
        };
        let (q, gate) = if self.output_gate {
            let both = q.reshape([batch, seq, heads, 2 * head_dim]);
            (
                both.clone().narrow(3, 0, head_dim).reshape([batch, seq, q_width]),
                Some(both.narrow(3, head_dim, head_dim).reshape([batch, seq, q_width])),
            )
        } else {
            (q, None)
        };
        let norm = |t: Tensor<B, 3>, norm: &Option<RmsNorm<B>>, kind: QkNorm| match (norm, kind) {
            (Some(n), QkNorm::Full) => n.forward(t),
            _ => t,
        };
        let norm_heads = |t: Tensor<B, 4>, norm: &Option<RmsNorm<B>>| match (norm, self.qk_norm) {
            (Some(n), QkNorm::PerHead) => n.forward(t),
            _ => t,
        };
        let q = norm(q, &self.q_norm, self.qk_norm).reshape([batch, seq, heads, head_dim]);
        let mut q = norm_heads(q, &self.q_norm).swap_dims(1, 2);
        if let Some(rope) = inputs.rope {
            q = rope.apply(q);
        }
        if self.qk_norm == QkNorm::L2AfterRope {
            q = l2_norm(q, self.norm_eps);
        }
        if let Some(scale) = inputs.query_scale {
            q = q * scale.clone();
        }
        let (k, v) = match kv {
            Some((k, v)) => {
                let k = norm(k, &self.k_norm, self.qk_norm).reshape([batch, seq, kv_heads, head_dim]);
                let mut k = norm_heads(k, &self.k_norm).swap_dims(1, 2);
                if let Some(rope) = inputs.rope {
                    k = rope.apply(k);
                }
                if self.qk_norm == QkNorm::L2AfterRope {
                    k = l2_norm(k, self.norm_eps);
                }
                let mut v = v.reshape([batch, seq, kv_heads, head_dim]);
                if self.value_norm {
                    v = l2_norm(v, self.norm_eps);
                }
                let mut v = v.swap_dims(1, 2);
                if let Some((past_k, past_v)) = cache {
                    k = Tensor::cat(vec![past_k, k], 2);
                    v = Tensor::cat(vec![past_v, v], 2);
                }
                (k, v)
            }
            None => inputs
                .shared_kv
                .clone()
                .expect("a KV-shared layer runs after the layer whose keys and values it reuses"),
        };
        let new_cache = (k.clone(), v.clone());
        let spec = AttentionSpec {
            scale: self.scale as f32,
            softcap: self.softcap.map(|c| c as f32),
            causal: true,
            bf16_products: self.bf16_products,
        };
        // The sink is one more key per head whose probability mass is thrown away.
        let sinks = self.sinks.as_ref().map(|s| s.val());
        let out = attention(q, k, v, Some(inputs.mask.clone()), sinks, spec);
        let mut out = out.swap_dims(1, 2).reshape([batch, seq, q_width]);
        if let Some(gate) = gate {
            out = out * burn::tensor::activation::sigmoid(gate);
        }
        (self.o_proj.forward(out), new_cache)
    }
}

/// RMS norm without a weight, `x / √(mean(x²) + ε)` over the last dimension (Llama 4's L2 norm).
///
/// # Shapes
/// - `x`: `[..., dim]`
/// - output: same as `x`
fn l2_norm<B: EmberBackend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    x * variance.add_scalar(eps).sqrt().recip()
}

/// Separate gate and up projections.
#[derive(Module, Debug)]
pub struct SplitGateUp<B: Backend> {
    /// `[intermediate, hidden]`.
    pub gate_proj: LoraLinear<B>,
    /// `[intermediate, hidden]`.
    pub up_proj: LoraLinear<B>,
}

/// How the gate and up halves of a gated MLP are projected.
// One per layer; boxing would buy nothing and burn modules do not derive through Box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum GateUpProjection<B: Backend> {
    /// `gate_proj` and `up_proj`.
    Split(SplitGateUp<B>),
    /// One `gate_up_proj`, rows `[gate; up]` (Phi-3, GLM 4).
    Fused(LoraLinear<B>),
}

/// The gated feed-forward block (`mlp`): `down(act(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate and up projections.
    pub gate_up: GateUpProjection<B>,
    /// `[hidden, intermediate]`.
    pub down_proj: LoraLinear<B>,
    /// The activation of the gate.
    #[module(skip)]
    pub act: Activation,
}

impl<B: EmberBackend> Mlp<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = match &self.gate_up {
            GateUpProjection::Split(p) => (p.gate_proj.forward(x.clone()), p.up_proj.forward(x)),
            GateUpProjection::Fused(gate_up_proj) => {
                let both = gate_up_proj.forward(x);
                let inter = both.dims()[2] / 2;
                (both.clone().narrow(2, 0, inter), both.narrow(2, inter, inter))
            }
        };
        self.down_proj.forward(gated(gate, up, self.act))
    }
}

/// `act(gate)·up`: one fused op for SiLU (SwiGLU), burn's ops for the GeLUs.
///
/// # Shapes
/// - `gate`, `up`: the same shape; output: that shape
pub(crate) fn gated<B: EmberBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    act: Activation,
) -> Tensor<B, D> {
    match act {
        Activation::Silu => ember_lora::fused::swiglu(gate, up),
        _ => activate(gate, act) * up,
    }
}

/// Applies an MLP activation.
pub(crate) fn activate<B: EmberBackend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
    match act {
        Activation::Silu => silu(x),
        Activation::Gelu => gelu(x),
        Activation::GeluTanh => gelu_tanh(x),
    }
}

/// GeLU with the tanh approximation, as `gelu_pytorch_tanh`.
fn gelu_tanh<B: EmberBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let c = (2.0f64 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(c);
    x.clone().mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
}

/// A dense MLP and a sparse block side by side (Gemma 4 26B-A4B): the MLP reads the normed
/// input, the router the block's un-normed input, the experts their own normed copy of it;
/// each output has its norm before the two are added.
#[derive(Module, Debug)]
pub struct DenseAndSparse<B: Backend> {
    /// The dense MLP (`mlp`).
    pub mlp: Mlp<B>,
    /// Norm of the MLP's output (`post_feedforward_layernorm_1`).
    pub mlp_out_norm: RmsNorm<B>,
    /// Router and experts (`router`, `experts`).
    pub moe: SparseMoe<B>,
    /// Norm of the experts' input (`pre_feedforward_layernorm_2`).
    pub experts_in_norm: RmsNorm<B>,
    /// Norm of the experts' output (`post_feedforward_layernorm_2`).
    pub experts_out_norm: RmsNorm<B>,
}

/// The feed-forward part of a block.
// One per layer; boxing would buy nothing and burn modules do not derive through Box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// A gated MLP.
    Dense(Mlp<B>),
    /// A router and experts.
    Sparse(SparseMoe<B>),
    /// Both, side by side (Gemma 4).
    DenseAndSparse(DenseAndSparse<B>),
}

impl<B: EmberBackend> FeedForward<B> {
    /// Runs the block on `x`, the normed input; `residual` is the block's un-normed input
    /// (read by Gemma 4's router and experts only).
    ///
    /// # Shapes
    /// - `x`, `residual`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x),
            FeedForward::Sparse(moe) => moe.forward(x),
            FeedForward::DenseAndSparse(both) => {
                let dense = both.mlp_out_norm.forward(both.mlp.forward(x));
                let experts_in = both.experts_in_norm.forward(residual.clone());
                let sparse = both.moe.forward_routed(residual, experts_in);
                dense + both.experts_out_norm.forward(sparse)
            }
        }
    }
}

/// Gemma 4's per-layer input, added after the feed-forward block:
/// `x + norm(proj(gelu(gate(x)) · input))`.
#[derive(Module, Debug)]
pub struct PerLayerInputBlock<B: Backend> {
    /// `per_layer_input_gate`, `[width, hidden]`.
    pub gate: LoraLinear<B>,
    /// `per_layer_projection`, `[hidden, width]`.
    pub projection: LoraLinear<B>,
    /// `post_per_layer_input_norm`.
    pub norm: RmsNorm<B>,
    /// The gate's activation.
    #[module(skip)]
    pub act: Activation,
}

impl<B: EmberBackend> PerLayerInputBlock<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `input`: this layer's slice, `[batch, seq, width]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, input: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = gated(self.gate.forward(x.clone()), input, self.act);
        x + self.norm.forward(self.projection.forward(h))
    }
}

/// Gemma 4's per-layer input embeddings (`embed_tokens_per_layer` and
/// `per_layer_model_projection`): every layer's slice of the input.
#[derive(Module, Debug)]
pub struct PerLayerInputEmbedding<B: Backend> {
    /// `embed_tokens_per_layer`, `[vocab, layers·width]`.
    pub embed: Embedding<B>,
    /// `per_layer_model_projection`, `[layers·width, hidden]`.
    pub projection: LoraLinear<B>,
    /// `per_layer_projection_norm`, over `width`.
    pub norm: RmsNorm<B>,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Width of one layer's slice.
    pub width: usize,
}

impl<B: EmberBackend> PerLayerInputEmbedding<B> {
    /// `(norm(proj(embeds) / √hidden) + embed(ids)·√width) / √2`, per layer.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]`
    /// - `embeds`: the scaled token embeddings, `[batch, seq, hidden]`
    /// - output: `[batch, seq, layers, width]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, embeds: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, seq, hidden] = embeds.dims();
        let (layers, width) = (self.num_layers, self.width);
        let token = self
            .embed
            .forward(ids)
            .mul_scalar((width as f64).sqrt() as f32)
            .reshape([batch, seq, layers, width]);
        let context = self
            .projection
            .forward(embeds)
            .mul_scalar((hidden as f64).powf(-0.5) as f32)
            .reshape([batch, seq, layers, width]);
        (self.norm.forward(context) + token).mul_scalar(0.5f64.sqrt() as f32)
    }
}

/// One decoder block; which of its four norms exist depends on the family
/// (see [`crate::config::NormPlacement`]).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub attn_norm: Option<RmsNorm<B>>,
    /// Attention (of the layer's kind).
    pub self_attn: SelfAttention<B>,
    /// Norm of the attention output.
    pub attn_out_norm: Option<RmsNorm<B>>,
    /// Norm before the feed-forward block.
    pub mlp_norm: Option<RmsNorm<B>>,
    /// Feed-forward block.
    pub mlp: FeedForward<B>,
    /// Norm of the feed-forward output.
    pub mlp_out_norm: Option<RmsNorm<B>>,
    /// Sliding window of this layer (`None` = global).
    pub sliding_window: Option<usize>,
    /// Attention chunk of this layer (Llama 4's chunked layers).
    pub attention_chunk: Option<usize>,
    /// The earlier layer whose keys and values this one attends over (Gemma 4's KV sharing).
    pub kv_shared_from: Option<usize>,
    /// Gemma 4's per-layer input block.
    pub per_layer_input: Option<PerLayerInputBlock<B>>,
    /// Gemma 4's output multiplier (the `layer_scalar` buffer: read at load, not a parameter).
    #[module(skip)]
    pub layer_scalar: Option<f32>,
    /// Which RoPE tables the layer uses.
    #[module(skip)]
    pub rope: LayerRope,
}

/// The RoPE a layer applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRope {
    /// The model's (global) RoPE.
    Global,
    /// The sliding-window layers' own RoPE (Gemma 3, OLMo 3).
    Local,
    /// None: the layer has no position embedding (SmolLM3's NoPE layers).
    None,
}

fn norm_opt<B: EmberBackend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match norm {
        Some(norm) => norm.forward(x),
        None => x,
    }
}

impl<B: EmberBackend> DecoderLayer<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `inputs.mask`: additive, `[batch, 1, seq, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &AttentionInputs<'_, B>) -> Tensor<B, 3> {
        self.forward_cached(x, inputs, None, None).0
    }

    /// [`DecoderLayer::forward`] with the layer's cache (see [`SelfAttention::forward_cached`])
    /// and, in Gemma 4, its slice of the per-layer inputs.
    ///
    /// # Shapes
    /// - `per_layer_input`: `[batch, seq, width]`
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        inputs: &AttentionInputs<'_, B>,
        cache: Option<LayerCache<B>>,
        per_layer_input: Option<Tensor<B, 3>>,
    ) -> (Tensor<B, 3>, LayerCache<B>) {
        let h = norm_opt(&self.attn_norm, x.clone());
        let (h, cache) = self.self_attn.forward_cached(h, inputs, cache);
        let x = x + norm_opt(&self.attn_out_norm, h);
        let h = self.mlp.forward(norm_opt(&self.mlp_norm, x.clone()), x.clone());
        let mut x = x + norm_opt(&self.mlp_out_norm, h);
        if let (Some(block), Some(input)) = (&self.per_layer_input, per_layer_input) {
            x = block.forward(x, input);
        }
        if let Some(scalar) = self.layer_scalar {
            x = x.mul_scalar(scalar);
        }
        (x, cache)
    }
}

/// The decoder body (`model.`): embeddings, layers, final norm.
#[derive(Module, Debug)]
pub struct DecoderModel<B: Backend> {
    /// Token embeddings.
    pub embed_tokens: Embedding<B>,
    /// Gemma 4's per-layer input embeddings.
    pub per_layer_inputs: Option<PerLayerInputEmbedding<B>>,
    /// Decoder blocks.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// A batch of token sequences with optional padding mask and positions.
#[derive(Debug, Clone)]
pub struct ModelInput<B: Backend> {
    /// Token ids, `[batch, seq]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 for real tokens, 0 for padding, `[batch, seq]`; `None` = all real.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// Positions for RoPE, `[batch, seq]`; `None` = `0..seq` for every row.
    pub position_ids: Option<Tensor<B, 2, Int>>,
    /// Packed-sample ids, `[batch, seq]`: a token attends only to tokens with the same id
    /// (packing must not let one sample see another); `None` = one sample per row.
    pub segment_ids: Option<Tensor<B, 2, Int>>,
}

impl<B: EmberBackend> ModelInput<B> {
    /// A batch with no padding and default positions.
    pub fn new(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
            segment_ids: None,
        }
    }
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<B, 3>,
    /// Embedding output, the output of every layer but the last, and the final normed state,
    /// each `[batch, seq, hidden]` (transformers' `output_hidden_states`); empty unless asked.
    pub hidden_states: Vec<Tensor<B, 3>>,
}

/// A causal language model: decoder body plus output head.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// The decoder body.
    pub model: DecoderModel<B>,
    /// The output head; `None` when tied to the embeddings.
    pub lm_head: Option<LoraLinear<B>>,
    /// The normalised config.
    #[module(skip)]
    pub config: DecoderConfig,
    /// RoPE frequencies (of the global layers).
    #[module(skip)]
    pub rope: RopeFrequencies,
    /// RoPE frequencies of the sliding-window layers, when they differ (Gemma 3, OLMo 3).
    #[module(skip)]
    pub local_rope: Option<RopeFrequencies>,
    /// Where the decoder's modules live in module paths and in the checkpoint.
    #[module(skip)]
    pub names: ModuleNames,
    /// Checkpoint components a multimodal wrapper holds besides the text decoder (vision or
    /// audio towers, projectors, multi-token-prediction layers), with their tensor counts:
    /// not loaded.
    #[module(skip)]
    pub ignored_components: Vec<(String, usize)>,
    /// PEFT adapter pairs on GLM-5's sparse-attention indexers, by module path: kept as read
    /// and written back unchanged. Up to `index_topk` positions the indexer keeps every key, so
    /// they cannot change an output, and PEFT gives them no gradient (top-k selection is not
    /// differentiable); `ember merge` folds them into the indexer weights by key.
    #[module(skip)]
    pub indexer_adapters: BTreeMap<String, ember_lora::AdapterTensors>,
}

impl<B: EmberBackend> CausalLm<B> {
    /// Reads `config.json` and the safetensors weights of a HF model folder.
    pub fn from_dir(dir: &Path, device: &B::Device) -> Result<Self> {
        Self::from_path_as(dir, device, BaseDtype::Float32)
    }

    /// Loads a HF model folder or a `.gguf` file.
    pub fn from_path(path: &Path, device: &B::Device) -> Result<Self> {
        Self::from_path_as(path, device, BaseDtype::Float32)
    }

    /// [`CausalLm::from_path`] with the frozen base stored in `dtype`.
    ///
    /// `gguf` keeps a GGUF file's quantized tensors as stored and is refused for a HF folder
    /// (whose weights `q8_0`, `q4_0` or `nf4` quantize on load).
    pub fn from_path_as(path: &Path, device: &B::Device, dtype: BaseDtype) -> Result<Self> {
        if crate::source::is_gguf(path) {
            let (config, weights) = crate::source::gguf_weights_keeping_blocks(path, dtype == BaseDtype::Gguf)?;
            Self::load_as(config, &weights, device, dtype)
        } else if dtype == BaseDtype::Gguf {
            Err(ModelError::InvalidConfig {
                path: path.to_path_buf(),
                key: "base_dtype".into(),
                message: "`gguf` keeps the quantized blocks of a .gguf base, and this is a HF model folder; \
                          use q8_0, q4_0 or nf4 to quantize its linear layers on load"
                    .into(),
            })
        } else {
            let config = DecoderConfig::from_file(path.join("config.json"))?;
            let weights = Weights::open_dir(path)?;
            Self::load_as(config, &weights, device, dtype)
        }
    }

    /// Builds the model from `weights`, checking every key and shape.
    pub fn load(config: DecoderConfig, weights: &Weights, device: &B::Device) -> Result<Self> {
        Self::load_as(config, weights, device, BaseDtype::Float32)
    }

    /// [`CausalLm::load`] with the frozen base stored in `dtype` (see [`BaseDtype`] for which
    /// tensors that covers). Tensors `weights` holds as quantized blocks are kept so; with
    /// `q8_0`, `q4_0` or `nf4` the decoder's linear layers are quantized here, one at a time.
    pub fn load_as(config: DecoderConfig, weights: &Weights, device: &B::Device, dtype: BaseDtype) -> Result<Self> {
        let c = &config;
        // A backend without bf16 tensors (burn-ndarray) holds a bf16 base's linear weights and
        // embedding as host bf16 blocks (multiplied on AMX tiles where the CPU has them); its
        // other frozen tensors (stacked experts, per-layer tables) stay f32 there.
        let host_bf16 = dtype == BaseDtype::Bfloat16 && B::bf16_base_on_host(device);
        let base_dtype = if host_bf16 {
            burn::tensor::FloatDType::F32
        } else {
            dtype.float_dtype()
        };
        let bf16_blocks = |key: &str, shape: [usize; 2]| -> Result<FrozenWeight<B>> {
            let values = weights.read_f32(key, &shape)?;
            let blocks =
                ember_lora::QuantMatrix::quantize(ember_lora::QuantFormat::Bf16, &values, shape).map_err(|e| {
                    ModelError::CorruptWeights {
                        path: weights.source().to_path_buf(),
                        message: format!("`{key}`: {e}"),
                    }
                })?;
            Ok(FrozenWeight::from_quantized(blocks))
        };
        let names = ModuleNames::for_checkpoint(c, weights.keys().map(String::as_str));
        let decoder = names.checkpoint_decoder.as_str();
        let mlp = c.spec().mlp_module;
        let frozen = |key: &str, out: usize, inp: usize, quantize: bool| -> Result<FrozenWeight<B>> {
            if let Some(blocks) = weights.take_quantized(key, [out, inp])? {
                return Ok(FrozenWeight::from_quantized(blocks));
            }
            if host_bf16 {
                return bf16_blocks(key, [out, inp]);
            }
            match dtype.quantize_on_load().filter(|_| quantize) {
                Some(format) => {
                    let values = weights.read_f32(key, &[out, inp])?;
                    let blocks = ember_lora::QuantMatrix::quantize(format, &values, [out, inp]).map_err(|e| {
                        ModelError::CorruptWeights {
                            path: weights.source().to_path_buf(),
                            message: format!("`{key}`: {e}"),
                        }
                    })?;
                    Ok(FrozenWeight::from_quantized(blocks))
                }
                None => Ok(FrozenWeight::from_tensor(ember_lora::matmul_layout(
                    weights.tensor_as::<B, 2>(key, [out, inp], device, base_dtype)?,
                ))),
            }
        };
        // The output head stays unquantized on load (as bitsandbytes leaves it).
        let linear_of = |key: &str, out: usize, inp: usize, bias: bool, quantize: bool| -> Result<LoraLinear<B>> {
            let weight = frozen(&format!("{key}.weight"), out, inp, quantize)?;
            let b = if bias {
                Some(weights.tensor::<B, 1>(&format!("{key}.bias"), [out], device)?)
            } else {
                None
            };
            Ok(LoraLinear::with_weight(weight, b))
        };
        let linear = |key: &str, out: usize, inp: usize, bias: bool| linear_of(key, out, inp, bias, true);
        let norm = |key: &str, dim: usize| -> Result<RmsNorm<B>> {
            let mut w = weights.tensor::<B, 1>(&format!("{key}.weight"), [dim], device)?;
            if c.norm_unit_offset {
                // Gemma scales by (1 + w); folded once here (norm weights are never written back).
                w = w.add_scalar(1.0);
            }
            Ok(RmsNorm {
                weight: Param::from_tensor(w).set_require_grad(false),
                eps: c.rms_norm_eps,
            })
        };
        let h = c.hidden_size;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("{decoder}.layers.{i}");
            let shape = c.layer_shapes[i];
            let (head_dim, kv_heads) = (shape.head_dim, shape.num_kv_heads);
            let (q_dim, kv_dim) = (c.num_heads * head_dim, kv_heads * head_dim);
            let attn = |name: &str| format!("{p}.self_attn.{name}");
            let latent_attention = c
                .latent_attention
                .map(|mla| -> Result<SelfAttention<B>> {
                    let width = mla.nope_dim + mla.rope_dim;
                    // DeepSeek's bottleneck norms keep their class default ε (1e-6).
                    let bottleneck_norm = |name: &str, dim: usize| -> Result<RmsNorm<B>> {
                        Ok(RmsNorm {
                            eps: 1e-6,
                            ..norm(&attn(name), dim)?
                        })
                    };
                    let query = match mla.q_lora_rank {
                        None => LatentQuery::Direct(linear(&attn("q_proj"), c.num_heads * width, h, false)?),
                        Some(rank) => LatentQuery::LowRank(LowRankQuery {
                            q_a_proj: linear(&attn("q_a_proj"), rank, h, c.qkv_bias)?,
                            q_a_layernorm: bottleneck_norm("q_a_layernorm", rank)?,
                            q_b_proj: linear(&attn("q_b_proj"), c.num_heads * width, rank, false)?,
                        }),
                    };
                    Ok(SelfAttention::Latent(LatentAttention {
                        query,
                        kv_a_proj_with_mqa: linear(
                            &attn("kv_a_proj_with_mqa"),
                            mla.kv_lora_rank + mla.rope_dim,
                            h,
                            c.qkv_bias,
                        )?,
                        kv_a_layernorm: bottleneck_norm("kv_a_layernorm", mla.kv_lora_rank)?,
                        kv_b_proj: linear(
                            &attn("kv_b_proj"),
                            c.num_heads * (mla.nope_dim + mla.v_dim),
                            mla.kv_lora_rank,
                            false,
                        )?,
                        o_proj: linear(&attn("o_proj"), h, c.num_heads * mla.v_dim, c.qkv_bias)?,
                        num_heads: c.num_heads,
                        kv_lora_rank: mla.kv_lora_rank,
                        nope_dim: mla.nope_dim,
                        rope_dim: mla.rope_dim,
                        v_dim: mla.v_dim,
                        scale: c.attn_scale,
                        max_keys: mla.index_topk,
                        bf16_products: host_bf16,
                    }))
                })
                .transpose()?;
            let linear_mixer = || -> Result<SelfAttention<B>> {
                let la = c
                    .linear_attention
                    .expect("linear-attention layers come with their sizes");
                let lin = |name: &str| format!("{p}.linear_attn.{name}");
                let (key_width, value_width) = (la.num_k_heads * la.k_dim, la.num_v_heads * la.v_dim);
                let channels = 2 * key_width + value_width;
                let conv = weights
                    .tensor::<B, 3>(&lin("conv1d.weight"), [channels, 1, la.conv_kernel], device)?
                    .reshape([channels, la.conv_kernel]);
                let frozen = |t: Tensor<B, 1>| Param::from_tensor(t).set_require_grad(false);
                let per_head = |name: &str| weights.tensor::<B, 1>(&lin(name), [la.num_v_heads], device);
                // Qwen3-Next fuses the projections per key head; Qwen 3.5 keeps them apart.
                let inputs = if la.grouped_projections {
                    DeltaNetInputs::Grouped(GroupedInputs {
                        in_proj_qkvz: linear(&lin("in_proj_qkvz"), channels + value_width, h, false)?,
                        in_proj_ba: linear(&lin("in_proj_ba"), 2 * la.num_v_heads, h, false)?,
                    })
                } else {
                    DeltaNetInputs::Split(SplitInputs {
                        in_proj_qkv: linear(&lin("in_proj_qkv"), channels, h, false)?,
                        in_proj_z: linear(&lin("in_proj_z"), value_width, h, false)?,
                        in_proj_b: linear(&lin("in_proj_b"), la.num_v_heads, h, false)?,
                        in_proj_a: linear(&lin("in_proj_a"), la.num_v_heads, h, false)?,
                    })
                };
                Ok(SelfAttention::Linear(GatedDeltaNet {
                    inputs,
                    out_proj: linear(&lin("out_proj"), h, value_width, false)?,
                    conv1d: Param::from_tensor(conv).set_require_grad(false),
                    dt_bias: frozen(per_head("dt_bias")?),
                    a_log: frozen(per_head("A_log")?),
                    // The gated norm scales by `w` (not `1 + w` as the block norms do).
                    norm: RmsNorm {
                        weight: frozen(weights.tensor::<B, 1>(&lin("norm.weight"), [la.v_dim], device)?),
                        eps: c.rms_norm_eps,
                    },
                    num_k_heads: la.num_k_heads,
                    num_v_heads: la.num_v_heads,
                    k_dim: la.k_dim,
                    v_dim: la.v_dim,
                }))
            };
            let self_attn = match latent_attention {
                Some(latent) => latent,
                None if shape.linear_attention => linear_mixer()?,
                None => {
                    let qkv = if shape.kv_shared_from.is_some() {
                        // transformers ignores key/value weights a KV-shared layer's checkpoint may hold.
                        for name in ["k_proj", "v_proj", "k_norm", "v_norm"] {
                            for part in ["weight", "bias"] {
                                weights.skip(&format!("{p}.self_attn.{name}.{part}"));
                            }
                        }
                        QkvProjection::QueryOnly(linear(&attn("q_proj"), q_dim, h, c.qkv_bias)?)
                    } else if shape.values_from_keys {
                        QkvProjection::KeysAsValues(KeysAsValues {
                            q_proj: linear(&attn("q_proj"), q_dim, h, c.qkv_bias)?,
                            k_proj: linear(&attn("k_proj"), kv_dim, h, c.qkv_bias)?,
                        })
                    } else if c.fused_qkv {
                        QkvProjection::Fused(linear(&attn("qkv_proj"), q_dim + 2 * kv_dim, h, c.qkv_bias)?)
                    } else {
                        // Qwen 3.5's q_proj also yields the output gate, per head after the query.
                        let q_out = if c.attention_output_gate { 2 * q_dim } else { q_dim };
                        QkvProjection::Split(SplitQkv {
                            q_proj: linear(&attn("q_proj"), q_out, h, c.qkv_bias)?,
                            k_proj: linear(&attn("k_proj"), kv_dim, h, c.qkv_bias)?,
                            v_proj: linear(&attn("v_proj"), kv_dim, h, c.qkv_bias)?,
                        })
                    };
                    let (q_norm_dim, k_norm_dim) = match c.qk_norm {
                        QkNorm::None | QkNorm::L2AfterRope => (0, 0),
                        QkNorm::PerHead => (head_dim, head_dim),
                        QkNorm::Full => (q_dim, kv_dim),
                    };
                    let weighted_qk_norm = matches!(c.qk_norm, QkNorm::PerHead | QkNorm::Full);
                    let q_norm = weighted_qk_norm
                        .then(|| norm(&attn("q_norm"), q_norm_dim))
                        .transpose()?;
                    let k_norm = (weighted_qk_norm && shape.kv_shared_from.is_none())
                        .then(|| norm(&attn("k_norm"), k_norm_dim))
                        .transpose()?;
                    let sinks = if c.attn_sinks {
                        let s = weights.tensor::<B, 1>(&attn("sinks"), [c.num_heads], device)?;
                        Some(Param::from_tensor(s).set_require_grad(false))
                    } else {
                        None
                    };
                    SelfAttention::Grouped(Attention {
                        qkv,
                        o_proj: linear(&attn("o_proj"), h, q_dim, c.o_bias)?,
                        q_norm,
                        k_norm,
                        sinks,
                        num_heads: c.num_heads,
                        num_kv_heads: kv_heads,
                        head_dim,
                        // The L2 norm applies on RoPE layers only.
                        qk_norm: match c.qk_norm {
                            QkNorm::L2AfterRope if !c.rope_layers[i] => QkNorm::None,
                            other => other,
                        },
                        scale: c.attn_scale,
                        softcap: c.attn_softcap,
                        norm_eps: c.rms_norm_eps,
                        value_norm: c.value_norm,
                        output_gate: c.attention_output_gate,
                        bf16_products: host_bf16,
                    })
                }
            };
            let dense_mlp = |path: &str, width: usize, bias: bool, fused: bool| -> Result<Mlp<B>> {
                let gate_up = if fused {
                    GateUpProjection::Fused(linear(&format!("{path}.gate_up_proj"), 2 * width, h, bias)?)
                } else {
                    GateUpProjection::Split(SplitGateUp {
                        gate_proj: linear(&format!("{path}.gate_proj"), width, h, bias)?,
                        up_proj: linear(&format!("{path}.up_proj"), width, h, bias)?,
                    })
                };
                Ok(Mlp {
                    gate_up,
                    down_proj: linear(&format!("{path}.down_proj"), h, width, bias)?,
                    act: c.act,
                })
            };
            let sparse = c.moe.as_ref().filter(|m| m.sparse_layers[i]);
            let dense = || {
                dense_mlp(
                    &format!("{p}.{mlp}"),
                    shape.intermediate_size,
                    c.mlp_bias,
                    c.fused_gate_up,
                )
            };
            let mlp = match sparse {
                Some(moe) if moe.layout == MoeLayout::Gemma4 => FeedForward::DenseAndSparse(DenseAndSparse {
                    mlp: dense()?,
                    mlp_out_norm: norm(&format!("{p}.post_feedforward_layernorm_1"), h)?,
                    moe: crate::moe::load(moe, c, weights, &p, device, base_dtype)?,
                    experts_in_norm: norm(&format!("{p}.pre_feedforward_layernorm_2"), h)?,
                    experts_out_norm: norm(&format!("{p}.post_feedforward_layernorm_2"), h)?,
                }),
                Some(moe) => {
                    let mut block = crate::moe::load(moe, c, weights, &p, device, base_dtype)?;
                    if let Some(width) = moe.shared_expert_size {
                        let shared = format!("{p}.{mlp}.{}", moe.layout.shared_expert_module());
                        block.shared_expert = Some(dense_mlp(&shared, width, false, false)?);
                        if moe.layout == MoeLayout::GatedShared {
                            block.shared_expert_gate = Some(linear(&format!("{shared}_gate"), 1, h, false)?);
                        }
                    }
                    FeedForward::Sparse(block)
                }
                None => FeedForward::Dense(dense()?),
            };
            let per_layer_input = match c.per_layer_inputs {
                Some(ple) => Some(PerLayerInputBlock {
                    gate: linear(&format!("{p}.per_layer_input_gate"), ple.width, h, false)?,
                    projection: linear(&format!("{p}.per_layer_projection"), h, ple.width, false)?,
                    norm: norm(&format!("{p}.post_per_layer_input_norm"), h)?,
                    act: c.act,
                }),
                None => None,
            };
            let layer_scalar = if c.layer_scalars {
                let key = format!("{p}.layer_scalar");
                Some(weights.read_f32(&key, &[1])?[0])
            } else {
                None
            };
            let layer_norm = |name: Option<&str>| name.map(|n| norm(&format!("{p}.{n}"), h)).transpose();
            layers.push(DecoderLayer {
                attn_norm: layer_norm(c.norms.pre_attn)?,
                self_attn,
                attn_out_norm: layer_norm(c.norms.post_attn)?,
                mlp_norm: layer_norm(c.norms.pre_mlp)?,
                mlp,
                mlp_out_norm: layer_norm(c.norms.post_mlp)?,
                sliding_window: c.sliding_window[i],
                attention_chunk: c.attention_chunk[i],
                kv_shared_from: shape.kv_shared_from,
                per_layer_input,
                layer_scalar,
                rope: match (
                    c.rope_layers[i],
                    c.local_rope.is_some() && c.sliding_window[i].is_some(),
                ) {
                    (false, _) => LayerRope::None,
                    (true, true) => LayerRope::Local,
                    (true, false) => LayerRope::Global,
                },
            });
        }
        let embed_key = &format!("{decoder}.embed_tokens.weight");
        let embed = match weights.take_quantized(embed_key, [c.vocab_size, h])? {
            Some(blocks) => FrozenWeight::from_quantized(blocks),
            None if host_bf16 => bf16_blocks(embed_key, [c.vocab_size, h])?,
            None => {
                let embed = weights.tensor_as::<B, 2>(embed_key, [c.vocab_size, h], device, base_dtype)?;
                // A tied table is also the output head: laid out for its `h·Eᵀ` (lookups read
                // rows anywhere).
                FrozenWeight::from_tensor(if c.tie_word_embeddings {
                    ember_lora::matmul_layout(embed)
                } else {
                    embed
                })
            }
        };
        let per_layer_inputs = match c.per_layer_inputs {
            Some(ple) => {
                let total = c.num_layers * ple.width;
                let key = format!("{decoder}.embed_tokens_per_layer.weight");
                let table = weights.tensor_as::<B, 2>(&key, [ple.vocab_size, total], device, base_dtype)?;
                Some(PerLayerInputEmbedding {
                    embed: Embedding {
                        weight: FrozenWeight::from_tensor(table),
                    },
                    projection: linear(&format!("{decoder}.per_layer_model_projection"), total, h, false)?,
                    norm: norm(&format!("{decoder}.per_layer_projection_norm"), ple.width)?,
                    num_layers: c.num_layers,
                    width: ple.width,
                })
            }
            None => None,
        };
        let model = DecoderModel {
            embed_tokens: Embedding { weight: embed },
            per_layer_inputs,
            layers,
            norm: norm(&format!("{decoder}.norm"), h)?,
        };
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints also store the (identical) head; transformers ignores it.
            weights.skip(&format!("{}.weight", names.checkpoint_lm_head));
            None
        } else {
            Some(linear_of(&names.checkpoint_lm_head, c.vocab_size, h, false, false)?)
        };
        // A wrapper's vision/audio towers and projectors, and multi-token-prediction layers,
        // are not loaded (and said so).
        let mut ignored_components = names.ignored_components(weights.keys().map(String::as_str));
        for key in weights.keys().filter(|k| names.is_ignored_key(k)) {
            weights.skip(key);
        }
        // GLM-5's sparse-attention indexers only pick keys, and pick them all up to
        // `index_topk` positions (the most Ember runs): not needed, not loaded.
        if let Some((label, keys)) = c.unloaded_indexers(weights.keys().map(String::as_str)) {
            ignored_components.push((label, keys.len()));
            for key in keys {
                weights.skip(key);
            }
        }
        // GLM-4.5 stores its multi-token-prediction layers as decoder layers after the last.
        for i in c.num_layers..c.num_layers + c.trailing_mtp_layers {
            let prefix = format!("{decoder}.layers.{i}.");
            let keys: Vec<&String> = weights.keys().filter(|k| k.starts_with(&prefix)).collect();
            if !keys.is_empty() {
                ignored_components.push((format!("{decoder}.layers.{i} (multi-token prediction)"), keys.len()));
            }
            for key in keys {
                weights.skip(key);
            }
        }
        weights.ensure_all_used()?;
        let rope = RopeFrequencies::new(&c.rope);
        let local_rope = c.local_rope.as_ref().map(RopeFrequencies::new);
        Ok(Self {
            model,
            lm_head,
            config,
            rope,
            local_rope,
            names,
            ignored_components,
            indexer_adapters: BTreeMap::new(),
        })
    }

    /// The device the model's tensors live on.
    pub fn device(&self) -> B::Device {
        self.model.norm.weight.val().device()
    }

    /// Runs the model and returns logits for every position.
    ///
    /// # Shapes
    /// - `input.input_ids`: `[batch, seq]`
    /// - output logits: `[batch, seq, vocab]`
    pub fn forward(&self, input: ModelInput<B>) -> Tensor<B, 3> {
        self.forward_with_hidden(input, false).logits
    }

    /// Runs the model; with `output_hidden_states` also returns every layer's hidden state.
    ///
    /// # Shapes
    /// - `input.input_ids`: `[batch, seq]`
    /// - `logits`: `[batch, seq, vocab]`; each hidden state `[batch, seq, hidden]`
    pub fn forward_with_hidden(&self, input: ModelInput<B>, output_hidden_states: bool) -> ModelOutput<B> {
        ember_lora::threads::run_for::<B, _>(|| {
            let (x, hidden_states) = self.decode(input, output_hidden_states);
            let logits = self.lm_head_logits(x);
            ModelOutput { logits, hidden_states }
        })
    }

    /// The decoder walk shared by every full-sequence forward: embeddings, layers (one mask per
    /// distinct sliding window, packed segments kept apart), final norm. With `capture`, also
    /// the hidden states transformers' `output_hidden_states` returns.
    fn decode(&self, input: ModelInput<B>, capture: bool) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
        let [batch, seq] = input.input_ids.dims();
        let device = input.input_ids.device();
        let position_ids = input.position_ids.unwrap_or_else(|| {
            Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
                .reshape([1, seq])
                .expand([batch, seq])
        });
        let padding = input.attention_mask;
        let segments = input.segment_ids;
        let mask = |span: AttentionSpan| {
            let mask = attention_mask::<B>(padding.clone(), batch, seq, 0, span, &device);
            match &segments {
                Some(segments) => segment_mask(mask, segments.clone()),
                None => mask,
            }
        };
        let packed_runs = segments
            .as_ref()
            .filter(|_| self.config.layer_shapes.iter().any(|s| s.linear_attention))
            .and_then(packed_runs);
        let rows = RowLayout {
            padding: padding.clone(),
            packed_runs: packed_runs.as_deref(),
        };
        self.walk(input.input_ids, position_ids, mask, rows, None, capture)
    }

    /// Embeds `input_ids` and runs every layer and the final norm, with one mask per distinct
    /// sliding window (`mask(window)`) and the RoPE tables each layer uses; with a cache, keys
    /// and values are appended to it.
    fn walk(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        mask: impl Fn(AttentionSpan) -> Tensor<B, 4>,
        rows: RowLayout<'_, B>,
        mut cache: Option<&mut KvCache<B>>,
        capture: bool,
    ) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
        let RowLayout { padding, packed_runs } = rows;
        let rope = self.rope.tables(position_ids.clone());
        let local_rope = self.local_rope.as_ref().map(|r| r.tables(position_ids.clone()));
        let past = cache.as_deref().map_or(0, |c| c.len);
        let query_scale = self.config.query_scale.map(|scale| {
            if scale.uses_cache_index() {
                let [batch, seq] = position_ids.dims();
                let device = position_ids.device();
                let index = Tensor::<B, 1, Int>::arange(past as i64..(past + seq) as i64, &device)
                    .reshape([1, seq])
                    .expand([batch, seq]);
                query_scales(scale, index)
            } else {
                query_scales(scale, position_ids)
            }
        });
        let mut masks: BTreeMap<AttentionSpan, Tensor<B, 4>> = BTreeMap::new();
        let mut input_ids = input_ids;
        if let Some(pad) = self.config.pad_token_id {
            for &placeholder in &self.config.placeholder_token_ids {
                let at = input_ids.clone().equal_elem(placeholder as i64);
                input_ids = input_ids.mask_fill(at, pad as i64);
            }
        }
        let mut x = self.model.embed_tokens.forward(input_ids.clone());
        if let Some(scale) = self.config.embed_scale {
            x = x.mul_scalar(scale);
        }
        let per_layer_inputs = self
            .model
            .per_layer_inputs
            .as_ref()
            .map(|p| p.forward(input_ids, x.clone()));
        let mut hidden_states = Vec::new();
        if capture {
            // transformers 5 reports the embedding after Gemma's √hidden scaling.
            hidden_states.push(x.clone());
        }
        let seq = x.dims()[1];
        // The new positions' padding, for linear attention (which must not write pads into its
        // state); a single decoding step is never padding.
        let new_padding = padding
            .filter(|_| seq > 1 && self.config.layer_shapes.iter().any(|s| s.linear_attention))
            .map(|p| {
                let keys = p.dims()[1];
                p.narrow(1, keys - seq, seq).float()
            });
        if let Some(cache) = cache.as_deref_mut() {
            if cache.layers.len() != self.model.layers.len() {
                cache.layers = vec![None; self.model.layers.len()];
            }
        }
        let last = self.model.layers.len().saturating_sub(1);
        // Keys and values (cache included) of the layers later layers share them with.
        let mut shared: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>> = vec![None; self.model.layers.len()];
        let is_source: Vec<bool> = (0..self.model.layers.len())
            .map(|i| self.model.layers.iter().any(|l| l.kv_shared_from == Some(i)))
            .collect();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let span = AttentionSpan {
                window: layer.sliding_window,
                chunk: layer.attention_chunk,
            };
            let layer_mask = masks.entry(span).or_insert_with(|| mask(span)).clone();
            let tables = match (&local_rope, layer.rope) {
                (_, LayerRope::None) => None,
                (Some(local), LayerRope::Local) => Some(local),
                _ => Some(&rope),
            };
            let scaled = self
                .config
                .query_scale
                .is_some_and(|s| s.on_rope_layers() || layer.rope == LayerRope::None);
            let inputs = AttentionInputs {
                rope: tables,
                query_scale: query_scale.as_ref().filter(|_| scaled),
                mask: layer_mask,
                shared_kv: layer.kv_shared_from.and_then(|j| shared[j].clone()),
                padding: new_padding.clone(),
                packed_runs,
            };
            let mut slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let past = slot.as_mut().and_then(|s| s.take());
            let own_input = per_layer_inputs.as_ref().map(|p| {
                let [batch, seq, _, width] = p.dims();
                p.clone().narrow(2, i, 1).reshape([batch, seq, width])
            });
            let (out, kv) = layer.forward_cached(x, &inputs, past, own_input);
            if let (true, LayerCache::KeyValue { keys, values }) = (is_source[i], &kv) {
                shared[i] = Some((keys.clone(), values.clone()));
            }
            if let Some(slot) = slot {
                *slot = Some(kv);
            }
            x = out;
            if capture && i < last {
                hidden_states.push(x.clone());
            }
        }
        if let Some(cache) = cache {
            cache.len += seq;
        }
        let x = self.model.norm.forward(x);
        if capture {
            hidden_states.push(x.clone());
        }
        (x, hidden_states)
    }

    /// The output head: `hidden · W_headᵀ` (the embedding matrix when tied).
    ///
    /// # Shapes
    /// - `hidden`: `[..., hidden]`
    /// - output: `[..., vocab]`
    pub fn lm_head_logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => self.model.embed_tokens.weight.linear(hidden, None),
        };
        match self.config.final_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// The output head's weight `[vocab, hidden]` (the embedding matrix when tied) while no
    /// adapter is attached to the head, i.e. while nothing in it trains: a loss may then run the
    /// head's backward pass itself ([`CausalLm::lm_head_logits`] is the forward, final softcap
    /// included, [`FrozenWeight::input_grad`] the input gradient).
    pub fn frozen_lm_head_weight(&self) -> Option<&FrozenWeight<B>> {
        match &self.lm_head {
            None => Some(&self.model.embed_tokens.weight),
            Some(head) if head.adapter.is_none() => Some(&head.weight),
            Some(_) => None,
        }
    }

    /// The final normed hidden states, without the output head (callers that need logits at
    /// a few positions only, such as the training loss, apply [`CausalLm::lm_head_logits`]
    /// to those rows).
    ///
    /// # Shapes
    /// - `input.input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward_hidden(&self, input: ModelInput<B>) -> Tensor<B, 3> {
        ember_lora::threads::run_for::<B, _>(|| self.decode(input, false).0)
    }

    /// One decoding step with a key/value cache: runs `input_ids` after the cached positions
    /// and returns the logits of the last position only.
    ///
    /// # Shapes
    /// - `input_ids`, `position_ids`: `[batch, seq]`
    /// - `attention_mask`: `[batch, past + seq]` (1 real, 0 pad), covering cache and new tokens
    /// - output: `[batch, vocab]`
    pub fn forward_step(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        ember_lora::threads::run_for::<B, _>(|| {
            let hidden = self.forward_step_hidden(input_ids, attention_mask, position_ids, cache);
            let [batch, seq, _] = hidden.dims();
            let logits = self.lm_head_logits(hidden.narrow(1, seq - 1, 1));
            let vocab = logits.dims()[2];
            logits.reshape([batch, vocab])
        })
    }

    /// [`CausalLm::forward_step`] returning the final normed hidden state of every new position.
    ///
    /// # Shapes
    /// - output: `[batch, seq, hidden]`
    pub fn forward_step_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let past = cache.len;
        let padding = attention_mask;
        let mask =
            |span: AttentionSpan| self::attention_mask::<B>(Some(padding.clone()), batch, seq, past, span, &device);
        let rows = RowLayout {
            padding: Some(padding.clone()),
            packed_runs: None,
        };
        ember_lora::threads::run_for::<B, _>(|| self.walk(input_ids, position_ids, mask, rows, Some(cache), false).0)
    }

    /// The normalised config the model was built from.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }
}

/// Per-position query multipliers, computed on the device in f32 as transformers computes them
/// (no host round trip per forward).
///
/// # Shapes
/// - `position_ids`: `[batch, seq]`
/// - output: `[batch, 1, seq, 1]`
fn query_scales<B: EmberBackend>(scale: QueryScale, position_ids: Tensor<B, 2, Int>) -> Tensor<B, 4> {
    let [batch, seq] = position_ids.dims();
    let positions = position_ids.float();
    let values = match scale {
        // 1 + β·ln(1 + ⌊pos / original⌋)
        QueryScale::LogPosition { beta, original } => positions
            .div_scalar(original as f32)
            .floor()
            .add_scalar(1.0)
            .log()
            .mul_scalar(beta as f32)
            .add_scalar(1.0),
        // ln(1 + ⌊(index + 1) / floor_scale⌋)·attn_scale + 1
        QueryScale::Temperature {
            attn_scale,
            floor_scale,
        } => positions
            .add_scalar(1.0)
            .div_scalar(floor_scale as f32)
            .floor()
            .log1p()
            .mul_scalar(attn_scale as f32)
            .add_scalar(1.0),
    };
    values.reshape([batch, 1, seq, 1])
}

/// What every layer keeps for the positions processed so far (keys and values for softmax
/// attention; one [`LayerCache`] variant per attention kind).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer: its cache, once a step has run.
    pub layers: Vec<Option<LayerCache<B>>>,
    /// Number of cached positions.
    pub len: usize,
}

impl<B: EmberBackend> Default for KvCache<B> {
    fn default() -> Self {
        Self {
            layers: Vec::new(),
            len: 0,
        }
    }
}

/// Which keys a layer's queries may reach besides causality and padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct AttentionSpan {
    /// Sliding window: the `w` latest keys.
    pub window: Option<usize>,
    /// Chunked attention: keys of the query's own chunk of `c` tokens, counted from the row's
    /// first real token (transformers' rule for left-padded rows).
    pub chunk: Option<usize>,
}

/// The additive attention mask: 0 where query `i` may see key `j`, the dtype minimum elsewhere.
///
/// Key `j` is visible to query `i` when `j ≤ i + past`, key `j` is not padding, with a
/// sliding window `w` when `i + past − j < w`, and with chunks of `c` when
/// `⌊(j − l)/c⌋ = ⌊(i + past − l)/c⌋` for the row's `l` leading pads (transformers' rules).
///
/// # Shapes
/// - `padding`: `[batch, past + seq]` (1 real, 0 pad)
/// - output: `[batch, 1, seq, past + seq]`
pub fn attention_mask<B: EmberBackend>(
    padding: Option<Tensor<B, 2, Int>>,
    batch: usize,
    seq: usize,
    past: usize,
    span: AttentionSpan,
    device: &B::Device,
) -> Tensor<B, 4> {
    let keys = past + seq;
    let q = Tensor::<B, 1, Int>::arange(past as i64..keys as i64, device)
        .reshape([seq, 1])
        .expand([seq, keys]);
    let k = Tensor::<B, 1, Int>::arange(0..keys as i64, device)
        .reshape([1, keys])
        .expand([seq, keys]);
    let mut hidden: Tensor<B, 2, Bool> = k.clone().greater(q.clone());
    if let Some(w) = span.window {
        // Hidden when i - j >= w, i.e. j <= i - w.
        hidden = hidden.bool_or(k.clone().lower_equal(q.clone().sub_scalar(w as i64)));
    }
    let mut hidden = hidden.reshape([1, 1, seq, keys]).expand([batch, 1, seq, keys]);
    if let Some(c) = span.chunk {
        // Leading pads per row shift the chunk boundaries; pads themselves are hidden below,
        // so their (negative) offsets are clamped to chunk 0.
        let lead = match &padding {
            Some(pad) => pad
                .clone()
                .cumsum(1)
                .equal_elem(0)
                .int()
                .sum_dim(1)
                .reshape([batch, 1, 1]),
            None => Tensor::<B, 3, Int>::zeros([batch, 1, 1], device),
        };
        let chunk_of = |idx: Tensor<B, 2, Int>| {
            (idx.unsqueeze_dim::<3>(0).expand([batch, seq, keys]) - lead.clone())
                .clamp_min(0)
                .div_scalar(c as i64)
        };
        let other_chunk = chunk_of(q).not_equal(chunk_of(k)).reshape([batch, 1, seq, keys]);
        hidden = hidden.bool_or(other_chunk);
    }
    let hidden = match padding {
        Some(pad) => {
            let pad = pad
                .equal_elem(0)
                .reshape([batch, 1, 1, keys])
                .expand([batch, 1, seq, keys]);
            hidden.bool_or(pad)
        }
        None => hidden,
    };
    Tensor::<B, 4>::zeros([batch, 1, seq, keys], device).mask_fill(hidden, MASK_VALUE)
}

/// Hides keys of other packed samples: query `i` sees key `j` only if both carry the same
/// segment id.
///
/// # Shapes
/// - `mask`: additive, `[batch, 1, seq, seq]`
/// - `segments`: `[batch, seq]`
/// - output: `[batch, 1, seq, seq]`
pub fn segment_mask<B: EmberBackend>(mask: Tensor<B, 4>, segments: Tensor<B, 2, Int>) -> Tensor<B, 4> {
    let [batch, seq] = segments.dims();
    let q = segments
        .clone()
        .reshape([batch, 1, seq, 1])
        .expand([batch, 1, seq, seq]);
    let k = segments.reshape([batch, 1, 1, seq]).expand([batch, 1, seq, seq]);
    mask.mask_fill(q.not_equal(k), MASK_VALUE)
}

/// How a batch's rows are laid out, for [`CausalLm`]'s decoder walk.
struct RowLayout<'a, B: Backend> {
    /// 1 real, 0 pad, `[batch, past + seq]`; `None` = all real.
    padding: Option<Tensor<B, 2, Int>>,
    /// Packed rows' runs of equal segment id (see [`packed_runs`]).
    packed_runs: Option<&'a [Vec<std::ops::Range<usize>>]>,
}

/// Per row, the position ranges of its runs of equal segment id (a packed sample, or the
/// padding after the last one); `None` when every row is one run (nothing to keep apart).
///
/// # Shapes
/// - `segments`: `[batch, seq]`
fn packed_runs<B: Backend>(segments: &Tensor<B, 2, Int>) -> Option<Vec<Vec<std::ops::Range<usize>>>> {
    let [_, seq] = segments.dims();
    let ids: Vec<i64> = segments.to_data().convert::<i64>().to_vec().ok()?;
    let runs: Vec<Vec<std::ops::Range<usize>>> = ids
        .chunks(seq.max(1))
        .map(|row| {
            let mut runs = Vec::new();
            let mut start = 0;
            for t in 1..=row.len() {
                if t == row.len() || row[t] != row[start] {
                    runs.push(start..t);
                    start = t;
                }
            }
            runs
        })
        .collect();
    runs.iter().any(|r| r.len() > 1).then_some(runs)
}

/// Checks that a padding mask matches the ids it belongs to.
pub fn check_input_shapes(ids: [usize; 2], mask: Option<[usize; 2]>, positions: Option<[usize; 2]>) -> Result<()> {
    for (name, dims) in [("attention_mask", mask), ("position_ids", positions)] {
        if let Some(d) = dims {
            if d != ids {
                return Err(ModelError::InvalidInput(format!(
                    "{name} has shape {d:?} but input_ids has {ids:?}"
                )));
            }
        }
    }
    Ok(())
}
