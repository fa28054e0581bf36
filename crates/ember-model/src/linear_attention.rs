//! Gated DeltaNet: the linear-attention token mixer of Qwen 3.5 / 3.6 and Qwen3-Next
//! (`linear_attn`), with its causal short convolution and a recurrent state in place of a
//! key/value cache.
//!
//! Per value head the state `S` (`[k_dim, v_dim]`) follows the gated delta rule
//! `S ← S·exp(g_t);  S ← S + k_t·(β_t·(v_t − k_tᵀS))ᵀ;  o_t = q_tᵀS`
//! ([`recurrent_delta_rule`], token by token: the exactness reference and the decoding step).
//! Prompts and training run the chunked form ([`chunked_delta_rule`]): within a chunk the
//! delta-rule updates are one unit lower-triangular system, inverted by blockwise doubling
//! (log₂ chunk batched matmuls, stable like a triangular solve), and only chunks are scanned.

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};
use ember_lora::EmberBackend;
use ember_lora::LoraLinear;

use crate::model::RmsNorm;

/// Positions per chunk of [`chunked_delta_rule`] (transformers' and FLA's default).
pub const CHUNK: usize = 64;

/// Qwen 3.5's separate input projections of Gated DeltaNet.
#[derive(Module, Debug)]
pub struct SplitInputs<B: Backend> {
    /// `[2·k_heads·k_dim + v_heads·v_dim, hidden]`: queries, keys and values.
    pub in_proj_qkv: LoraLinear<B>,
    /// `[v_heads·v_dim, hidden]`: the output gate.
    pub in_proj_z: LoraLinear<B>,
    /// `[v_heads, hidden]`: β (write strength) before the sigmoid.
    pub in_proj_b: LoraLinear<B>,
    /// `[v_heads, hidden]`: the decay's input.
    pub in_proj_a: LoraLinear<B>,
}

/// Qwen3-Next's fused input projections, grouped per key head: `in_proj_qkvz` rows are, for
/// each key head, `[q (k_dim) | k (k_dim) | v (r·v_dim) | z (r·v_dim)]` and `in_proj_ba` rows
/// `[b (r) | a (r)]`, with `r` = value heads per key head.
#[derive(Module, Debug)]
pub struct GroupedInputs<B: Backend> {
    /// `[2·k_heads·k_dim + 2·v_heads·v_dim, hidden]`.
    pub in_proj_qkvz: LoraLinear<B>,
    /// `[2·v_heads, hidden]`.
    pub in_proj_ba: LoraLinear<B>,
}

/// Where queries, keys, values, the output gate, β and the decay input come from.
// One per layer; boxing would buy nothing and burn modules do not derive through Box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum DeltaNetInputs<B: Backend> {
    /// Qwen 3.5.
    Split(SplitInputs<B>),
    /// Qwen3-Next.
    Grouped(GroupedInputs<B>),
}

/// The gated delta-rule mixer of a `linear_attention` layer.
#[derive(Module, Debug)]
pub struct GatedDeltaNet<B: Backend> {
    /// The input projections.
    pub inputs: DeltaNetInputs<B>,
    /// `[hidden, v_heads·v_dim]`.
    pub out_proj: LoraLinear<B>,
    /// Depthwise causal convolution over queries, keys and values, `[channels, kernel]`
    /// (the checkpoint's `conv1d.weight` `[channels, 1, kernel]`).
    pub conv1d: Param<Tensor<B, 2>>,
    /// `[v_heads]`, added to the decay's input before the softplus.
    pub dt_bias: Param<Tensor<B, 1>>,
    /// `[v_heads]`, `log` of the decay rate (`A_log`).
    pub a_log: Param<Tensor<B, 1>>,
    /// RMS norm of each value head (plain `w`), gated by `silu(z)`.
    pub norm: RmsNorm<B>,
    /// Query/key heads.
    pub num_k_heads: usize,
    /// Value heads (a multiple of the key heads; each key head serves consecutive value heads).
    pub num_v_heads: usize,
    /// Query/key width per head.
    pub k_dim: usize,
    /// Value width per head.
    pub v_dim: usize,
}

