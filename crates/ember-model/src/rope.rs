//! Rotary position embeddings: HF's rotate-half form, or GLM's interleaved pairs.
//!
//! Inverse frequencies are computed in f32 the way transformers computes them (same operation
//! order), so that angles at long positions agree to the last bits.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::config::{RopeConfig, RopeScaling};
use ember_lora::fused::RotaryPairs;
use ember_lora::EmberBackend;

/// What a layer needs to build its cos/sin tables.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    /// Inverse frequencies after scaling, `[rotary_dim / 2]`.
    pub inv_freq: Vec<f32>,
    /// Multiplier of cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_scaling: f32,
    /// Rotate interleaved pairs instead of halves.
    pub interleaved: bool,
    /// LongRoPE: the frequencies used when a position reaches the given context length.
    pub long: Option<(Vec<f32>, i64)>,
}

impl RopeFrequencies {
    /// Computes the frequencies of `rope`.
    pub fn new(rope: &RopeConfig) -> Self {
        let attention_scaling = match rope.scaling {
            RopeScaling::Yarn { attention_factor, .. } | RopeScaling::LongRope { attention_factor, .. } => {
                attention_factor as f32
            }
            _ => 1.0,
        };
        let long = match &rope.scaling {
            RopeScaling::LongRope {
                long_factor,
                original_max_position_embeddings,
                ..
            } => Some((
                divided_frequencies(rope, long_factor),
                *original_max_position_embeddings as i64,
            )),
            _ => None,
        };
        Self {
            inv_freq: inverse_frequencies(rope),
            attention_scaling,
            interleaved: rope.interleaved,
            long,
        }
    }

    /// The cos/sin tables for `position_ids`.
    ///
    /// # Shapes
    /// - `position_ids`: `[batch, seq]`
    pub fn tables<B: Backend>(&self, position_ids: Tensor<B, 2, Int>) -> RopeTables<B> {
        let inv_freq = match &self.long {
            // transformers' longrope_frequency_update: long factors once max(position) + 1 > original.
            Some((long, original)) if position_ids.clone().max().into_scalar().elem::<i64>() + 1 > *original => long,
            _ => &self.inv_freq,
        };
        RopeTables::new(position_ids, inv_freq, self.attention_scaling, self.interleaved)
    }
}

/// The inverse frequencies `θ^(-2i/d)` after scaling, `d/2` values for `d` rotated dimensions.
pub fn inverse_frequencies(rope: &RopeConfig) -> Vec<f32> {
    let dim = rope.rotary_dim;
    let base = rope.theta as f32;
    let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect();
    let plain: Vec<f32> = pos_freqs.iter().map(|p| 1.0f32 / p).collect();
    match &rope.scaling {
        RopeScaling::Default => plain,
        RopeScaling::LongRope { short_factor, .. } => divided_frequencies(rope, short_factor),
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Proportional { factor, rope_angles } => plain
            .iter()
            .enumerate()
            .map(|(i, f)| if i < *rope_angles { f / *factor as f32 } else { 0.0 })
            .collect(),
        RopeScaling::Llama3 {
            factor,
            high_freq_factor,
            low_freq_factor,
            original_max_position_embeddings: old_context,
        } => {
            let factor = *factor as f32;
            let (low, high, old) = (*low_freq_factor as f32, *high_freq_factor as f32, *old_context as f32);
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = (2.0 * std::f64::consts::PI) as f32 / f;
                    let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                    // wavelen is finite and positive, so "not below" and "not above" are plain comparisons.
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
        RopeScaling::Yarn {
            factor,
            beta_fast,
            beta_slow,
            original_max_position_embeddings: old,
            truncate,
            ..
        } => {
            // transformers' _compute_yarn_parameters, in the same precisions (bounds in f64,
            // ramp and blend in f32).
            let correction = |rotations: f64| {
                (dim as f64 * (old / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * rope.theta.ln())
            };
            let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(dim as f64 - 1.0);
            if low == high {
                high += 0.001;
            }
            let (low, span) = (low as f32, (high - low) as f32);
            pos_freqs
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    let ramp = ((i as f32 - low) / span).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    let extrapolation = 1.0 / p;
                    let interpolation = 1.0 / (*factor as f32 * p);
                    interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                })
                .collect()
        }
    }
}

/// LongRoPE's `1 / (factor_i · θ^(2i/d))`, in f32 as transformers computes it.
fn divided_frequencies(rope: &RopeConfig, factors: &[f64]) -> Vec<f32> {
    let dim = rope.rotary_dim;
    let base = rope.theta as f32;
    factors
        .iter()
        .enumerate()
        .map(|(i, &f)| 1.0f32 / (f as f32 * base.powf((2 * i) as f32 / dim as f32)))
        .collect()
}

/// Cosine and sine tables for given positions.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `cos(p·f)` repeated over both halves (or each pair), `[batch, 1, seq, rotary_dim]`.
    pub cos: Tensor<B, 4>,
    /// `sin(p·f)` laid out as `cos`, `[batch, 1, seq, rotary_dim]`.
    pub sin: Tensor<B, 4>,
    /// Pairs are `(2i, 2i+1)` (GLM) instead of `(i, i + d/2)`.
    pub interleaved: bool,
}

impl<B: Backend> RopeTables<B> {
    /// Builds the tables for `position_ids`.
    ///
    /// # Shapes
    /// - `position_ids`: `[batch, seq]`
    /// - `inv_freq`: `[rotary_dim / 2]`
    pub fn new(position_ids: Tensor<B, 2, Int>, inv_freq: &[f32], attention_scaling: f32, interleaved: bool) -> Self {
        let [batch, seq] = position_ids.dims();
        let device = position_ids.device();
        let half = inv_freq.len();
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), &device).reshape([1, 1, half]);
        let freqs = position_ids.float().reshape([batch, seq, 1]) * inv;
        let emb = if interleaved {
            // f0 f0 f1 f1 ...
            Tensor::stack::<4>(vec![freqs.clone(), freqs], 3).reshape([batch, 1, seq, 2 * half])
        } else {
            // f0 f1 ... f0 f1 ...
            Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([batch, 1, seq, 2 * half])
        };
        let (mut cos, mut sin) = (emb.clone().cos(), emb.sin());
        if attention_scaling != 1.0 {
            cos = cos.mul_scalar(attention_scaling);
            sin = sin.mul_scalar(attention_scaling);
        }
        Self { cos, sin, interleaved }
    }
}

impl<B: EmberBackend> RopeTables<B> {
    /// Rotates the first `rotary_dim` dimensions of each head; the rest pass through (one
    /// fused op with its own backward, [`ember_lora::fused::rope`]).
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`
    /// - output: same as `x`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let pairs = if self.interleaved {
            RotaryPairs::Interleaved
        } else {
            RotaryPairs::Halves
        };
        ember_lora::fused::rope(x, self.cos.clone(), self.sin.clone(), pairs)
    }
}
