//! Fused row-wise operations with their own backward pass: RMSNorm, rotary position embedding
//! and the SwiGLU product; and the loss's softmax cross-entropy with its gradient.
//!
//! Composed from burn's tensor ops, each of these is a chain of passes over the activations
//! forward (RMSNorm: square, mean, add, sqrt, reciprocal, two products) and a longer one backward,
//! where autodiff also fills zero and one tensors for `narrow`, `cat` and `mean_dim` (RoPE's
//! halves, RMSNorm's mean). As one op each they read their inputs once per pass and keep only
//! their inputs for the backward pass. On the CPU backends both passes are host kernels
//! parallel over rows ([`host_rms_norm`], [`host_rope`], [`host_swiglu`] and their
//! backward); GPU backends compose burn's ops with the direct backward formulas
//! ([`device_rms_norm`], [`device_rope`], [`device_swiglu`]).
//!
//! Constants of the frozen base (the norm weight, the rotary tables) get no gradient.

use std::mem::MaybeUninit;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::attention::{matmul_into, matmul_new, place_of, prim, to_device, HostMatrix, HostTensors};
use crate::buffer::{unwritten, written, written_slice};
use crate::quant::{float, EmberBackend, QuantMatrix};

/// Elements per parallel task of the host kernels (smaller tensors run on one thread).
const TASK_ELEMENTS: usize = 1 << 14;

/// Rows of `dim` values per parallel task.
fn task_rows(dim: usize) -> usize {
    (TASK_ELEMENTS / dim.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x / √(mean(x²) + ε) · weight` over the last dimension, differentiable in `x` (the weight is
/// a constant: the frozen base's).
///
/// # Shapes
/// - `x`: `[..., dim]`; `weight`: `[dim]`; output: as `x`
pub fn rms_norm<B: EmberBackend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dims = x.dims();
    let dim = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let weight = prim(weight.cast(x.dtype()).detach());
    float::<B, 2>(B::fused_rms_norm(prim(x.reshape([rows, dim])), weight, eps)).reshape(dims)
}

/// [`rms_norm`] composed from burn's ops, in the order the model's eager code had them.
///
/// # Shapes
/// - `x`: `[rows, dim]`; `weight`: `[dim]`; output: `[rows, dim]`
pub fn device_rms_norm<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let x = float::<B, 2>(x);
    let variance = x.clone().powi_scalar(2).mean_dim(1);
    let normed = x * variance.add_scalar(eps).sqrt().recip();
    prim(normed * float::<B, 1>(weight).unsqueeze::<2>())
}

/// `∂x` of [`rms_norm`]: with `r = 1/√(mean(x²) + ε)` and `h = g·w`,
/// `∂x = r·h − x·r³·mean(h·x)`.
///
/// # Shapes
/// - `x`, `d_out`: `[rows, dim]`; `weight`: `[dim]`; output: `[rows, dim]`
pub fn device_rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
    d_out: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = float::<B, 2>(x);
    let h = float::<B, 2>(d_out) * float::<B, 1>(weight).unsqueeze::<2>();
    let r = x.clone().powi_scalar(2).mean_dim(1).add_scalar(eps).sqrt().recip();
    let dot = (h.clone() * x.clone()).mean_dim(1);
    let r3 = r.clone().powi_scalar(3);
    prim(h * r - x * (r3 * dot))
}

/// `Σ values` in 16 lanes (so that the loop vectorises).
#[inline(always)]
fn lane_sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; 16];
    for (i, v) in values.enumerate() {
        lanes[i & 15] += v;
    }
    lanes.iter().sum()
}

/// `1/√(mean(x²) + ε)` of one row.
#[inline(always)]
fn inverse_rms(row: &[f32], eps: f64) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane += x * x;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    let variance = (lanes.iter().sum::<f32>() + tail) / row.len() as f32;
    1.0 / (variance + eps as f32).sqrt()
}

/// [`rms_norm`] on contiguous host rows.
///
/// # Shapes
/// - `x`: `[rows·dim]`; `weight`: `[dim]`; output: `[rows·dim]`
pub fn host_rms_norm_forward(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let dim = weight.len();
    assert_whole_rows(x.len(), dim);
    let mut out = unwritten(x.len());
    out.par_chunks_mut(dim * task_rows(dim))
        .zip(x.par_chunks(dim * task_rows(dim)))
        .for_each(|(out, x)| rms_norm_rows(out, x, weight, eps));
    // SAFETY: `x` is whole rows (checked above); the chunks of `out` and `x` pair up one to one
    // and each task writes every value of its rows.
    unsafe { written(out) }
}

/// `len` values are whole rows of `dim` (the row kernels then write every value).
fn assert_whole_rows(len: usize, dim: usize) {
    assert!(
        dim > 0 && len.is_multiple_of(dim),
        "{len} values are no whole number of rows of {dim}"
    );
}

crate::simd::multiversion! {
    /// Rows of [`host_rms_norm_forward`], every value of `out` written (vectorised for the CPU,
    /// see [`crate::simd`]).
    fn rms_norm_rows(out: &mut [MaybeUninit<f32>], x: &[f32], weight: &[f32], eps: f64) {
        let dim = weight.len();
        for (o, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let r = inverse_rms(x, eps);
            for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
                o.write(x * r * w);
            }
        }
    }
}

/// The backward pass of [`host_rms_norm_forward`] (formula at [`device_rms_norm_backward`]).
///
/// # Shapes
/// - `x`, `d_out`: `[rows·dim]`; `weight`: `[dim]`; output: `[rows·dim]`
pub fn host_rms_norm_backward(x: &[f32], weight: &[f32], eps: f64, d_out: &[f32]) -> Vec<f32> {
    let dim = weight.len();
    assert_whole_rows(x.len(), dim);
    assert_eq!(
        d_out.len(),
        x.len(),
        "RMSNorm backward of {} inputs and {} output gradients",
        x.len(),
        d_out.len()
    );
    let mut dx = unwritten(x.len());
    let task = dim * task_rows(dim);
    dx.par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(d_out.par_chunks(task)))
        .for_each(|(dx, (x, g))| rms_norm_grad_rows(dx, x, g, weight, eps));
    // SAFETY: `x` and `d_out` are the same whole rows (checked above); the chunks pair up one to
    // one and each task writes every value of its rows of `dx`.
    unsafe { written(dx) }
}

crate::simd::multiversion! {
    /// Rows of [`host_rms_norm_backward`], every value of `dx` written (vectorised for the CPU,
    /// see [`crate::simd`]).
    fn rms_norm_grad_rows(dx: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32], weight: &[f32], eps: f64) {
        let dim = weight.len();
        for ((dx, x), g) in dx
            .chunks_exact_mut(dim)
            .zip(x.chunks_exact(dim))
            .zip(g.chunks_exact(dim))
        {
            let r = inverse_rms(x, eps);
            let dot = lane_sum(g.iter().zip(weight).zip(x).map(|((g, w), x)| g * w * x)) / dim as f32;
            let c = r * r * r * dot;
            for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(weight) {
                dx.write(r * (g * w) - x * c);
            }
        }
    }
}

/// [`host_rms_norm_forward`] on a CPU backend's tensors.
pub fn host_rms_norm<B: HostTensors>(x: FloatTensor<B>, weight: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let place = place_of::<B>(&x);
    let (xh, dims) = B::host_f32::<2>(&x);
    let (w, _) = B::host_f32::<1>(&weight);
    to_device::<B, 2>(host_rms_norm_forward(&xh, &w, eps), dims, &place)
}

/// [`host_rms_norm_backward`] on a CPU backend's tensors.
pub fn host_rms_norm_grad<B: HostTensors>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
    d_out: FloatTensor<B>,
) -> FloatTensor<B> {
    let place = place_of::<B>(&x);
    let (xh, dims) = B::host_f32::<2>(&x);
    let (w, _) = B::host_f32::<1>(&weight);
    let (g, _) = B::host_f32::<2>(&d_out);
    to_device::<B, 2>(host_rms_norm_backward(&xh, &w, eps, &g), dims, &place)
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding

/// How a rotary embedding pairs the dimensions it rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryPairs {
    /// `(i, i + rotary/2)` (Llama, most families).
    Halves,
    /// `(2i, 2i + 1)` (GLM).
    Interleaved,
}

impl RotaryPairs {
    /// The partner of dimension `j` in a rotary block of `rotary` dimensions, and whether `j`
    /// is the pair's first member.
    #[inline(always)]
    fn partner(self, j: usize, rotary: usize) -> (usize, bool) {
        match self {
            RotaryPairs::Halves if j < rotary / 2 => (j + rotary / 2, true),
            RotaryPairs::Halves => (j - rotary / 2, false),
            RotaryPairs::Interleaved => (j ^ 1, j & 1 == 0),
        }
    }
}

/// `x·cos + rotate(x)·sin` on the first `rotary` dimensions of each head (`rotate` maps a pair
/// `(a, b)` to `(−b, a)`); the remaining dimensions pass through. Differentiable in `x` (the
/// tables are constants).
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]`
/// - `cos`, `sin`: `[batch or 1, 1, seq, rotary]`, `rotary ≤ head_dim`, even
/// - output: as `x`
pub fn rope<B: EmberBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    pairs: RotaryPairs,
) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let cos = prim(cos.cast(dtype).detach());
    let sin = prim(sin.cast(dtype).detach());
    float(B::fused_rope(prim(x), cos, sin, pairs, false))
}