/// What a linear-attention layer keeps between decoding steps.
#[derive(Debug, Clone)]
pub struct RecurrentState<B: Backend> {
    /// The convolution's last `kernel − 1` inputs, `[batch, kernel − 1, channels]`.
    pub conv: Tensor<B, 3>,
    /// The delta-rule state, `[batch, v_heads, k_dim, v_dim]`.
    pub state: Tensor<B, 4>,
}

impl<B: EmberBackend> GatedDeltaNet<B> {
    /// Mixes the sequence, continuing from `cache`; returns the output and the new state.
    /// `padding` zeroes padded positions' inputs (as transformers does), so that left padding
    /// writes nothing into the state.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `padding`: `[batch, seq]`, 1 for real tokens and 0 for padding
    /// - output: `[batch, seq, hidden]`
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        padding: Option<&Tensor<B, 2>>,
        cache: Option<RecurrentState<B>>,
    ) -> (Tensor<B, 3>, RecurrentState<B>) {
        let [batch, seq, _] = x.dims();
        let (hk, hv, dk, dv) = (self.num_k_heads, self.num_v_heads, self.k_dim, self.v_dim);
        let x = match padding {
            Some(mask) => x * mask.clone().unsqueeze_dim::<3>(2),
            None => x,
        };
        let (mixed, z, b, a) = self.project(x);
        let beta = sigmoid(b);
        let decay_input = softplus(a + self.dt_bias.val().unsqueeze::<3>());
        // g ≤ 0: the state is multiplied by exp(g) at each step.
        let g = decay_input * self.a_log.val().exp().neg().unsqueeze::<3>();

        let (past_conv, past_state) = match cache {
            Some(c) => (Some(c.conv), Some(c.state)),
            None => (None, None),
        };
        let (mixed, conv) = causal_conv(mixed, self.conv1d.val(), past_conv);
        let mixed = silu(mixed);
        let key_width = hk * dk;
        let heads = |t: Tensor<B, 3>, n: usize, d: usize| t.reshape([batch, seq, n, d]);
        let q = heads(mixed.clone().narrow(2, 0, key_width), hk, dk);
        let k = heads(mixed.clone().narrow(2, key_width, key_width), hk, dk);
        let v = heads(mixed.narrow(2, 2 * key_width, hv * dv), hv, dv);
        // Each key head serves `hv / hk` consecutive value heads.
        let repeat = |t: Tensor<B, 4>| {
            if hv == hk {
                t
            } else {
                t.unsqueeze_dim::<5>(3)
                    .expand([batch, seq, hk, hv / hk, dk])
                    .reshape([batch, seq, hv, dk])
            }
        };
        let q = l2_normalize(repeat(q)).mul_scalar((dk as f64).powf(-0.5));
        let k = l2_normalize(repeat(k));
        // [batch·v_heads, seq, ·]
        let by_head = |t: Tensor<B, 4>, d: usize| t.swap_dims(1, 2).reshape([batch * hv, seq, d]);
        let per_head = |t: Tensor<B, 3>| t.swap_dims(1, 2).reshape([batch * hv, seq]);
        let (q, k, v) = (by_head(q, dk), by_head(k, dk), by_head(v, dv));
        let (g, beta) = (per_head(g), per_head(beta));
        let state = past_state.map(|s| s.reshape([batch * hv, dk, dv]));
        let (out, state) = if seq == 1 {
            recurrent_delta_rule(q, k, v, g, beta, state)
        } else {
            chunked_delta_rule(q, k, v, g, beta, state, CHUNK)
        };
        let out = out.reshape([batch, hv, seq, dv]).swap_dims(1, 2);
        let gate = silu(z.reshape([batch, seq, hv, dv]));
        let out = (self.norm.forward(out) * gate).reshape([batch, seq, hv * dv]);
        (
            self.out_proj.forward(out),
            RecurrentState {
                conv,
                state: state.reshape([batch, hv, dk, dv]),
            },
        )
    }
}

