//! Rotary position embeddings, HF's rotate-half form.
//!
//! Inverse frequencies are computed in f32 the way transformers computes them (same operation
//! order), so that angles at long positions agree to the last bits.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::config::{RopeConfig, RopeScaling};

/// The inverse frequencies `θ^(-2i/d)` after scaling, `d/2` values for `d` rotated dimensions.
pub fn inverse_frequencies(rope: &RopeConfig) -> Vec<f32> {
    let dim = rope.rotary_dim;
    let base = rope.theta as f32;
    let plain: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32))
        .collect();
    match rope.scaling {
        RopeScaling::Default => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            high_freq_factor,
            low_freq_factor,
            original_max_position_embeddings: old_context,
        } => {
            let factor = factor as f32;
            let (low, high, old) = (low_freq_factor as f32, high_freq_factor as f32, old_context as f32);
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
    }
}

/// Cosine and sine tables for given positions.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `cos(p·f)` repeated over both halves, `[batch, 1, seq, rotary_dim]`.
    pub cos: Tensor<B, 4>,
    /// `sin(p·f)` repeated over both halves, `[batch, 1, seq, rotary_dim]`.
    pub sin: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    /// Builds the tables for `position_ids`.
    ///
    /// # Shapes
    /// - `position_ids`: `[batch, seq]`
    /// - `inv_freq`: `[rotary_dim / 2]`
    pub fn new(position_ids: Tensor<B, 2, Int>, inv_freq: &[f32], attention_scaling: f32) -> Self {
        let [batch, seq] = position_ids.dims();
        let device = position_ids.device();
        let half = inv_freq.len();
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), &device).reshape([1, 1, half]);
        let freqs = position_ids.float().reshape([batch, seq, 1]) * inv;
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([batch, 1, seq, 2 * half]);
        let (cos, sin) = (emb.clone().cos(), emb.sin());
        if attention_scaling == 1.0 {
            Self { cos, sin }
        } else {
            Self {
                cos: cos.mul_scalar(attention_scaling),
                sin: sin.mul_scalar(attention_scaling),
            }
        }
    }

    /// Rotates the first `rotary_dim` dimensions of each head; the rest pass through.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`
    /// - output: same as `x`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, seq, head_dim] = x.dims();
        let rotary = self.cos.dims()[3];
        let (rot, pass) = if rotary < head_dim {
            (
                x.clone().narrow(3, 0, rotary),
                Some(x.narrow(3, rotary, head_dim - rotary)),
            )
        } else {
            (x, None)
        };
        let half = rotary / 2;
        let x1 = rot.clone().narrow(3, 0, half);
        let x2 = rot.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let out = rot * self.cos.clone() + rotated * self.sin.clone();
        match pass {
            Some(pass) => Tensor::cat(vec![out, pass], 3),
            None => out,
        }
        .reshape([batch, heads, seq, head_dim])
    }
}