/// `(−b, a)` for each pair `(a, b)` of `x`'s last dimension (`transpose`: `(b, −a)`, the
/// adjoint).
fn rotate<B: Backend>(x: Tensor<B, 4>, pairs: RotaryPairs, transpose: bool) -> Tensor<B, 4> {
    let [batch, heads, seq, rotary] = x.dims();
    let half = rotary / 2;
    let (first, second) = match pairs {
        RotaryPairs::Halves => (x.clone().narrow(3, 0, half), x.narrow(3, half, half)),
        RotaryPairs::Interleaved => {
            let p = x.reshape([batch, heads, seq, half, 2]);
            (
                p.clone().narrow(4, 0, 1).reshape([batch, heads, seq, half]),
                p.narrow(4, 1, 1).reshape([batch, heads, seq, half]),
            )
        }
    };
    let (a, b) = if transpose {
        (second, first.neg())
    } else {
        (second.neg(), first)
    };
    match pairs {
        RotaryPairs::Halves => Tensor::cat(vec![a, b], 3),
        RotaryPairs::Interleaved => Tensor::stack::<5>(vec![a, b], 4).reshape([batch, heads, seq, rotary]),
    }
}

/// [`rope`] composed from burn's ops; `transpose` applies the adjoint rotation
/// `x·cos + rotateᵀ(x·sin)` (the backward pass).
///
/// # Shapes
/// As [`rope`].
pub fn device_rope<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    pairs: RotaryPairs,
    transpose: bool,
) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let (cos, sin) = (float::<B, 4>(cos), float::<B, 4>(sin));
    let [batch, heads, seq, head_dim] = x.dims();
    let rotary = cos.dims()[3];
    let (rot, pass) = if rotary < head_dim {
        (
            x.clone().narrow(3, 0, rotary),
            Some(x.narrow(3, rotary, head_dim - rotary)),
        )
    } else {
        (x, None)
    };
    let out = if transpose {
        rot.clone() * cos + rotate(rot * sin, pairs, true)
    } else {
        rot.clone() * cos + rotate(rot, pairs, false) * sin
    };
    let out = match pass {
        Some(pass) => Tensor::cat(vec![out, pass], 3),
        None => out,
    };
    prim(out.reshape([batch, heads, seq, head_dim]))
}

/// [`rope`] (or its adjoint, `transpose`) on contiguous host rows.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]` flat; `cos`, `sin`: `[table_batch, 1, seq, rotary]`
///   flat, `table_batch` 1 or `batch`; output: as `x`
pub fn host_rope_rows(
    x: &[f32],
    [batch, heads, seq, head_dim]: [usize; 4],
    cos: &[f32],
    sin: &[f32],
    rotary: usize,
    pairs: RotaryPairs,
    transpose: bool,
) -> Vec<f32> {
    let table_batch = cos.len() / (seq * rotary).max(1);
    let mut out = vec![0f32; x.len()];
    let plane = seq * head_dim;
    out.par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .enumerate()
        .for_each(|(bh, (out, x))| {
            let b = if table_batch == 1 { 0 } else { bh / heads };
            debug_assert!(b < batch);
            for (t, (o, x)) in out.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)).enumerate() {
                let at = (b * seq + t) * rotary;
                let (c, s) = (&cos[at..at + rotary], &sin[at..at + rotary]);
                for j in 0..rotary {
                    let (p, first) = pairs.partner(j, rotary);
                    // forward: first (a) → a·c − b·s; second (b) → b·c + a·s
                    // adjoint: first → a·c + b·s_b; second → b·c − a·s_a
                    o[j] = match (transpose, first) {
                        (false, true) => x[j] * c[j] - x[p] * s[j],
                        (false, false) => x[j] * c[j] + x[p] * s[j],
                        (true, true) => x[j] * c[j] + x[p] * s[p],
                        (true, false) => x[j] * c[j] - x[p] * s[p],
                    };
                }
                o[rotary..].copy_from_slice(&x[rotary..]);
            }
        });
    out
}