impl<B: EmberBackend> GatedDeltaNet<B> {
    /// Mixes packed rows: each run of `runs` (a packed sample's positions) from an empty
    /// state, so that no sample's convolution or recurrent state reaches the next; returns the
    /// output and, per row, the state after its last run.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `padding`: `[batch, seq]`
    /// - `runs`: `batch` rows of ranges that cover `0..seq` in order
    /// - output: `[batch, seq, hidden]`
    pub fn forward_packed(
        &self,
        x: Tensor<B, 3>,
        padding: Option<&Tensor<B, 2>>,
        runs: &[Vec<std::ops::Range<usize>>],
    ) -> (Tensor<B, 3>, RecurrentState<B>) {
        let [batch, seq, _] = x.dims();
        assert_eq!(runs.len(), batch, "one list of runs per row");
        let mut rows = Vec::with_capacity(batch);
        let (mut convs, mut states) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
        for (b, row_runs) in runs.iter().enumerate() {
            let row = x.clone().narrow(0, b, 1);
            let row_padding = padding.map(|p| p.clone().narrow(0, b, 1));
            let mut pieces = Vec::with_capacity(row_runs.len());
            let mut last = None;
            for run in row_runs {
                assert!(run.end <= seq && run.start < run.end, "run {run:?} outside 0..{seq}");
                let piece = row.clone().narrow(1, run.start, run.len());
                let piece_padding = row_padding.as_ref().map(|p| p.clone().narrow(1, run.start, run.len()));
                let (out, state) = self.forward_cached(piece, piece_padding.as_ref(), None);
                pieces.push(out);
                last = Some(state);
            }
            let last = last.expect("a row holds one run at least");
            convs.push(last.conv);
            states.push(last.state);
            rows.push(Tensor::cat(pieces, 1));
        }
        (
            Tensor::cat(rows, 0),
            RecurrentState {
                conv: Tensor::cat(convs, 0),
                state: Tensor::cat(states, 0),
            },
        )
    }

    /// The mixer's inputs: `[q | k | v]` for the convolution `[batch, seq, 2·k_heads·k_dim +
    /// v_heads·v_dim]`, the gate `z` `[batch, seq, v_heads·v_dim]`, and `b`, `a`
    /// `[batch, seq, v_heads]`; value heads in order (each key head's `r` consecutive ones).
    fn project(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        match &self.inputs {
            DeltaNetInputs::Split(p) => (
                p.in_proj_qkv.forward(x.clone()),
                p.in_proj_z.forward(x.clone()),
                p.in_proj_b.forward(x.clone()),
                p.in_proj_a.forward(x),
            ),
            DeltaNetInputs::Grouped(p) => {
                let [batch, seq, _] = x.dims();
                let (hk, hv, dk, dv) = (self.num_k_heads, self.num_v_heads, self.k_dim, self.v_dim);
                let r = hv / hk;
                let qkvz = p
                    .in_proj_qkvz
                    .forward(x.clone())
                    .reshape([batch, seq, hk, 2 * dk + 2 * r * dv]);
                let part = |t: &Tensor<B, 4>, from: usize, len: usize| {
                    t.clone().narrow(3, from, len).reshape([batch, seq, hk * len])
                };
                let mixed = Tensor::cat(
                    vec![part(&qkvz, 0, dk), part(&qkvz, dk, dk), part(&qkvz, 2 * dk, r * dv)],
                    2,
                );
                let z = part(&qkvz, 2 * dk + r * dv, r * dv);
                let ba = p.in_proj_ba.forward(x).reshape([batch, seq, hk, 2 * r]);
                (mixed, z, part(&ba, 0, r), part(&ba, r, r))
            }
        }
    }
}

/// `ln(1 + eˣ)` computed as `max(x, 0) + ln(1 + e^-|x|)`: exact to f32 rounding for large
/// negative `x` too, where burn's `ln(eˣ + 1)` loses the small result (torch's `softplus` keeps it).
fn softplus<B: EmberBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p()
}

/// `x / √(Σx² + 10⁻⁶)` over the last dimension (FLA's and transformers' `l2norm`).
fn l2_normalize<B: EmberBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let norm = x.clone().powi_scalar(2).sum_dim(D - 1).add_scalar(1e-6).sqrt();
    x / norm
}