/// [`host_rope_rows`] on a CPU backend's tensors.
pub fn host_rope<B: HostTensors>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    pairs: RotaryPairs,
    transpose: bool,
) -> FloatTensor<B> {
    let place = place_of::<B>(&x);
    let (xh, dims) = B::host_f32::<4>(&x);
    let (c, cd) = B::host_f32::<4>(&cos);
    let (s, _) = B::host_f32::<4>(&sin);
    assert!(
        (cd[0] == 1 || cd[0] == dims[0]) && cd[2] == dims[2] && cd[3] % 2 == 0 && cd[3] <= dims[3],
        "rotary tables {cd:?} do not fit x {dims:?}"
    );
    to_device::<B, 4>(host_rope_rows(&xh, dims, &c, &s, cd[3], pairs, transpose), dims, &place)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate)·up`, differentiable in both.
///
/// # Shapes
/// - `gate`, `up`: `[..., inter]` (same shape); output: the same
pub fn swiglu<B: EmberBackend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let dims = gate.dims();
    let up = up.cast(gate.dtype());
    let n: usize = dims.iter().product();
    float::<B, 1>(B::fused_swiglu(prim(gate.reshape([n])), prim(up.reshape([n])))).reshape(dims)
}

/// [`swiglu`] composed from burn's ops.
pub fn device_swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    prim(burn::tensor::activation::silu(float::<B, 1>(gate)) * float::<B, 1>(up))
}

/// `(∂gate, ∂up)` of [`swiglu`]: with `σ = sigmoid(gate)`, `∂up = g·gate·σ` and
/// `∂gate = g·up·σ·(1 + gate·(1 − σ))`.
pub fn device_swiglu_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (gate, up, g) = (float::<B, 1>(gate), float::<B, 1>(up), float::<B, 1>(d_out));
    let sigma = burn::tensor::activation::sigmoid(gate.clone());
    let d_up = g.clone() * gate.clone() * sigma.clone();
    let slope = sigma.clone() * (gate * sigma.neg().add_scalar(1.0)).add_scalar(1.0);
    (prim(g * up * slope), prim(d_up))
}

/// `1 / (1 + e^(−x))`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::attention::fast_exp(-x))
}

/// [`swiglu`] on host values.
pub fn host_swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(
        gate.len(),
        up.len(),
        "SwiGLU of {} gate and {} up values",
        gate.len(),
        up.len()
    );
    let mut out = unwritten(gate.len());
    out.par_chunks_mut(TASK_ELEMENTS)
        .zip(gate.par_chunks(TASK_ELEMENTS).zip(up.par_chunks(TASK_ELEMENTS)))
        .for_each(|(o, (g, u))| swiglu_chunk(o, g, u));
    // SAFETY: the chunks of `out`, `gate` and `up` pair up one to one (equal lengths, checked
    // above) and each task writes every value of its chunk.
    unsafe { written(out) }
}

crate::simd::multiversion! {
    /// A chunk of [`host_swiglu_forward`], every value of `out` written (vectorised for the
    /// CPU, see [`crate::simd`]).
    fn swiglu_chunk(out: &mut [MaybeUninit<f32>], gate: &[f32], up: &[f32]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            o.write(g * sigmoid(*g) * u);
        }
    }
}

/// The backward pass of [`host_swiglu_forward`] (formulas at [`device_swiglu_backward`]).
pub fn host_swiglu_backward(gate: &[f32], up: &[f32], d_out: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let len = gate.len();
    assert!(
        up.len() == len && d_out.len() == len,
        "SwiGLU backward of {len} gate, {} up and {} output-gradient values",
        up.len(),
        d_out.len()
    );
    let mut d_gate = unwritten(len);
    let mut d_up = unwritten(len);
    d_gate
        .par_chunks_mut(TASK_ELEMENTS)
        .zip(d_up.par_chunks_mut(TASK_ELEMENTS))
        .zip(gate.par_chunks(TASK_ELEMENTS).zip(up.par_chunks(TASK_ELEMENTS)))
        .zip(d_out.par_chunks(TASK_ELEMENTS))
        .for_each(|(((dg, du), (gate, up)), d)| swiglu_grad_chunk(dg, du, gate, up, d));
    // SAFETY: the chunks of all five buffers pair up one to one (equal lengths, checked above)
    // and each task writes every value of its chunks of `d_gate` and `d_up`.
    unsafe { (written(d_gate), written(d_up)) }
}

crate::simd::multiversion! {
    /// A chunk of [`host_swiglu_backward`], every value of `d_gate` and `d_up` written
    /// (vectorised for the CPU, see [`crate::simd`]).
    fn swiglu_grad_chunk(
        d_gate: &mut [MaybeUninit<f32>],
        d_up: &mut [MaybeUninit<f32>],
        gate: &[f32],
        up: &[f32],
        d_out: &[f32],
    ) {
        for ((((dg, du), x), u), d) in d_gate.iter_mut().zip(d_up).zip(gate).zip(up).zip(d_out) {
            let s = sigmoid(*x);
            du.write(d * x * s);
            dg.write(d * u * s * (1.0 + x * (1.0 - s)));
        }
    }
}

/// [`host_swiglu_forward`] on a CPU backend's tensors.
pub fn host_swiglu<B: HostTensors>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let place = place_of::<B>(&gate);
    let (g, dims) = B::host_f32::<1>(&gate);
    let (u, _) = B::host_f32::<1>(&up);
    to_device::<B, 1>(host_swiglu_forward(&g, &u), dims, &place)
}

/// [`host_swiglu_backward`] on a CPU backend's tensors.
pub fn host_swiglu_grad<B: HostTensors>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let place = place_of::<B>(&gate);
    let (g, dims) = B::host_f32::<1>(&gate);
    let (u, _) = B::host_f32::<1>(&up);
    let (d, _) = B::host_f32::<1>(&d_out);
    let (dg, du) = host_swiglu_backward(&g, &u, &d);
    (to_device::<B, 1>(dg, dims, &place), to_device::<B, 1>(du, dims, &place))
}

// ---------------------------------------------------------------------------------------------
// Linear layer with a LoRA adapter

/// `x·Wᵀ + b + s·(x_a·Aᵀ)·Bᵀ` as one op, differentiable in `x`, `x_a`, `A` and `B` (`W` and `b`
/// are the frozen base's constants). `x_a` is the adapter's input (`x` after dropout); `None`
/// means `x` itself.
///
/// Composed from burn's ops the adapter branch costs two more passes over the `[rows, out]`
/// output forward (the scale and the sum) and, backward, one over the output's gradient and a
/// sum of two `[rows, in]` input gradients. As one op the low-rank product is added into the
/// base product by the matmul itself (`x_a·Aᵀ` is `[rows, r]`), and backward computes
/// `∂x = g·W + s·(g·B)·A` in place, `∂A = s·(g·B)ᵀ·x_a`, `∂B = s·gᵀ·(x_a·Aᵀ)`, keeping only
/// `x_a·Aᵀ` besides the inputs.
///
/// # Shapes
/// - `x`, `x_a`: `[rows, in]`; `weight`: `[out, in]`; `bias`: `[out]`; `lora_a`: `[r, in]`;
///   `lora_b`: `[out, r]`; output: `[rows, out]`
pub fn lora_linear<B: EmberBackend>(
    x: Tensor<B, 2>,
    x_adapter: Option<Tensor<B, 2>>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora_a: Tensor<B, 2>,
    lora_b: Tensor<B, 2>,
    scaling: f32,
) -> Tensor<B, 2> {
    let weight = LoraBase::Dense(prim(weight.detach()));
    lora_linear_on(x, x_adapter, weight, bias, lora_a, lora_b, scaling)
}

/// [`lora_linear`] on a base weight of either kind ([`LoraBase`]): host blocks are multiplied
/// by their own kernels (the AMX tiles for bf16 where the CPU has them), inside the same op.
///
/// # Shapes
/// As [`lora_linear`].
pub fn lora_linear_on<B: EmberBackend>(
    x: Tensor<B, 2>,
    x_adapter: Option<Tensor<B, 2>>,
    weight: LoraBase<B>,
    bias: Option<Tensor<B, 1>>,
    lora_a: Tensor<B, 2>,
    lora_b: Tensor<B, 2>,
    scaling: f32,
) -> Tensor<B, 2> {
    let operands = LoraOperands {
        weight,
        bias: bias.map(|b| prim(b.detach())),
        scaling,
    };
    float(B::fused_lora_linear(
        prim(x),
        x_adapter.map(prim),
        prim(lora_a),
        prim(lora_b),
        operands,
    ))
}

/// The frozen base weight `[out, in]` of a [`lora_linear`] call.
#[derive(Debug, Clone)]
pub enum LoraBase<B: Backend> {
    /// A float tensor in the activations' dtype.
    Dense(FloatTensor<B>),
    /// Host blocks (quantized, or bf16 on a CPU backend without bf16 tensors): multiplied by
    /// their own kernels on CPU backends, dequantized on devices.
    Blocks(Arc<QuantMatrix>),
}

/// The constants of a [`lora_linear`] call: the frozen base weight `[out, in]` and bias
/// `[out]`, and the adapter's scale.
#[derive(Debug, Clone)]
pub struct LoraOperands<B: Backend> {
    /// `[out, in]`.
    pub weight: LoraBase<B>,
    /// `[out]`.
    pub bias: Option<FloatTensor<B>>,
    /// `s`.
    pub scaling: f32,
}

/// The base weight as a tensor on `like`'s device, in its dtype (blocks dequantized there).
fn device_weight<B: Backend>(weight: &LoraBase<B>, like: &Tensor<B, 2>) -> Tensor<B, 2> {
    match weight {
        LoraBase::Dense(w) => float::<B, 2>(w.clone()),
        LoraBase::Blocks(q) => crate::quant::device_dequantize::<B>(q, &like.device()).cast(like.dtype()),
    }
}

/// [`lora_linear`]'s output and `x_a·Aᵀ` `[rows, r]` (what its backward pass keeps),
/// composed from burn's ops.
pub fn device_lora_linear<B: Backend>(
    x: FloatTensor<B>,
    x_adapter: Option<FloatTensor<B>>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    operands: &LoraOperands<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = float::<B, 2>(x);
    let x_adapter = x_adapter.map(float::<B, 2>).unwrap_or_else(|| x.clone());
    let weight = device_weight(&operands.weight, &x);
    let mut out = x.matmul(weight.transpose());
    if let Some(bias) = &operands.bias {
        out = out + float::<B, 1>(bias.clone()).unsqueeze::<2>();
    }
    let low = x_adapter.matmul(float::<B, 2>(lora_a).transpose());
    let delta = low.clone().matmul(float::<B, 2>(lora_b).transpose());
    (prim(out + delta.mul_scalar(operands.scaling)), prim(low))
}

/// The gradients of [`lora_linear`], from the output's gradient `g`.
#[derive(Debug)]
pub struct LoraGrads<B: Backend> {
    /// `g·W`, plus `s·(g·B)·A` when the adapter's input is `x` itself ([`InputGrad`]).
    pub x: Option<FloatTensor<B>>,
    /// `s·(g·B)·A` when the adapter has an input of its own.
    pub x_adapter: Option<FloatTensor<B>>,
    /// `s·(g·B)ᵀ·x_a`, `[r, in]`.
    pub lora_a: FloatTensor<B>,
    /// `s·gᵀ·(x_a·Aᵀ)`, `[out, r]`.
    pub lora_b: FloatTensor<B>,
}

/// Which input gradients a [`lora_linear`] backward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputGrad {
    /// None: the input is not tracked (the adapter's gradients only).
    None,
    /// `∂x`, the base's and the adapter's parts summed (the adapter reads `x` itself).
    Sum,
    /// `∂x` of the base and `∂x_a` of the adapter apart (the adapter reads `x` after dropout).
    Separate,
}

/// [`LoraGrads`] composed from burn's ops.
pub fn device_lora_linear_backward<B: Backend>(
    x_adapter: FloatTensor<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    low: FloatTensor<B>,
    operands: &LoraOperands<B>,
    d_out: FloatTensor<B>,
    input: InputGrad,
) -> LoraGrads<B> {
    let s = operands.scaling;
    let g = float::<B, 2>(d_out);
    let (a, b) = (float::<B, 2>(lora_a), float::<B, 2>(lora_b));
    let g_b = g.clone().matmul(b).mul_scalar(s);
    let d_lora_a = g_b.clone().transpose().matmul(float::<B, 2>(x_adapter));
    let d_lora_b = g.clone().transpose().matmul(float::<B, 2>(low)).mul_scalar(s);
    let base = || g.clone().matmul(device_weight(&operands.weight, &g));
    let (x, x_adapter) = match input {
        InputGrad::None => (None, None),
        InputGrad::Sum => (Some(prim(base() + g_b.matmul(a))), None),
        InputGrad::Separate => (Some(prim(base())), Some(prim(g_b.matmul(a)))),
    };
    LoraGrads {
        x,
        x_adapter,
        lora_a: prim(d_lora_a),
        lora_b: prim(d_lora_b),
    }
}

/// A [`LoraBase`] read on the host.
#[derive(Debug)]
pub enum HostBase<'a> {
    /// A float matrix `[out, in]`.
    Matrix(HostMatrix<'a>),
    /// Host blocks `[out, in]`.
    Blocks(&'a QuantMatrix),
}

impl HostBase<'_> {
    /// `base` of a CPU backend, read in place where its storage allows.
    pub fn of<B: HostTensors>(base: &LoraBase<B>) -> HostBase<'_> {
        match base {
            LoraBase::Dense(w) => HostBase::Matrix(B::host_matrix(w)),
            LoraBase::Blocks(q) => HostBase::Blocks(q),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            HostBase::Matrix(w) => w.dims,
            HostBase::Blocks(q) => q.shape(),
        }
    }
}

/// Every row of `out` (`[rows, bias.len()]`) set to `bias`, or `bias` added to it
/// (`accumulate`), on the whole thread pool.
fn add_bias_rows(out: &mut [f32], bias: &[f32], accumulate: bool) {
    let width = bias.len();
    out.par_chunks_mut(width.max(1) * task_rows(width)).for_each(|rows| {
        for row in rows.chunks_exact_mut(width.max(1)) {
            if accumulate {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            } else {
                row.copy_from_slice(bias);
            }
        }
    });
}

/// [`lora_linear`] on host values: `(out, x_a·Aᵀ)`. The base and adapter products run on the
/// whole thread pool; the adapter's is added into the base's by the matmul (no pass of its own).
pub fn host_lora_linear_forward(
    x: &HostMatrix<'_>,
    x_adapter: Option<&HostMatrix<'_>>,
    weight: &HostBase<'_>,
    bias: Option<&[f32]>,
    lora_a: &HostMatrix<'_>,
    lora_b: &HostMatrix<'_>,
    scaling: f32,
) -> (Vec<f32>, Vec<f32>) {
    let [rows, _] = x.dims;
    let out_dim = weight.dims()[0];
    let r = lora_a.dims[0];
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_dim, "bias of {} for {out_dim} outputs", bias.len());
    }
    let mut out = match weight {
        HostBase::Matrix(weight) => match bias {
            Some(bias) => {
                let mut out = vec![0f32; rows * out_dim];
                add_bias_rows(&mut out, bias, false);
                matmul_into(&mut out, true, x, &weight.t(), 1.0);
                out
            }
            None => matmul_new(x, &weight.t(), 1.0),
        },
        HostBase::Blocks(blocks) => {
            let mut out = blocks.matmul_transposed(&x.row_major_values(), rows);
            if let Some(bias) = bias {
                add_bias_rows(&mut out, bias, true);
            }
            out
        }
    };
    let low = matmul_new(x_adapter.unwrap_or(x), &lora_a.t(), 1.0);
    matmul_into(
        &mut out,
        true,
        &HostMatrix::row_major(&low, [rows, r]),
        &lora_b.t(),
        scaling,
    );
    (out, low)
}

/// [`LoraGrads`] on host values: `(∂x, ∂x_a, ∂A, ∂B)`, the first two as `input` asks.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn host_lora_linear_backward(
    x_adapter: &HostMatrix<'_>,
    weight: &HostBase<'_>,
    lora_a: &HostMatrix<'_>,
    lora_b: &HostMatrix<'_>,
    low: &[f32],
    scaling: f32,
    d_out: &HostMatrix<'_>,
    input: InputGrad,
) -> (Option<Vec<f32>>, Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let rows = x_adapter.dims[0];
    let r = lora_b.dims[1];
    // s·(g·B), [rows, r]
    let g_b = matmul_new(d_out, lora_b, scaling);
    let g_b = HostMatrix::row_major(&g_b, [rows, r]);
    // g·W
    let base_grad = || match weight {
        HostBase::Matrix(weight) => matmul_new(d_out, weight, 1.0),
        HostBase::Blocks(blocks) => blocks.matmul(&d_out.row_major_values(), rows),
    };
    let (d_x, d_adapter) = match input {
        InputGrad::None => (None, None),
        InputGrad::Sum => {
            let mut d_x = base_grad();
            matmul_into(&mut d_x, true, &g_b, lora_a, 1.0);
            (Some(d_x), None)
        }
        InputGrad::Separate => (Some(base_grad()), Some(matmul_new(&g_b, lora_a, 1.0))),
    };
    let d_lora_a = matmul_new(&g_b.t(), x_adapter, 1.0);
    let d_lora_b = matmul_new(&d_out.t(), &HostMatrix::row_major(low, [rows, r]), scaling);
    (d_x, d_adapter, d_lora_a, d_lora_b)
}

/// [`host_lora_linear_forward`] on a CPU backend's tensors.
pub fn host_lora_linear<B: HostTensors>(
    x: FloatTensor<B>,
    x_adapter: Option<FloatTensor<B>>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    operands: &LoraOperands<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let place = place_of::<B>(&x);
    let xh = B::host_matrix(&x);
    let xa = x_adapter.as_ref().map(B::host_matrix);
    let w = HostBase::of::<B>(&operands.weight);
    let bias = operands.bias.as_ref().map(B::host_f32::<1>);
    let (a, b) = (B::host_matrix(&lora_a), B::host_matrix(&lora_b));
    let (rows, out_dim, r) = (xh.dims[0], w.dims()[0], a.dims[0]);
    let (out, low) = host_lora_linear_forward(
        &xh,
        xa.as_ref(),
        &w,
        bias.as_ref().map(|(b, _)| &**b),
        &a,
        &b,
        operands.scaling,
    );
    (
        to_device::<B, 2>(out, [rows, out_dim], &place),
        to_device::<B, 2>(low, [rows, r], &place),
    )
}

/// [`host_lora_linear_backward`] on a CPU backend's tensors.
pub fn host_lora_linear_grad<B: HostTensors>(
    x_adapter: FloatTensor<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    low: FloatTensor<B>,
    operands: &LoraOperands<B>,
    d_out: FloatTensor<B>,
    input: InputGrad,
) -> LoraGrads<B> {
    let place = place_of::<B>(&x_adapter);
    let xa = B::host_matrix(&x_adapter);
    let w = HostBase::of::<B>(&operands.weight);
    let (a, b) = (B::host_matrix(&lora_a), B::host_matrix(&lora_b));
    let (low, _) = B::host_f32::<2>(&low);
    let g = B::host_matrix(&d_out);
    let (d_x, d_adapter, d_a, d_b) = host_lora_linear_backward(&xa, &w, &a, &b, &low, operands.scaling, &g, input);
    LoraGrads {
        x: d_x.map(|d| to_device::<B, 2>(d, xa.dims, &place)),
        x_adapter: d_adapter.map(|d| to_device::<B, 2>(d, xa.dims, &place)),
        lora_a: to_device::<B, 2>(d_a, a.dims, &place),
        lora_b: to_device::<B, 2>(d_b, b.dims, &place),
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy of logits

/// What [`EmberBackend::fused_cross_entropy`] computes of a chunk of logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropySpec {
    /// The logits are `cap·tanh(·/cap)` of the head's output (a final softcap): the gradient is
    /// taken through it, with respect to the head's output.
    pub softcap: Option<f32>,
    /// Also return `∂(Σ nll)/∂logits`.
    pub gradient: bool,
}

/// Negative log-likelihood `logsumexp(z) − z[y]` of each row's target and, with
/// `spec.gradient`, `softmax(z) − onehot(y)` (times `1 − (z/cap)²` under a final softcap).
///
/// # Shapes
/// - `logits`: `[rows, vocab]`; `targets`: host `[rows]`
/// - output: `[rows]` and `[rows, vocab]`
pub fn device_cross_entropy<B: Backend>(
    logits: FloatTensor<B>,
    targets: &[i64],
    spec: CrossEntropySpec,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let logits = float::<B, 2>(logits);
    let [rows, _] = logits.dims();
    let device = logits.device();
    let targets = Tensor::<B, 2, burn::tensor::Int>::from_data(TensorData::new(targets.to_vec(), [rows, 1]), &device);
    let cap_slope = match spec.softcap.filter(|_| spec.gradient) {
        Some(cap) => {
            let tanh = logits.clone().div_scalar(cap);
            Some(tanh.clone().mul(tanh).neg().add_scalar(1.0))
        }
        None => None,
    };
    let target_logit = logits.clone().gather(1, targets.clone());
    let max = logits.clone().max_dim(1);
    let exp = logits.sub(max.clone()).exp();
    let total = exp.clone().sum_dim(1);
    let nll = total.clone().log().add(max).sub(target_logit).reshape([rows]);
    let grad = spec.gradient.then(|| {
        let minus_one = Tensor::<B, 2>::full([rows, 1], -1.0, &device);
        let dz = exp
            .div(total)
            .scatter(1, targets, minus_one, burn::tensor::IndexingUpdateOp::Add);
        prim(match cap_slope {
            Some(slope) => dz.mul(slope),
            None => dz,
        })
    });
    (prim(nll), grad)
}

/// [`device_cross_entropy`] on contiguous host rows, parallel over rows (one pass for the
/// maximum, one for the exponentials and their sum, one for the gradient).
///
/// # Panics
/// When a target is outside `0..vocab`.
pub fn host_cross_entropy_rows(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    spec: CrossEntropySpec,
) -> (Vec<f32>, Vec<f32>) {
    let rows = targets.len();
    assert_eq!(
        logits.len(),
        rows * vocab,
        "{} logits for {rows} targets over a vocabulary of {vocab}",
        logits.len()
    );
    let mut nll = vec![0f32; rows];
    let mut grad = unwritten(if spec.gradient { logits.len() } else { 0 });
    let row_nll = |z: &[f32], y: i64, dz: Option<&mut [MaybeUninit<f32>]>| -> f32 {
        let y = usize::try_from(y)
            .ok()
            .filter(|&y| y < vocab)
            .unwrap_or_else(|| panic!("target {y} outside the vocabulary of {vocab}"));
        cross_entropy_row(z, y, dz, spec.softcap)
    };
    if spec.gradient {
        nll.par_iter_mut()
            .zip(grad.par_chunks_mut(vocab))
            .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
            .for_each(|((nll, dz), (z, &y))| *nll = row_nll(z, y, Some(dz)));
    } else {
        nll.par_iter_mut()
            .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
            .for_each(|(nll, (z, &y))| *nll = row_nll(z, y, None));
    }
    // SAFETY: with a gradient, `grad` has `rows` rows of `vocab` (checked above), each paired
    // with one target and written whole by `cross_entropy_row`; without, it is empty.
    (nll, unsafe { written(grad) })
}

crate::simd::multiversion! {
    /// One row of [`host_cross_entropy_rows`]: the negative log-likelihood of target `y`
    /// (checked by the caller) and, with `dz`, its gradient (vectorised for the CPU, see
    /// [`crate::simd`]).
    fn cross_entropy_row(z: &[f32], y: usize, dz: Option<&mut [MaybeUninit<f32>]>, softcap: Option<f32>) -> f32 {
        let max = crate::simd::lane_max(z);
        let nll_of = |total: f32| total.ln() + max - z[y];
        match dz {
            None => nll_of(lane_sum(z.iter().map(|&v| crate::attention::fast_exp(v - max)))),
            Some(dz) => {
                assert_eq!(dz.len(), z.len(), "gradient row of {} for {} logits", dz.len(), z.len());
                dz.iter_mut()
                    .zip(z)
                    .for_each(|(d, &v)| _ = d.write(crate::attention::fast_exp(v - max)));
                // SAFETY: the pass above wrote every value (as long as `z`, checked).
                let dz = unsafe { written_slice(dz) };
                let total = lane_sum(dz.iter().copied());
                let inv = 1.0 / total;
                match softcap {
                    Some(cap) => dz.iter_mut().zip(z).for_each(|(d, &v)| {
                        let t = v / cap;
                        *d *= inv * (1.0 - t * t);
                    }),
                    None => dz.iter_mut().for_each(|d| *d *= inv),
                }
                let slope = softcap.map_or(1.0, |cap| 1.0 - (z[y] / cap) * (z[y] / cap));
                dz[y] -= slope;
                nll_of(total)
            }
        }
    }
}

/// [`host_cross_entropy_rows`] on a CPU backend's tensors.
pub fn host_cross_entropy<B: HostTensors>(
    logits: FloatTensor<B>,
    targets: &[i64],
    spec: CrossEntropySpec,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let place = place_of::<B>(&logits);
    let (z, dims) = B::host_f32::<2>(&logits);
    let (nll, grad) = host_cross_entropy_rows(&z, dims[1], targets, spec);
    (
        to_device::<B, 1>(nll, [dims[0]], &place),
        spec.gradient.then(|| to_device::<B, 2>(grad, dims, &place)),
    )
}

// ---------------------------------------------------------------------------------------------

pub(crate) mod autodiff {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::ops::FloatTensor;

    use super::{InputGrad, LoraBase, LoraOperands, RotaryPairs};
    use crate::quant::EmberBackend;

    #[derive(Debug)]
    struct RmsNormBackward;

    impl<B: EmberBackend> Backward<B, 1> for RmsNormBackward {
        /// `x`, the weight, ε.
        type State = (FloatTensor<B>, FloatTensor<B>, f64);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node] = ops.parents;
            let d_out = grads.consume::<B>(&ops.node);
            let (x, weight, eps) = ops.state;
            if let Some(node) = node {
                grads.register::<B>(node.id, B::fused_rms_norm_backward(x, weight, eps, d_out));
            }
        }
    }

    /// [`EmberBackend::fused_rms_norm`] under autodiff.
    pub(crate) fn rms_norm<B: EmberBackend, C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<B, C>>,
        weight: FloatTensor<Autodiff<B, C>>,
        eps: f64,
    ) -> FloatTensor<Autodiff<B, C>> {
        let weight = Autodiff::<B, C>::inner(weight);
        match RmsNormBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_rms_norm(x.primitive.clone(), weight.clone(), eps);
                prep.finish((x.primitive, weight, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rms_norm(x.primitive, weight, eps)),
        }
    }

    #[derive(Debug)]
    struct RopeBackward;

    impl<B: EmberBackend> Backward<B, 1> for RopeBackward {
        /// The cos and sin tables and the pairing.
        type State = (FloatTensor<B>, FloatTensor<B>, RotaryPairs);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node] = ops.parents;
            let d_out = grads.consume::<B>(&ops.node);
            let (cos, sin, pairs) = ops.state;
            if let Some(node) = node {
                grads.register::<B>(node.id, B::fused_rope(d_out, cos, sin, pairs, true));
            }
        }
    }

    /// [`EmberBackend::fused_rope`] under autodiff (linear in `x`: the backward pass is the
    /// adjoint rotation of the gradient).
    pub(crate) fn rope<B: EmberBackend, C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<B, C>>,
        cos: FloatTensor<Autodiff<B, C>>,
        sin: FloatTensor<Autodiff<B, C>>,
        pairs: RotaryPairs,
        transpose: bool,
    ) -> FloatTensor<Autodiff<B, C>> {
        let (cos, sin) = (Autodiff::<B, C>::inner(cos), Autodiff::<B, C>::inner(sin));
        let forward = |x| B::fused_rope(x, cos.clone(), sin.clone(), pairs, transpose);
        match RopeBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = forward(x.primitive);
                prep.finish((cos.clone(), sin.clone(), pairs), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
        }
    }

    #[derive(Debug)]
    struct SwigluBackward;

    impl<B: EmberBackend> Backward<B, 2> for SwigluBackward {
        /// The gate and up inputs.
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_gate, node_up] = ops.parents;
            let d_out = grads.consume::<B>(&ops.node);
            let (gate, up) = ops.state;
            let (d_gate, d_up) = B::fused_swiglu_backward(gate, up, d_out);
            for (node, grad) in [(node_gate, d_gate), (node_up, d_up)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    /// [`EmberBackend::fused_swiglu`] under autodiff.
    pub(crate) fn swiglu<B: EmberBackend, C: CheckpointStrategy>(
        gate: FloatTensor<Autodiff<B, C>>,
        up: FloatTensor<Autodiff<B, C>>,
    ) -> FloatTensor<Autodiff<B, C>> {
        match SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_swiglu(gate.primitive.clone(), up.primitive.clone());
                prep.finish((gate.primitive, up.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_swiglu(gate.primitive, up.primitive)),
        }
    }
    /// The backward pass of [`lora_linear`] with `N` parents: `x`, `A`, `B` (`N = 3`, the
    /// adapter reads `x`) or `x`, `x_a`, `A`, `B` (`N = 4`).
    #[derive(Debug)]
    struct LoraLinearBackward<const N: usize>;

    impl<B: EmberBackend, const N: usize> Backward<B, N> for LoraLinearBackward<N> {
        /// The adapter's input, A, B, `x_a·Aᵀ` and the constants.
        type State = (
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            LoraOperands<B>,
        );

        fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
            let d_out = grads.consume::<B>(&ops.node);
            let (x_adapter, lora_a, lora_b, low, operands) = ops.state;
            let parents = ops.parents;
            let (node_x, node_adapter) = (parents[0].clone(), if N == 4 { parents[1].clone() } else { None });
            let (node_a, node_b) = (parents[N - 2].clone(), parents[N - 1].clone());
            let input = match (N, &node_x) {
                (_, None) => InputGrad::None,
                (3, Some(_)) => InputGrad::Sum,
                _ => InputGrad::Separate,
            };
            let d = B::fused_lora_linear_backward(x_adapter, lora_a, lora_b, low, &operands, d_out, input);
            for (node, grad) in [
                (node_x, d.x),
                (node_adapter, d.x_adapter),
                (node_a, Some(d.lora_a)),
                (node_b, Some(d.lora_b)),
            ] {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    /// [`EmberBackend::fused_lora_linear`] under autodiff.
    pub(crate) fn lora_linear<B: EmberBackend, C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<B, C>>,
        x_adapter: Option<FloatTensor<Autodiff<B, C>>>,
        lora_a: FloatTensor<Autodiff<B, C>>,
        lora_b: FloatTensor<Autodiff<B, C>>,
        operands: LoraOperands<Autodiff<B, C>>,
    ) -> FloatTensor<Autodiff<B, C>> {
        let operands = LoraOperands {
            weight: match operands.weight {
                LoraBase::Dense(w) => LoraBase::Dense(Autodiff::<B, C>::inner(w)),
                LoraBase::Blocks(q) => LoraBase::Blocks(q),
            },
            bias: operands.bias.map(Autodiff::<B, C>::inner),
            scaling: operands.scaling,
        };
        let forward = |x, x_adapter, a, b| B::fused_lora_linear_forward(x, x_adapter, a, b, &operands);
        match x_adapter {
            None => match LoraLinearBackward::<3>
                .prepare::<C>([x.node.clone(), lora_a.node.clone(), lora_b.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (out, low) = forward(
                        x.primitive.clone(),
                        None,
                        lora_a.primitive.clone(),
                        lora_b.primitive.clone(),
                    );
                    prep.finish(
                        (x.primitive, lora_a.primitive, lora_b.primitive, low, operands.clone()),
                        out,
                    )
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(forward(x.primitive, None, lora_a.primitive, lora_b.primitive).0)
                }
            },
            Some(x_adapter) => match LoraLinearBackward::<4>
                .prepare::<C>([
                    x.node.clone(),
                    x_adapter.node.clone(),
                    lora_a.node.clone(),
                    lora_b.node.clone(),
                ])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (out, low) = forward(
                        x.primitive,
                        Some(x_adapter.primitive.clone()),
                        lora_a.primitive.clone(),
                        lora_b.primitive.clone(),
                    );
                    prep.finish(
                        (
                            x_adapter.primitive,
                            lora_a.primitive,
                            lora_b.primitive,
                            low,
                            operands.clone(),
                        ),
                        out,
                    )
                }
                OpsKind::UnTracked(prep) => prep.finish(
                    forward(
                        x.primitive,
                        Some(x_adapter.primitive),
                        lora_a.primitive,
                        lora_b.primitive,
                    )
                    .0,
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::*;
    use crate::attention::tests::{random, tensor};

    type Cpu = NdArray<f32>;
    type Grad = Autodiff<Cpu>;

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    /// Largest `|a − b| / (1 + |b|)`.
    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0.0, f32::max)
    }

    /// The value and `∂x` (against a random output gradient) of `f` under autodiff.
    fn value_and_grad<const D: usize>(
        x: Vec<f32>,
        dims: [usize; D],
        seed: u64,
        f: impl Fn(Tensor<Grad, D>) -> Tensor<Grad, D>,
    ) -> (Vec<f32>, Vec<f32>) {
        let x = tensor::<Grad, D>(x, dims).require_grad();
        let out = f(x.clone());
        let g = tensor::<Grad, D>(random(out.shape().num_elements(), seed, 1.0), out.dims());
        let grads = (out.clone() * g).sum().backward();
        (values(out), values(x.grad(&grads).unwrap()))
    }

    /// The eager RMSNorm the model composed before the fused op.
    fn eager_rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
        let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
        (x * variance.add_scalar(eps).sqrt().recip()) * w.unsqueeze::<D>()
    }

    #[test]
    fn rms_norm_and_its_gradient_match_autodiff_of_the_eager_composition() {
        let dims = [3, 5, 40];
        let x = random(600, 1, 2.0);
        let w = random(40, 2, 1.5);
        let eps = 1e-6;
        let (want, want_dx) = value_and_grad(x.clone(), dims, 3, |x| {
            eager_rms_norm(x, tensor::<Grad, 1>(w.clone(), [40]), eps)
        });
        let (got, got_dx) = value_and_grad(x.clone(), dims, 3, |x| {
            rms_norm(x, tensor::<Grad, 1>(w.clone(), [40]), eps)
        });
        assert!(max_rel(&got, &want) < 1e-6, "value {}", max_rel(&got, &want));
        assert!(max_rel(&got_dx, &want_dx) < 1e-5, "grad {}", max_rel(&got_dx, &want_dx));
        // the device composition (GPU backends) against the host kernels
        let x2 = tensor::<Cpu, 2>(x, [15, 40]);
        let w1 = tensor::<Cpu, 1>(w, [40]);
        let g = tensor::<Cpu, 2>(random(600, 3, 1.0), [15, 40]);
        let device = values(float::<Cpu, 2>(device_rms_norm::<Cpu>(
            prim(x2.clone()),
            prim(w1.clone()),
            eps,
        )));
        assert!(max_rel(&device, &want) < 1e-6);
        let device_dx = values(float::<Cpu, 2>(device_rms_norm_backward::<Cpu>(
            prim(x2),
            prim(w1),
            eps,
            prim(g),
        )));
        assert!(
            max_rel(&device_dx, &want_dx) < 1e-5,
            "device grad {}",
            max_rel(&device_dx, &want_dx)
        );
    }

    /// The eager rotary embedding the model composed before the fused op.
    fn eager_rope<B: Backend>(
        x: Tensor<B, 4>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        interleaved: bool,
    ) -> Tensor<B, 4> {
        let [batch, heads, seq, head_dim] = x.dims();
        let rotary = cos.dims()[3];
        let rot = x.clone().narrow(3, 0, rotary);
        let half = rotary / 2;
        let rotated = if interleaved {
            let pairs = rot.clone().reshape([batch, heads, seq, half, 2]);
            let x1 = pairs.clone().narrow(4, 0, 1);
            let x2 = pairs.narrow(4, 1, 1);
            Tensor::cat(vec![x2.neg(), x1], 4).reshape([batch, heads, seq, rotary])
        } else {
            let x1 = rot.clone().narrow(3, 0, half);
            let x2 = rot.clone().narrow(3, half, half);
            Tensor::cat(vec![x2.neg(), x1], 3)
        };
        let out = rot * cos + rotated * sin;
        if rotary < head_dim {
            Tensor::cat(vec![out, x.narrow(3, rotary, head_dim - rotary)], 3)
        } else {
            out
        }
    }

    /// Tables as the model builds them (each pair one angle), per batch row or shared.
    fn tables(table_batch: usize, seq: usize, rotary: usize, interleaved: bool) -> (Vec<f32>, Vec<f32>) {
        let half = rotary / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for b in 0..table_batch {
            for t in 0..seq {
                for j in 0..rotary {
                    let i = if interleaved { j / 2 } else { j % half };
                    let angle = (t + 3 * b) as f32 * 10f32.powf(-(i as f32) / half as f32);
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (cos, sin)
    }

    #[test]
    fn rope_and_its_gradient_match_autodiff_of_the_eager_composition() {
        for (interleaved, rotary, table_batch) in [(false, 8, 1), (false, 4, 2), (true, 8, 2), (true, 6, 1)] {
            let dims = [2, 3, 5, 8];
            let x = random(240, 7, 1.0);
            let (cos, sin) = tables(table_batch, 5, rotary, interleaved);
            let table = |v: &Vec<f32>| tensor::<Grad, 4>(v.clone(), [table_batch, 1, 5, rotary]);
            let pairs = if interleaved {
                RotaryPairs::Interleaved
            } else {
                RotaryPairs::Halves
            };
            let (want, want_dx) = value_and_grad(x.clone(), dims, 8, |x| {
                eager_rope(x, table(&cos), table(&sin), interleaved)
            });
            let (got, got_dx) = value_and_grad(x.clone(), dims, 8, |x| rope(x, table(&cos), table(&sin), pairs));
            let case = format!("interleaved {interleaved}, rotary {rotary}, table batch {table_batch}");
            assert!(max_rel(&got, &want) < 1e-6, "{case}: value {}", max_rel(&got, &want));
            assert!(
                max_rel(&got_dx, &want_dx) < 1e-6,
                "{case}: grad {}",
                max_rel(&got_dx, &want_dx)
            );
            // the device composition and its adjoint
            let t = |v: &Vec<f32>| prim(tensor::<Cpu, 4>(v.clone(), [table_batch, 1, 5, rotary]));
            let xc = prim(tensor::<Cpu, 4>(x, dims));
            let device = values(float::<Cpu, 4>(device_rope::<Cpu>(xc, t(&cos), t(&sin), pairs, false)));
            assert!(max_rel(&device, &want) < 1e-6, "{case}: device value");
            let g = prim(tensor::<Cpu, 4>(random(240, 8, 1.0), dims));
            let device_dx = values(float::<Cpu, 4>(device_rope::<Cpu>(g, t(&cos), t(&sin), pairs, true)));
            assert!(max_rel(&device_dx, &want_dx) < 1e-6, "{case}: device grad");
        }
    }

    #[test]
    fn cross_entropy_and_its_gradient_match_autodiff_through_log_softmax() {
        let (rows, vocab) = (5, 37);
        let targets: Vec<i64> = vec![0, 36, 5, 17, 5];
        for softcap in [None, Some(3.0f32)] {
            let raw = random(rows * vocab, 21, 8.0);
            // the reference: autodiff of Σ −log_softmax(cap·tanh(x/cap))[y] with respect to x
            let x = tensor::<Grad, 2>(raw.clone(), [rows, vocab]).require_grad();
            let z = match softcap {
                Some(cap) => x.clone().div_scalar(cap).tanh().mul_scalar(cap),
                None => x.clone(),
            };
            let index = Tensor::<Grad, 2, burn::tensor::Int>::from_data(
                TensorData::new(targets.clone(), [rows, 1]),
                &Default::default(),
            );
            let want_nll = burn::tensor::activation::log_softmax(z.clone(), 1)
                .gather(1, index)
                .reshape([rows])
                .neg();
            let grads = want_nll.clone().sum().backward();
            let want_grad = values(x.grad(&grads).unwrap());
            let want_nll = values(want_nll);
            let spec = CrossEntropySpec {
                softcap,
                gradient: true,
            };
            let z = values(z);
            let (nll, grad) = host_cross_entropy_rows(&z, vocab, &targets, spec);
            assert!(
                max_rel(&nll, &want_nll) < 1e-5,
                "{softcap:?}: nll {}",
                max_rel(&nll, &want_nll)
            );
            assert!(
                max_rel(&grad, &want_grad) < 1e-6,
                "{softcap:?}: grad {}",
                max_rel(&grad, &want_grad)
            );
            let (nll_only, none) = host_cross_entropy_rows(
                &z,
                vocab,
                &targets,
                CrossEntropySpec {
                    softcap,
                    gradient: false,
                },
            );
            assert!(none.is_empty() && nll_only == nll);
            let zc = prim(tensor::<Cpu, 2>(z.clone(), [rows, vocab]));
            let (dn, dg) = device_cross_entropy::<Cpu>(zc, &targets, spec);
            assert!(max_rel(&values(float::<Cpu, 1>(dn)), &want_nll) < 1e-5);
            assert!(max_rel(&values(float::<Cpu, 2>(dg.unwrap())), &want_grad) < 1e-6);
        }
    }

    #[test]
    fn tensors_computed_from_a_tracked_leaf_are_tracked() {
        let leaf = tensor::<Grad, 2>(random(6, 1, 1.0), [2, 3]).require_grad();
        let derived = leaf.clone().reshape([3, 2]).mul_scalar(2.0);
        assert!(crate::is_tracked(&leaf) && crate::is_tracked(&derived));
        assert!(!derived.is_require_grad(), "burn's own check answers for leaves only");
        assert!(!crate::is_tracked(&derived.detach()));
        assert!(!crate::is_tracked(
            &tensor::<Grad, 2>(random(6, 1, 1.0), [2, 3]).mul_scalar(2.0)
        ));
        assert!(!crate::is_tracked(&tensor::<Cpu, 2>(random(6, 1, 1.0), [2, 3])));
    }

    #[test]
    fn swiglu_and_its_gradients_match_autodiff_of_silu_times_up() {
        let dims = [4, 3, 50];
        let (gate, up) = (random(600, 11, 6.0), random(600, 12, 2.0));
        let g = random(600, 13, 1.0);
        let run = |fused: bool| {
            let gate = tensor::<Grad, 3>(gate.clone(), dims).require_grad();
            let up = tensor::<Grad, 3>(up.clone(), dims).require_grad();
            let out = if fused {
                swiglu(gate.clone(), up.clone())
            } else {
                burn::tensor::activation::silu(gate.clone()) * up.clone()
            };
            let grads = (out.clone() * tensor::<Grad, 3>(g.clone(), dims)).sum().backward();
            (
                values(out),
                values(gate.grad(&grads).unwrap()),
                values(up.grad(&grads).unwrap()),
            )
        };
        let (want, want_dg, want_du) = run(false);
        let (got, got_dg, got_du) = run(true);
        assert!(max_rel(&got, &want) < 1e-6, "value {}", max_rel(&got, &want));
        assert!(
            max_rel(&got_dg, &want_dg) < 1e-6,
            "d gate {}",
            max_rel(&got_dg, &want_dg)
        );
        assert!(max_rel(&got_du, &want_du) < 1e-6, "d up {}", max_rel(&got_du, &want_du));
        let p = |v: &Vec<f32>| prim(tensor::<Cpu, 1>(v.clone(), [600]));
        let device = values(float::<Cpu, 1>(device_swiglu::<Cpu>(p(&gate), p(&up))));
        assert!(max_rel(&device, &want) < 1e-6);
        let (dg, du) = device_swiglu_backward::<Cpu>(p(&gate), p(&up), p(&g));
        assert!(max_rel(&values(float::<Cpu, 1>(dg)), &want_dg) < 1e-6);
        assert!(max_rel(&values(float::<Cpu, 1>(du)), &want_du) < 1e-6);
    }

    /// Asserts `max_rel(got, want) < tol`, naming `what` and the difference.
    fn assert_rel(what: &str, got: &[f32], want: &[f32], tol: f32) {
        let d = max_rel(got, want);
        assert!(d < tol, "{what}: {d}");
    }

    /// The eager composition [`crate::LoraLinear`] ran before the fused op.
    fn eager_lora<B: Backend>(
        x: Tensor<B, 2>,
        x_adapter: Tensor<B, 2>,
        w: Tensor<B, 2>,
        bias: Tensor<B, 1>,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        s: f32,
    ) -> Tensor<B, 2> {
        let base = x.matmul(w.transpose()) + bias.unsqueeze::<2>();
        base + x_adapter.matmul(a.transpose()).matmul(b.transpose()).mul_scalar(s)
    }

    #[test]
    fn lora_linear_and_its_gradients_match_autodiff_of_the_composition() {
        let (rows, inp, out, r, s) = (37, 24, 19, 4, 1.75f32);
        let xv = random(rows * inp, 21, 1.0);
        // W kept as its transpose in memory, as LoraLinear stores it (read in place, strided).
        let wv = random(out * inp, 22, 0.5);
        let (av, bv) = (random(r * inp, 23, 0.5), random(out * r, 24, 0.5));
        let biasv = random(out, 25, 1.0);
        let keep: Vec<f32> = random(rows * inp, 26, 1.0)
            .iter()
            .map(|v| if *v > -0.4 { 1.4 } else { 0.0 })
            .collect();
        let g = random(rows * out, 27, 1.0);
        // (dropout-like separate adapter input, x tracked)
        for (separate, x_tracked) in [(false, true), (true, true), (false, false)] {
            let run = |fused: bool| {
                let mut x = tensor::<Grad, 2>(xv.clone(), [rows, inp]);
                if x_tracked {
                    x = x.require_grad();
                }
                let w = crate::matmul_layout(tensor::<Grad, 2>(wv.clone(), [out, inp]));
                let bias = tensor::<Grad, 1>(biasv.clone(), [out]);
                let a = tensor::<Grad, 2>(av.clone(), [r, inp]).require_grad();
                let b = tensor::<Grad, 2>(bv.clone(), [out, r]).require_grad();
                let x_adapter = separate.then(|| x.clone() * tensor::<Grad, 2>(keep.clone(), [rows, inp]));
                let y = if fused {
                    lora_linear(x.clone(), x_adapter, w, Some(bias), a.clone(), b.clone(), s)
                } else {
                    let xa = x_adapter.unwrap_or_else(|| x.clone());
                    eager_lora(x.clone(), xa, w, bias, a.clone(), b.clone(), s)
                };
                let grads = (y.clone() * tensor::<Grad, 2>(g.clone(), [rows, out])).sum().backward();
                (
                    values(y),
                    x.grad(&grads).map(values),
                    values(a.grad(&grads).unwrap()),
                    values(b.grad(&grads).unwrap()),
                )
            };
            let (want, want_dx, want_da, want_db) = run(false);
            let (got, got_dx, got_da, got_db) = run(true);
            let case = format!("separate {separate}, x tracked {x_tracked}");
            assert_rel(&format!("{case}: value"), &got, &want, 1e-5);
            assert_eq!(got_dx.is_some(), x_tracked, "{case}");
            if let (Some(got_dx), Some(want_dx)) = (&got_dx, &want_dx) {
                assert_rel(&format!("{case}: dx"), got_dx, want_dx, 1e-5);
            }
            assert_rel(&format!("{case}: dA"), &got_da, &want_da, 1e-5);
            assert_rel(&format!("{case}: dB"), &got_db, &want_db, 1e-5);

            // The burn-op composition (GPU backends' path) on the same values.
            let p = |v: &Vec<f32>, dims: [usize; 2]| prim(tensor::<Cpu, 2>(v.clone(), dims));
            let operands = LoraOperands::<Cpu> {
                weight: LoraBase::Dense(prim(crate::matmul_layout(tensor::<Cpu, 2>(wv.clone(), [out, inp])))),
                bias: Some(prim(tensor::<Cpu, 1>(biasv.clone(), [out]))),
                scaling: s,
            };
            let xa: Vec<f32> = if separate {
                xv.iter().zip(&keep).map(|(x, k)| x * k).collect()
            } else {
                xv.clone()
            };
            let (y, low) = device_lora_linear::<Cpu>(
                p(&xv, [rows, inp]),
                separate.then(|| p(&xa, [rows, inp])),
                p(&av, [r, inp]),
                p(&bv, [out, r]),
                &operands,
            );
            assert!(
                max_rel(&values(float::<Cpu, 2>(y)), &want) < 1e-5,
                "{case}: device value"
            );
            let input = match (x_tracked, separate) {
                (false, _) => InputGrad::None,
                (true, false) => InputGrad::Sum,
                (true, true) => InputGrad::Separate,
            };
            let d = device_lora_linear_backward::<Cpu>(
                p(&xa, [rows, inp]),
                p(&av, [r, inp]),
                p(&bv, [out, r]),
                low,
                &operands,
                p(&g, [rows, out]),
                input,
            );
            assert!(
                max_rel(&values(float::<Cpu, 2>(d.lora_a)), &want_da) < 1e-5,
                "{case}: device dA"
            );
            assert!(
                max_rel(&values(float::<Cpu, 2>(d.lora_b)), &want_db) < 1e-5,
                "{case}: device dB"
            );
            if let Some(want_dx) = &want_dx {
                // ∂x of the eager run holds both parts (the adapter's through the mask).
                let mut dx = values(float::<Cpu, 2>(d.x.unwrap()));
                if let Some(d_adapter) = d.x_adapter {
                    for ((dx, da), k) in dx.iter_mut().zip(values(float::<Cpu, 2>(d_adapter))).zip(&keep) {
                        *dx += da * k;
                    }
                }
                assert!(max_rel(&dx, want_dx) < 1e-5, "{case}: device dx");
            } else {
                assert!(d.x.is_none() && d.x_adapter.is_none(), "{case}");
            }
        }
    }

    /// Host blocks as the base (a QLoRA format, and bf16 on AMX where the CPU has it): the op
    /// equals the composition `LoraLinear` runs otherwise (the blocks' own product, the bias,
    /// the adapter branch), value and gradients; the device path (dequantize, matmul) too.
    #[test]
    fn lora_linear_on_host_blocks_matches_the_composition() {
        use crate::quant::{QuantFormat, QuantMatrix};
        let (rows, inp, out, r, s) = (37, 64, 19, 4, 1.75f32);
        let xv = random(rows * inp, 31, 1.0);
        let wv = random(out * inp, 32, 0.5);
        let (av, bv) = (random(r * inp, 33, 0.5), random(out * r, 34, 0.5));
        let biasv = random(out, 35, 1.0);
        let keep: Vec<f32> = random(rows * inp, 36, 1.0)
            .iter()
            .map(|v| if *v > -0.4 { 1.4 } else { 0.0 })
            .collect();
        let g = random(rows * out, 37, 1.0);
        for format in [QuantFormat::Q8_0, QuantFormat::Bf16] {
            let q = Arc::new(QuantMatrix::quantize(format, &wv, [out, inp]).unwrap());
            for separate in [false, true] {
                let run = |fused: bool| {
                    let x = tensor::<Grad, 2>(xv.clone(), [rows, inp]).require_grad();
                    let bias = tensor::<Grad, 1>(biasv.clone(), [out]);
                    let a = tensor::<Grad, 2>(av.clone(), [r, inp]).require_grad();
                    let b = tensor::<Grad, 2>(bv.clone(), [out, r]).require_grad();
                    let x_adapter = separate.then(|| x.clone() * tensor::<Grad, 2>(keep.clone(), [rows, inp]));
                    let y = if fused {
                        let base = LoraBase::Blocks(q.clone());
                        lora_linear_on(x.clone(), x_adapter, base, Some(bias), a.clone(), b.clone(), s)
                    } else {
                        let xa = x_adapter.unwrap_or_else(|| x.clone());
                        let low = xa.matmul(a.clone().transpose()).matmul(b.clone().transpose());
                        crate::quant::quant_linear(x.clone(), &q) + bias.unsqueeze::<2>() + low.mul_scalar(s)
                    };
                    let grads = (y.clone() * tensor::<Grad, 2>(g.clone(), [rows, out])).sum().backward();
                    (
                        values(y),
                        values(x.grad(&grads).unwrap()),
                        values(a.grad(&grads).unwrap()),
                        values(b.grad(&grads).unwrap()),
                    )
                };
                let (want, want_dx, want_da, want_db) = run(false);
                let (got, got_dx, got_da, got_db) = run(true);
                let case = format!("{format}, separate {separate}");
                assert_rel(&format!("{case}: value"), &got, &want, 1e-5);
                assert_rel(&format!("{case}: dx"), &got_dx, &want_dx, 1e-5);
                assert_rel(&format!("{case}: dA"), &got_da, &want_da, 1e-5);
                assert_rel(&format!("{case}: dB"), &got_db, &want_db, 1e-5);
            }
            // The device path multiplies the dequantized weight in f32 (no bf16 rounding of x).
            let operands = LoraOperands::<Cpu> {
                weight: LoraBase::Blocks(q.clone()),
                bias: None,
                scaling: s,
            };
            let p = |v: &Vec<f32>, dims: [usize; 2]| prim(tensor::<Cpu, 2>(v.clone(), dims));
            let (y, _) =
                device_lora_linear::<Cpu>(p(&xv, [rows, inp]), None, p(&av, [r, inp]), p(&bv, [out, r]), &operands);
            let w = tensor::<Cpu, 2>(q.dequantize(), [out, inp]);
            let (x, a, b) = (
                tensor::<Cpu, 2>(xv.clone(), [rows, inp]),
                tensor::<Cpu, 2>(av.clone(), [r, inp]),
                tensor::<Cpu, 2>(bv.clone(), [out, r]),
            );
            let want = x.clone().matmul(w.transpose()) + x.matmul(a.transpose()).matmul(b.transpose()).mul_scalar(s);
            assert_rel(
                &format!("{format}: device value"),
                &values(float::<Cpu, 2>(y)),
                &values(want),
                1e-5,
            );
        }
    }
}