/// Depthwise causal convolution, continuing from the previous inputs (zeros at the start).
///
/// # Shapes
/// - `x`: `[batch, seq, channels]`
/// - `weight`: `[channels, kernel]`
/// - `past`: `[batch, kernel − 1, channels]`
/// - output: `[batch, seq, channels]` and the last `kernel − 1` inputs
pub fn causal_conv<B: EmberBackend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    past: Option<Tensor<B, 3>>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let [batch, seq, channels] = x.dims();
    let kernel = weight.dims()[1];
    let past = past.unwrap_or_else(|| Tensor::zeros([batch, kernel - 1, channels], &x.device()));
    let padded = Tensor::cat(vec![past, x], 1);
    let mut out: Option<Tensor<B, 3>> = None;
    for j in 0..kernel {
        let tap = weight.clone().narrow(1, j, 1).reshape([1, 1, channels]);
        let term = padded.clone().narrow(1, j, seq) * tap;
        out = Some(match out {
            Some(o) => o + term,
            None => term,
        });
    }
    let state = padded.narrow(1, seq, kernel - 1);
    (out.expect("a kernel has at least one tap"), state)
}

/// The gated delta rule token by token (the reference form, and one decoding step).
///
/// # Shapes
/// - `q`, `k`: `[heads, seq, k_dim]` (`heads` = batch·value heads; q already scaled)
/// - `v`: `[heads, seq, v_dim]`
/// - `g`, `beta`: `[heads, seq]`
/// - `state`: `[heads, k_dim, v_dim]` (zeros when `None`)
/// - output: `[heads, seq, v_dim]` and the final state
pub fn recurrent_delta_rule<B: EmberBackend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    g: Tensor<B, 2>,
    beta: Tensor<B, 2>,
    state: Option<Tensor<B, 3>>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let [heads, seq, dk] = k.dims();
    let dv = v.dims()[2];
    let mut s = state.unwrap_or_else(|| Tensor::zeros([heads, dk, dv], &k.device()));
    let mut outs = Vec::with_capacity(seq);
    for t in 0..seq {
        let at = |x: &Tensor<B, 3>, d: usize| x.clone().narrow(1, t, 1).reshape([heads, d, 1]);
        let (q_t, k_t, v_t) = (at(&q, dk), at(&k, dk), at(&v, dv).reshape([heads, 1, dv]));
        let g_t = g.clone().narrow(1, t, 1).reshape([heads, 1, 1]);
        let beta_t = beta.clone().narrow(1, t, 1).reshape([heads, 1, 1]);
        s = s * g_t.exp();
        // kᵀS: what the state already predicts for this key.
        let predicted = (s.clone() * k_t.clone()).sum_dim(1);
        let delta = (v_t - predicted) * beta_t;
        s = s + k_t * delta;
        outs.push((s.clone() * q_t).sum_dim(1));
    }
    (Tensor::cat(outs, 1), s)
}

/// The gated delta rule by chunks of `chunk` positions (a power of two; shorter sequences use
/// the next power of two above their length): equal to [`recurrent_delta_rule`] up to rounding.
///
/// # Shapes
/// As [`recurrent_delta_rule`].
pub fn chunked_delta_rule<B: EmberBackend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    g: Tensor<B, 2>,
    beta: Tensor<B, 2>,
    state: Option<Tensor<B, 3>>,
    chunk: usize,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let [heads, seq, dk] = k.dims();
    let dv = v.dims()[2];
    let device = k.device();
    let c = chunk.min(seq.next_power_of_two()).max(1);
    assert!(c.is_power_of_two(), "chunk {c} must be a power of two");
    let n = seq.div_ceil(c);
    let pad = n * c - seq;
    // Zero padding at the end: no key, no value, no decay; earlier outputs and the final
    // state are unchanged.
    let pad3 = |x: Tensor<B, 3>, d: usize| {
        if pad == 0 {
            x
        } else {
            Tensor::cat(vec![x, Tensor::zeros([heads, pad, d], &device)], 1)
        }
    };
    let pad2 = |x: Tensor<B, 2>| {
        if pad == 0 {
            x
        } else {
            Tensor::cat(vec![x, Tensor::zeros([heads, pad], &device)], 1)
        }
    };
    let chunks = |x: Tensor<B, 3>, d: usize| pad3(x, d).reshape([heads, n, c, d]);
    let (q, k, v) = (chunks(q, dk), chunks(k, dk), chunks(v, dv));
    let g = pad2(g).reshape([heads, n, c]);
    let beta = pad2(beta).reshape([heads, n, c]).unsqueeze_dim::<4>(3);
    let k_beta = k.clone() * beta.clone();
    let v_beta = v * beta;

    // Log-decay from the chunk's start through each position.
    let cum = g.cumsum(2);
    let cum_col = cum.clone().unsqueeze_dim::<4>(3); // [.., c, 1]
    let cum_row = cum.clone().unsqueeze_dim::<4>(2); // [.., 1, c]
                                                     // Decay from position j to i (j ≤ i); zero above the diagonal.
    let upper = strict_triangle::<B>(c, &device, true);
    let pairwise = (cum_col.clone() - cum_row)
        .mask_fill(upper.clone(), f32::NEG_INFINITY)
        .exp();
    // The within-chunk system (I + L)·u = β·v with L = strictly lower (βk·kᵀ ⊙ decay).
    let lower = (k_beta.clone().matmul(k.clone().swap_dims(2, 3)) * pairwise.clone())
        .mask_fill(strict_triangle::<B>(c, &device, false).bool_not(), 0.0);
    let inverse = unit_lower_inverse(lower, c, &device);
    let u = inverse.clone().matmul(v_beta);
    let w = inverse.matmul(k_beta * cum_col.clone().exp());
    let intra = q.clone().matmul(k.clone().swap_dims(2, 3)) * pairwise;
    let last = cum.clone().narrow(2, c - 1, 1); // [heads, n, 1]
    let q_decayed = q * cum_col.clone().exp();
    let k_decayed = k * (last.clone().unsqueeze_dim::<4>(3) - cum_col).exp();
    let chunk_decay = last.exp(); // [heads, n, 1]

    let mut s = state.unwrap_or_else(|| Tensor::zeros([heads, dk, dv], &device));
    let mut outs = Vec::with_capacity(n);
    let at =
        |x: &Tensor<B, 4>, i: usize, rows: usize, cols: usize| x.clone().narrow(1, i, 1).reshape([heads, rows, cols]);
    for i in 0..n {
        let v_new = at(&u, i, c, dv) - at(&w, i, c, dk).matmul(s.clone());
        outs.push(at(&q_decayed, i, c, dk).matmul(s.clone()) + at(&intra, i, c, c).matmul(v_new.clone()));
        let decay = chunk_decay.clone().narrow(1, i, 1).reshape([heads, 1, 1]);
        s = s * decay + at(&k_decayed, i, c, dk).swap_dims(1, 2).matmul(v_new);
    }
    let out = Tensor::cat(outs, 1).narrow(1, 0, seq);
    (out, s)
}

/// `[c, c]` mask of the entries strictly above (`upper`) or strictly below the diagonal, as a
/// `[1, 1, c, c]` tensor.
fn strict_triangle<B: EmberBackend>(c: usize, device: &B::Device, upper: bool) -> Tensor<B, 4, Bool> {
    let values: Vec<bool> = (0..c * c)
        .map(|x| {
            let (i, j) = (x / c, x % c);
            if upper {
                j > i
            } else {
                j < i
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, c, c]), device)
}

/// `(I + L)⁻¹` for strictly lower-triangular `L`, by blockwise doubling: with the inverses of
/// the diagonal blocks of size `b` known (block-diagonal `X`), those of size `2b` are
/// `X − X·L_b·X`, where `L_b` keeps `L`'s lower-left `b × b` block inside each `2b` block.
///
/// # Shapes
/// - `lower`: `[heads, n, c, c]`
/// - output: same
fn unit_lower_inverse<B: EmberBackend>(lower: Tensor<B, 4>, c: usize, device: &B::Device) -> Tensor<B, 4> {
    let [heads, n, _, _] = lower.dims();
    let identity: Vec<f32> = (0..c * c).map(|x| if x / c == x % c { 1.0 } else { 0.0 }).collect();
    let mut inverse =
        Tensor::<B, 4>::from_data(TensorData::new(identity, [1, 1, c, c]), device).expand([heads, n, c, c]);
    let mut b = 1;
    while b < c {
        let outside: Vec<bool> = (0..c * c)
            .map(|x| {
                let (i, j) = (x / c, x % c);
                let same_pair = i / (2 * b) == j / (2 * b);
                !(same_pair && (i / b) % 2 == 1 && (j / b) % 2 == 0)
            })
            .collect();
        let outside = Tensor::<B, 4, Bool>::from_data(TensorData::new(outside, [1, 1, c, c]), device);
        let block = lower.clone().mask_fill(outside, 0.0);
        inverse = inverse.clone() - inverse.clone().matmul(block).matmul(inverse);
        b *= 2;
    }
    inverse
}
