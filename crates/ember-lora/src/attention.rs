//! Fused scaled-dot-product attention with its own backward pass.
//!
//! `softmax(cap·tanh(q·kᵀ·scale / cap) + mask)·v` per head, with grouped keys/values (GQA:
//! query head `h` reads key/value head `h / (heads / kv_heads)`, never repeated in memory),
//! an optional softcap (Gemma 2), an optional sink logit per head (gpt-oss: one more key whose
//! probability is thrown away) and an additive mask (padding, sliding windows, chunks,
//! segments: whatever the model built).
//!
//! The forward pass keeps only the output and each row's log-sum-exp; the backward pass
//! recomputes the probabilities from them (flash-attention's scheme), so training never holds
//! `[batch, heads, seq, keys]` probabilities, and autodiff's chain of softmax passes becomes one
//! op. On CPU backends both passes run [`host_attention_forward`]/[`host_attention_backward`]:
//! blocks of 64 query rows against their keys (two `gemm` calls per block forward, four
//! backward, scratch of `64 × keys` floats per thread), keys after a causal query's position
//! skipped. GPU backends compose burn's tensor ops ([`device_attention_forward`],
//! [`device_attention_backward`]), which do materialise the scores but still replace
//! autodiff's softmax backward by the direct formulas.

use std::borrow::Cow;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::amx::{tile_product, LeftTiles, RightTiles};
use crate::buffer::{unwritten, written};
use crate::quant::{float, EmberBackend};

/// Query rows per block of the CPU kernels.
const BLOCK_ROWS: usize = 64;

/// Queries below which a call with [`AttentionSpec::bf16_products`] keeps f32 products (one
/// token per call while decoding: a tile product would pad its one row to 32).
pub const TILE_MIN_ROWS: usize = 32;

/// A row whose best visible score lies below this saw only masked keys (a padded query: the
/// model's mask adds the dtype's minimum). Eager attention then spreads the row uniformly over
/// every key, the causally hidden ones included (all scores equal the minimum); the kernels
/// reproduce that by attending such a row over all keys ([`full_row_forward`]).
const FULLY_MASKED: f32 = f32::MIN / 2.0;

/// The scalar settings of an attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Multiplier of `q·kᵀ` (usually `1/√head_dim`).
    pub scale: f32,
    /// `cap·tanh(s/cap)` on the scaled scores before the mask (Gemma 2's attention softcap).
    pub softcap: Option<f32>,
    /// The mask hides every key after each query's own position (key `j` from query `i` when
    /// `j > i + keys − seq`): the CPU kernels then skip those keys without reading the mask.
    /// The mask must hide them too (GPU backends apply only the mask).
    pub causal: bool,
    /// Multiply in bf16 where the CPU has AMX tiles ([`crate::amx`]): q, k, v, the
    /// probabilities and the gradients rounded to bf16 as the products' operands, f32 sums,
    /// softmax in f32, as PyTorch's bf16 attention on CPU. Set for a bf16 base held on the host;
    /// without AMX, and for fewer than [`TILE_MIN_ROWS`] queries, the products stay f32.
    pub bf16_products: bool,
}

/// The sizes of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Query positions.
    pub seq: usize,
    /// Key positions (cache included).
    pub keys: usize,
    /// Query/key width per head.
    pub head_dim: usize,
    /// Value width per head.
    pub value_dim: usize,
}

impl AttentionDims {
    fn of(q: &[usize; 4], k: &[usize; 4], v: &[usize; 4]) -> Self {
        let dims = AttentionDims {
            batch: q[0],
            heads: q[1],
            kv_heads: k[1],
            seq: q[2],
            keys: k[2],
            head_dim: q[3],
            value_dim: v[3],
        };
        assert!(
            k[0] == q[0] && v[0] == q[0] && v[1] == k[1] && v[2] == k[2] && k[3] == q[3],
            "attention: q {q:?}, k {k:?}, v {v:?} do not fit together"
        );
        assert!(
            dims.kv_heads > 0 && dims.heads.is_multiple_of(dims.kv_heads),
            "attention: {} query heads over {} key/value heads",
            dims.heads,
            dims.kv_heads
        );
        dims
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }
}

pub(crate) fn prim<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Fused attention through [`EmberBackend::fused_attention`]; differentiable in `q`, `k` and `v`
/// (the mask and the sinks are constants: the frozen base's).
///
/// # Shapes
/// - `q`: `[batch, heads, seq, head_dim]`
/// - `k`: `[batch, kv_heads, keys, head_dim]`, `v`: `[batch, kv_heads, keys, value_dim]`
/// - `mask`: additive, `[batch or 1, 1, seq, keys]`
/// - `sinks`: `[heads]`
/// - output: `[batch, heads, seq, value_dim]`
pub fn attention<B: EmberBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4>>,
    sinks: Option<Tensor<B, 1>>,
    spec: AttentionSpec,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let k = k.cast(dtype);
    let v = v.cast(dtype);
    let mask = mask.map(|m| prim(m.cast(dtype).detach()));
    let sinks = sinks.map(|s| prim(s.cast(dtype).detach()));
    float(B::fused_attention(prim(q), prim(k), prim(v), mask, sinks, spec))
}

/// A host copy of a tensor as contiguous f32.
fn host<B: burn::tensor::backend::Backend, const D: usize>(t: FloatTensor<B>) -> (Vec<f32>, [usize; D]) {
    let t = float::<B, D>(t);
    let dims = t.dims();
    let data = t.into_data().convert::<f32>();
    (data.into_vec::<f32>().expect("f32 data"), dims)
}

/// CPU backends whose float tensors the attention kernels read from host memory.
pub trait HostTensors: burn::tensor::backend::Backend {
    /// `t` (rank `D`) as contiguous f32: borrowed where its storage already is that, else a copy.
    fn host_f32<const D: usize>(t: &FloatTensor<Self>) -> (Cow<'_, [f32]>, [usize; D]) {
        let (values, dims) = host::<Self, D>(t.clone());
        (Cow::Owned(values), dims)
    }

    /// A matrix as f32 with its element strides `[row, column]`: borrowed where its storage is
    /// one dense block in any order (a weight kept as its transpose is read in place), else a
    /// row-major copy.
    fn host_matrix(t: &FloatTensor<Self>) -> HostMatrix<'_> {
        let (values, dims) = Self::host_f32::<2>(t);
        HostMatrix {
            values,
            dims,
            strides: [dims[1], 1],
        }
    }
}

/// A matrix in host memory: element `(i, j)` at `values[i·strides[0] + j·strides[1]]`.
#[derive(Debug, Clone)]
pub struct HostMatrix<'a> {
    /// The storage.
    pub values: Cow<'a, [f32]>,
    /// `[rows, columns]`.
    pub dims: [usize; 2],
    /// Element strides `[row, column]`.
    pub strides: [usize; 2],
}

impl HostMatrix<'_> {
    /// A contiguous row-major matrix.
    pub fn row_major(values: &[f32], dims: [usize; 2]) -> HostMatrix<'_> {
        assert_eq!(
            values.len(),
            dims[0] * dims[1],
            "matrix {dims:?} from {} values",
            values.len()
        );
        HostMatrix {
            values: Cow::Borrowed(values),
            dims,
            strides: [dims[1], 1],
        }
    }

    /// The transpose, as a view of the same storage.
    pub fn t(&self) -> HostMatrix<'_> {
        HostMatrix {
            values: Cow::Borrowed(&self.values),
            dims: [self.dims[1], self.dims[0]],
            strides: [self.strides[1], self.strides[0]],
        }
    }

    fn strides(&self) -> (usize, usize) {
        (self.strides[0], self.strides[1])
    }

    /// The values in row-major order: borrowed when already so, else copied.
    pub fn row_major_values(&self) -> Cow<'_, [f32]> {
        let [rows, cols] = self.dims;
        if self.strides == [cols, 1] || rows * cols <= 1 {
            return Cow::Borrowed(&self.values[..rows * cols]);
        }
        let (rs, cs) = self.strides();
        Cow::Owned(
            (0..rows)
                .flat_map(|i| (0..cols).map(move |j| (i, j)))
                .map(|(i, j)| self.values[i * rs + j * cs])
                .collect(),
        )
    }
}

/// `dst = (accumulate ? dst : 0) + alpha·lhs·rhs` on the whole thread pool, `dst` row-major.
///
/// # Shapes
/// - `dst`: `[m, n]`; `lhs`: `[m, k]`; `rhs`: `[k, n]`
pub(crate) fn matmul_into(dst: &mut [f32], accumulate: bool, lhs: &HostMatrix<'_>, rhs: &HostMatrix<'_>, alpha: f32) {
    let ([m, k], [k2, n]) = (lhs.dims, rhs.dims);
    assert!(
        k == k2 && dst.len() == m * n,
        "matmul of {:?} by {:?} into {}",
        lhs.dims,
        rhs.dims,
        dst.len()
    );
    gemm_strided(
        (m, n, k),
        dst,
        (n, 1),
        accumulate,
        &lhs.values,
        lhs.strides(),
        &rhs.values,
        rhs.strides(),
        alpha,
        Parallelism::Rayon(0),
    )
}

/// burn-flex: through `into_data`.
impl HostTensors for burn::backend::Flex {}

/// burn-ndarray: f32 arrays in standard layout are read in place (a tensor shared with the
/// autodiff graph included, which `into_data` would copy element by element); strided views
/// (heads swapped with positions) are copied row by row.
impl HostTensors for burn::backend::NdArray<f32> {
    fn host_f32<const D: usize>(t: &FloatTensor<Self>) -> (Cow<'_, [f32]>, [usize; D]) {
        let burn::backend::ndarray::NdArrayTensor::F32(storage) = t else {
            let (values, dims) = host::<Self, D>(t.clone());
            return (Cow::Owned(values), dims);
        };
        let view = storage.view();
        let dims: [usize; D] = view.shape().try_into().expect("tensor rank");
        if let Some(values) = view.to_slice() {
            return (Cow::Borrowed(values), dims);
        }
        let strides = view.strides().to_vec();
        let mut out = Vec::with_capacity(view.len());
        if D > 0 && !view.is_empty() {
            let inner = dims[D - 1];
            let mut index = [0usize; D];
            let base = view.as_ptr();
            'rows: loop {
                let offset: isize = (0..D - 1).map(|d| index[d] as isize * strides[d]).sum();
                // SAFETY: `index` stays inside `dims` and the offsets follow the view's own
                // strides, so every element read belongs to the view, which outlives this loop.
                unsafe {
                    let row = base.offset(offset);
                    if strides[D - 1] == 1 {
                        out.extend_from_slice(std::slice::from_raw_parts(row, inner));
                    } else {
                        out.extend((0..inner).map(|j| *row.offset(j as isize * strides[D - 1])));
                    }
                }
                let mut d = D - 1;
                loop {
                    if d == 0 {
                        break 'rows;
                    }
                    d -= 1;
                    index[d] += 1;
                    if index[d] < dims[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
        }
        (Cow::Owned(out), dims)
    }

    fn host_matrix(t: &FloatTensor<Self>) -> HostMatrix<'_> {
        if let burn::backend::ndarray::NdArrayTensor::F32(storage) = t {
            let view = storage.view();
            if let (2, Some(values)) = (view.ndim(), view.to_slice_memory_order()) {
                if let [row, column] = *view.strides() {
                    if row >= 0 && column >= 0 {
                        return HostMatrix {
                            values: Cow::Borrowed(values),
                            dims: [view.shape()[0], view.shape()[1]],
                            strides: [row as usize, column as usize],
                        };
                    }
                }
            }
        }
        let (values, dims) = Self::host_f32::<2>(t);
        HostMatrix {
            values,
            dims,
            strides: [dims[1], 1],
        }
    }
}

/// The device and dtype of `t`, where results go back to.
pub(crate) type Place<B> = (burn::tensor::Device<B>, burn::tensor::DType);

pub(crate) fn place_of<B: burn::tensor::backend::Backend>(t: &FloatTensor<B>) -> Place<B> {
    let t = float::<B, 4>(t.clone());
    (t.device(), t.dtype())
}

pub(crate) fn to_device<B: burn::tensor::backend::Backend, const D: usize>(
    values: Vec<f32>,
    dims: [usize; D],
    (device, dtype): &Place<B>,
) -> FloatTensor<B> {
    prim(Tensor::<B, D>::from_data(
        TensorData::new(values, dims),
        (device, *dtype),
    ))
}

/// [`host_attention_forward`] on any backend's tensors (through host memory): output and
/// log-sum-exp per row.
///
/// # Shapes
/// As [`attention`]; the log-sum-exp is `[batch, heads, seq]`.
pub fn host_forward<B: HostTensors>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: Option<FloatTensor<B>>,
    sinks: Option<FloatTensor<B>>,
    spec: AttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let like = place_of::<B>(&q);
    let (qh, qd) = B::host_f32::<4>(&q);
    let (kh, kd) = B::host_f32::<4>(&k);
    let (vh, vd) = B::host_f32::<4>(&v);
    let dims = AttentionDims::of(&qd, &kd, &vd);
    let mask = mask.as_ref().map(B::host_f32::<4>);
    let sinks = sinks.as_ref().map(B::host_f32::<1>);
    let mask_ref = mask.as_ref().map(|(m, md)| HostMask::new(m, md, &dims));
    let (out, lse) = host_attention_forward(&qh, &kh, &vh, mask_ref, sinks.as_ref().map(|s| &*s.0), dims, spec);
    (
        to_device::<B, 4>(out, [dims.batch, dims.heads, dims.seq, dims.value_dim], &like),
        to_device::<B, 3>(lse, [dims.batch, dims.heads, dims.seq], &like),
    )
}

/// [`host_attention_backward`] on any backend's tensors: `(dq, dk, dv)` (the sinks are in
/// the log-sum-exp already).
#[allow(clippy::too_many_arguments)]
pub fn host_backward<B: HostTensors>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: Option<FloatTensor<B>>,
    _sinks: Option<FloatTensor<B>>,
    spec: AttentionSpec,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let like = place_of::<B>(&q);
    let (qh, qd) = B::host_f32::<4>(&q);
    let (kh, kd) = B::host_f32::<4>(&k);
    let (vh, vd) = B::host_f32::<4>(&v);
    let dims = AttentionDims::of(&qd, &kd, &vd);
    let mask = mask.as_ref().map(B::host_f32::<4>);
    let mask_ref = mask.as_ref().map(|(m, md)| HostMask::new(m, md, &dims));
    let (out, _) = B::host_f32::<4>(&out);
    let (lse, _) = B::host_f32::<3>(&lse);
    let (d_out, _) = B::host_f32::<4>(&d_out);
    let (dq, dk, dv) = host_attention_backward(&qh, &kh, &vh, mask_ref, dims, spec, &out, &lse, &d_out);
    (
        to_device::<B, 4>(dq, qd, &like),
        to_device::<B, 4>(dk, kd, &like),
        to_device::<B, 4>(dv, vd, &like),
    )
}

/// An additive mask in host memory, `[1 or batch, 1, seq, keys]`.
#[derive(Debug, Clone, Copy)]
pub struct HostMask<'a> {
    values: &'a [f32],
    per_sequence: bool,
}

impl<'a> HostMask<'a> {
    /// Checks the shape against the call's.
    pub fn new(values: &'a [f32], dims: &[usize; 4], call: &AttentionDims) -> Self {
        assert!(
            (dims[0] == 1 || dims[0] == call.batch) && dims[1] == 1 && dims[2] == call.seq && dims[3] == call.keys,
            "attention mask {dims:?} for batch {}, seq {}, keys {}",
            call.batch,
            call.seq,
            call.keys
        );
        HostMask {
            values,
            per_sequence: dims[0] != 1,
        }
    }

    /// `None` when the mask adds zero to every key the causal rule shows (a plain causal
    /// mask): the kernels skip the hidden keys themselves, so reading the mask per head and
    /// pass would add nothing.
    fn unless_plain_causal(self, dims: &AttentionDims, spec: &AttentionSpec) -> Option<Self> {
        if !spec.causal {
            return Some(self);
        }
        let sequences = if self.per_sequence { dims.batch } else { 1 };
        let plain = (0..sequences).all(|b| {
            let m = self.of_sequence(b, dims.seq, dims.keys);
            (0..dims.seq).all(|i| all_zero(&m[i * dims.keys..i * dims.keys + visible_keys(i, dims, spec)]))
        });
        (!plain).then_some(self)
    }

    fn of_sequence(&self, b: usize, seq: usize, keys: usize) -> &'a [f32] {
        let b = if self.per_sequence { b } else { 0 };
        &self.values[b * seq * keys..(b + 1) * seq * keys]
    }
}

/// `dst = (accumulate ? dst : 0) + alpha·lhs·rhs` on one thread, each operand a buffer with its
/// (row stride, column stride).
///
/// # Shapes
/// - `dst`: `[m, n]`; `lhs`: `[m, k]`; `rhs`: `[k, n]`
#[allow(clippy::too_many_arguments)]
fn matmul(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    alpha: f32,
) {
    gemm_strided(
        mnk,
        dst,
        dst_strides,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        alpha,
        Parallelism::None,
    )
}

/// [`matmul`] with a choice of threads (`Parallelism::Rayon(0)`: the whole pool).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f32,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(dst_rs, dst_cs, m, n) < dst.len(), "matmul: dst out of bounds");
    // SAFETY: `dst` is `dst.len()` values, borrowed mutably (so it aliases neither operand).
    unsafe {
        gemm_to_pointer(
            (m, n, k),
            dst.as_mut_ptr(),
            (dst_rs, dst_cs),
            accumulate,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
            alpha,
            parallelism,
        )
    }
}

/// `alpha·lhs·rhs` into a new row-major `[m, n]` buffer on the whole thread pool, with no
/// zeroing pass first: gemm writes every value of an output it is told not to read.
///
/// # Shapes
/// - `lhs`: `[m, k]`; `rhs`: `[k, n]`; output: `[m, n]`
pub(crate) fn matmul_new(lhs: &HostMatrix<'_>, rhs: &HostMatrix<'_>, alpha: f32) -> Vec<f32> {
    let ([m, k], [k2, n]) = (lhs.dims, rhs.dims);
    assert_eq!(k, k2, "matmul of {:?} by {:?}", lhs.dims, rhs.dims);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let mut out = unwritten(m * n);
    // SAFETY: `out` holds the m·n values of a row-major `[m, n]`, owned here (so it aliases
    // neither operand); gemm does not read an output it does not accumulate into.
    unsafe {
        gemm_to_pointer(
            (m, n, k),
            out.as_mut_ptr().cast::<f32>(),
            (n, 1),
            false,
            &lhs.values,
            lhs.strides(),
            &rhs.values,
            rhs.strides(),
            alpha,
            Parallelism::Rayon(0),
        );
        // SAFETY: m, n, k > 0: gemm wrote every value of the output.
        written(out)
    }
}

/// [`gemm_strided`] into an output given by pointer, `m`, `n`, `k` all positive.
///
/// # Safety
/// `dst` is valid for writes (and, with `accumulate`, reads) of every element `(i, j)` at
/// `i·dst_rs + j·dst_cs` for `i < m`, `j < n`, and aliases neither operand. Without
/// `accumulate` it need not be initialised: gemm writes every such element without reading it.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_to_pointer(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f32,
    parallelism: Parallelism,
) {
    debug_assert!(m > 0 && n > 0 && k > 0);
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(lhs_rs, lhs_cs, m, k) < lhs.len(), "matmul: lhs out of bounds");
    assert!(last(rhs_rs, rhs_cs, k, n) < rhs.len(), "matmul: rhs out of bounds");
    // SAFETY: the asserts above keep every operand element the kernel reads inside the slices;
    // the output is the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `eˣ` in f32 without a libm call, so that loops over score rows vectorise: Cephes' `expf`
/// (`x = n·ln 2 + r`, `|r| ≤ ln2/2`, degree-6 polynomial, `2ⁿ` from the exponent bits; about
/// 1 ulp), 0 below −87.3 (masked scores: the dtype minimum minus the row's maximum).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by adding 1.5·2²³ (no libm `floor` call, which would stop vectorising).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n as an integer, read off t's mantissa bits (t = 1.5·2²³ + n exactly): the same value
    // as `n as i32`, whose saturating semantics would keep the loop from vectorising.
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

crate::simd::multiversion! {
    /// `row[j] = e^(row[j]·scale − shift)`; returns their sum (in 16 lanes, so that both loops
    /// vectorise; compiled for the CPU's widest vectors, see [`crate::simd`]). `scale` 1
    /// multiplies exactly; otherwise it is the pass of [`scale_row`] folded in, same values.
    fn exp_shifted(row: &mut [f32], scale: f32, shift: f32) -> f32 {
        // One pass: each chunk's exponentials go into the lanes as they are written.
        let mut lanes = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for chunk in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(chunk.iter_mut()) {
                *x = fast_exp(*x * scale - shift);
                *l += *x;
            }
        }
        let rest = chunks.into_remainder();
        rest.iter_mut().for_each(|x| *x = fast_exp(*x * scale - shift));
        lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
    }
}

crate::simd::multiversion! {
    /// The largest score of a row ([`crate::simd::lane_max`], vectorised for the CPU).
    fn row_max(row: &[f32]) -> f32 {
        crate::simd::lane_max(row)
    }
}

crate::simd::multiversion! {
    /// `row[j] = row[j]·scale + mask[j]` (vectorised for the CPU; `scale` 1 adds exactly).
    fn scale_add_row(row: &mut [f32], scale: f32, mask: &[f32]) {
        row.iter_mut().zip(mask).for_each(|(x, m)| *x = *x * scale + m);
    }
}

crate::simd::multiversion! {
    /// Whether every value of `row` is ±0 (vectorised for the CPU).
    fn all_zero(row: &[f32]) -> bool {
        row.iter().fold(0u32, |bits, &x| bits | (x.to_bits() & 0x7FFF_FFFF)) == 0
    }
}

crate::simd::multiversion! {
    /// `row[j] *= factor` (vectorised for the CPU).
    fn scale_row(row: &mut [f32], factor: f32) {
        row.iter_mut().for_each(|x| *x *= factor);
    }
}

crate::simd::multiversion! {
    /// Softmax's backward for one row, `dS = P∘(dP − δ)·scale` in place of `dP`, with
    /// `δ = dO·O` (vectorised for the CPU; `scale` 1 multiplies exactly).
    fn softmax_grad_row(d_scores: &mut [f32], probs: &[f32], d_out: &[f32], out: &[f32], scale: f32) {
        let delta: f32 = out.iter().zip(d_out).map(|(a, b)| a * b).sum();
        d_scores.iter_mut().zip(probs).for_each(|(d, p)| *d = p * (*d - delta) * scale);
    }
}

/// Whether skipping the causally hidden keys of query `i` could change its row: eager attention
/// adds the mask minimum to their scores, which hides them only while no score comes near
/// `1e37` in size (a diverging run's). By Cauchy–Schwarz `|q·k|·scale ≤ |q|·max|k|·scale`;
/// rows past that bound are attended over all keys as eager attention does ([`FullRow`]).
fn may_see_hidden_keys(
    q_head: &[f32],
    i: usize,
    max_key_norm: f32,
    dims: &AttentionDims,
    spec: &AttentionSpec,
) -> bool {
    if !spec.causal || spec.softcap.is_some() {
        return false;
    }
    let q = &q_head[i * dims.head_dim..(i + 1) * dims.head_dim];
    let q_norm = q.iter().map(|x| x * x).sum::<f32>().sqrt();
    let bound = q_norm * max_key_norm * spec.scale.abs();
    // NaN (a NaN query or key) counts as "may": the exact path then propagates it.
    bound.is_nan() || bound >= 1e37
}

/// The largest key norm of one head.
fn max_key_norm(k_head: &[f32], head_dim: usize) -> f32 {
    k_head
        .chunks_exact(head_dim)
        .map(|k| k.iter().map(|x| x * x).sum::<f32>().sqrt())
        .fold(0.0, |a: f32, n| if n.is_nan() { f32::NAN } else { a.max(n) })
}

/// The keys query `i` may attend to under the causal rule (all keys without it).
fn visible_keys(i: usize, dims: &AttentionDims, spec: &AttentionSpec) -> usize {
    if spec.causal {
        (i + 1 + dims.keys - dims.seq).min(dims.keys)
    } else {
        dims.keys
    }
}

/// Scaled (and softcapped) scores of query rows `i0..i0 + rows` of one head against keys
/// `0..width`, plus the mask, into `scores` (`[rows, width]`, rows `stride` apart); with a
/// softcap, `slope` gets `d capped / d scaled` = `1 − tanh²`. Returns the factor the caller
/// still multiplies the scores by (1, or the scale when tiles wrote plain products and no
/// mask or softcap follows: it goes into [`exp_shifted`], saving a pass over the strip).
#[allow(clippy::too_many_arguments)]
fn block_scores(
    q_head: &[f32],
    k_head: &[f32],
    mask: Option<&[f32]>,
    (i0, rows, width, stride): (usize, usize, usize, usize),
    dims: &AttentionDims,
    spec: &AttentionSpec,
    tiles: Option<&mut HeadTiles>,
    scores: &mut [f32],
    mut slope: Option<&mut [f32]>,
) -> f32 {
    let d = dims.head_dim;
    // Tiles write the plain products; the scale goes into the row pass below, or, with nothing
    // else to apply to the scores, into the caller's exponentials (returned: a positive factor
    // keeps the row maximum, `fl(max·s) = max fl(x·s)`, so the values are the same).
    let prescale = if tiles.is_some() { spec.scale } else { 1.0 };
    let deferred = if mask.is_none() && spec.softcap.is_none() && prescale > 0.0 {
        prescale
    } else {
        1.0
    };
    match tiles {
        Some(tiles) => tiles.scores(q_head, (i0, rows, width, stride), d, scores),
        None => matmul(
            (rows, width, d),
            scores,
            (stride, 1),
            false,
            &q_head[i0 * d..],
            (d, 1),
            k_head,
            (1, d),
            spec.scale,
        ),
    }
    for r in 0..rows {
        let row = &mut scores[r * stride..r * stride + width];
        let mask_row = mask.map(|m| &m[(i0 + r) * dims.keys..][..width]);
        let Some(cap) = spec.softcap else {
            match mask_row {
                Some(mask_row) => scale_add_row(row, prescale, mask_row),
                None if prescale != 1.0 && deferred == 1.0 => scale_row(row, prescale),
                None => {}
            }
            continue;
        };
        if prescale != 1.0 {
            scale_row(row, prescale);
        }
        let slope_row = slope.as_mut().map(|s| &mut s[r * stride..r * stride + width]);
        match slope_row {
            Some(slope_row) => {
                for (x, s) in row.iter_mut().zip(slope_row) {
                    let t = (*x / cap).tanh();
                    *x = cap * t;
                    *s = 1.0 - t * t;
                }
            }
            None => row.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh()),
        }
        if let Some(mask_row) = mask_row {
            scale_add_row(row, 1.0, mask_row);
        }
    }
    deferred
}

/// Row stride of a block's score strip over `width` keys: tile products write whole 32-column
/// blocks.
fn strip_stride(width: usize, on_tiles: bool) -> usize {
    if on_tiles {
        width.next_multiple_of(32)
    } else {
        width
    }
}

/// Floats of one block's score strip (tile products write rows up to a multiple of 32).
fn strip_len(seq: usize, keys: usize, on_tiles: bool) -> usize {
    let rows = BLOCK_ROWS.min(seq);
    if on_tiles {
        rows.next_multiple_of(32) * keys.next_multiple_of(32)
    } else {
        rows * keys
    }
}

/// One head's products on bf16 tiles ([`AttentionSpec::bf16_products`]): keys and values packed
/// once per head, the query block, probabilities and score gradients per block. The key and
/// value gradients gather transposed (`dKᵀ += Qᵀ·dS`, `dVᵀ += dOᵀ·P`: the block's rows are
/// `k`, so that the wide operand is packed the cheap way) and are added at [`HeadTiles::finish`].
struct HeadTiles {
    /// `Kᵀ`, right operand of the scores.
    keys_t: RightTiles,
    /// Right operand of the strip products ([`HeadTiles::strip_times`]): `V` for `P·V`
    /// (forward), `K` for `dQ = dS·K` (backward).
    strip_right: RightTiles,
    /// `Vᵀ`, right operand of `dP = dO·Vᵀ` (backward).
    values_t: RightTiles,
    /// The block's left operand.
    left: LeftTiles,
    /// The block's right operand (backward).
    right: RightTiles,
    /// `[64, max(head_dim, value_dim)]` padded to 32: one block's product before it is copied out.
    block_out: Vec<f32>,
    /// Width of `block_out`'s rows.
    block_stride: usize,
    /// `dKᵀ` `[head_dim, keys]`, rows padded to 32, `keys_stride` apart (backward).
    dk_t: Vec<f32>,
    /// `dVᵀ` `[value_dim, keys]`, likewise.
    dv_t: Vec<f32>,
    /// Keys rounded up to 32.
    keys_stride: usize,
}

impl HeadTiles {
    /// Whether a call runs its products on tiles.
    fn used(spec: &AttentionSpec, seq: usize) -> bool {
        spec.bf16_products && seq >= TILE_MIN_ROWS && crate::amx::available()
    }

    fn new(k_head: &[f32], v_head: &[f32], dims: &AttentionDims, backward: bool) -> Self {
        let (keys, d, dv) = (dims.keys, dims.head_dim, dims.value_dim);
        let mut tiles = HeadTiles {
            keys_t: RightTiles::default(),
            strip_right: RightTiles::default(),
            values_t: RightTiles::default(),
            left: LeftTiles::default(),
            right: RightTiles::default(),
            block_stride: d.max(dv).next_multiple_of(32),
            block_out: Vec::new(),
            dk_t: Vec::new(),
            dv_t: Vec::new(),
            keys_stride: keys.next_multiple_of(32),
        };
        tiles.block_out = vec![0f32; BLOCK_ROWS * tiles.block_stride];
        tiles.keys_t.pack(k_head, keys, d, d, true);
        if backward {
            tiles.strip_right.pack(k_head, keys, d, d, false);
            tiles.values_t.pack(v_head, keys, dv, dv, true);
            tiles.dk_t = vec![0f32; d.next_multiple_of(32) * tiles.keys_stride];
            tiles.dv_t = vec![0f32; dv.next_multiple_of(32) * tiles.keys_stride];
        } else {
            tiles.strip_right.pack(v_head, keys, dv, dv, false);
        }
        tiles
    }

    /// `scores[..rows, ..width] = Q[i0..i0 + rows]·Kᵀ` (rows `stride` apart; unscaled).
    fn scores(
        &mut self,
        q_head: &[f32],
        (i0, rows, width, stride): (usize, usize, usize, usize),
        d: usize,
        scores: &mut [f32],
    ) {
        self.left.pack(&q_head[i0 * d..], rows, d, (d, 1));
        tile_product(&self.left, &self.keys_t, width, scores, stride, false);
    }

    /// `out = diag(factors)·strip·B` `[rows, cols]` for a block's strip `[rows, width]` (the
    /// probabilities `P` before their normalisation, or the scaled score gradients `dS`) and the
    /// head's `V` (forward) or `K` (backward); each row multiplied by its factor before rounding.
    fn strip_times(
        &mut self,
        strip: &[f32],
        (rows, width, stride): (usize, usize, usize),
        factors: Option<&[f32]>,
        cols: usize,
        out: &mut [f32],
    ) {
        self.left.pack_scaled(strip, rows, width, (stride, 1), factors);
        tile_product(
            &self.left,
            &self.strip_right,
            cols,
            &mut self.block_out,
            self.block_stride,
            false,
        );
        self.copy_out(rows, cols, out);
    }

    /// `dVᵀ += dOᵀ·P` (`block` = dO, `gathered` = values) or `dKᵀ += Qᵀ·dS` (`block` = Q):
    /// over the block's rows, `block` `[rows, cols]`.
    fn gather(
        &mut self,
        block: &[f32],
        cols: usize,
        strip: &[f32],
        (rows, width, stride): (usize, usize, usize),
        values: bool,
    ) {
        self.left.pack(block, cols, rows, (1, cols));
        self.right.pack(strip, rows, width, stride, false);
        let gathered = if values { &mut self.dv_t } else { &mut self.dk_t };
        tile_product(&self.left, &self.right, width, gathered, self.keys_stride, true);
    }

    /// `d_scores = dO·Vᵀ` over the block's visible keys.
    fn prob_grad(
        &mut self,
        d_out: &[f32],
        (rows, width, stride): (usize, usize, usize),
        dv: usize,
        d_scores: &mut [f32],
    ) {
        self.left.pack(d_out, rows, dv, (dv, 1));
        tile_product(&self.left, &self.values_t, width, d_scores, stride, false);
    }

    /// Copies `[rows, cols]` of the block's product into `out` (rows `cols` apart).
    fn copy_out(&self, rows: usize, cols: usize, out: &mut [f32]) {
        for (r, dst) in out.chunks_exact_mut(cols).take(rows).enumerate() {
            dst.copy_from_slice(&self.block_out[r * self.block_stride..r * self.block_stride + cols]);
        }
    }

    /// Adds the gathered `dKᵀ`, `dVᵀ` to the head's `dk` `[keys, head_dim]`, `dv` `[keys, value_dim]`.
    fn finish(&self, dims: &AttentionDims, dk: &mut [f32], dv: &mut [f32]) {
        for (gathered, out, width) in [(&self.dk_t, dk, dims.head_dim), (&self.dv_t, dv, dims.value_dim)] {
            for (j, row) in out.chunks_exact_mut(width).take(dims.keys).enumerate() {
                for (c, g) in row.iter_mut().enumerate() {
                    *g += gathered[c * self.keys_stride + j];
                }
            }
        }
    }
}

/// The forward pass on host buffers: the output `[batch, heads, seq, value_dim]` and each
/// row's log-sum-exp `[batch, heads, seq]` (sink included; NaN, as eager softmax, for a row
/// whose every score is `−∞`).
///
/// # Shapes
/// - `q`: `[batch, heads, seq, head_dim]`; `k`: `[batch, kv_heads, keys, head_dim]`;
///   `v`: `[batch, kv_heads, keys, value_dim]`; `sinks`: `[heads]`
pub fn host_attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<HostMask<'_>>,
    sinks: Option<&[f32]>,
    dims: AttentionDims,
    spec: AttentionSpec,
) -> (Vec<f32>, Vec<f32>) {
    let AttentionDims {
        batch,
        heads,
        kv_heads,
        seq,
        keys,
        head_dim,
        value_dim,
    } = dims;
    assert!(
        !spec.causal || keys >= seq,
        "causal attention with {seq} queries over {keys} keys"
    );
    let mut out = vec![0f32; batch * heads * seq * value_dim];
    let mut lse = vec![0f32; batch * heads * seq];
    if seq == 0 || out.is_empty() {
        return (out, lse);
    }
    let on_tiles = HeadTiles::used(&spec, seq);
    let mask = mask.and_then(|m| m.unless_plain_causal(&dims, &spec));
    out.par_chunks_mut(seq * value_dim)
        .zip(lse.par_chunks_mut(seq))
        .enumerate()
        .for_each(|(bh, (out_head, lse_head))| {
            let (b, h) = (bh / heads, bh % heads);
            let kvh = b * kv_heads + h / dims.groups();
            let q_head = &q[bh * seq * head_dim..(bh + 1) * seq * head_dim];
            let k_head = &k[kvh * keys * head_dim..(kvh + 1) * keys * head_dim];
            let v_head = &v[kvh * keys * value_dim..(kvh + 1) * keys * value_dim];
            let mask = mask.map(|m| m.of_sequence(b, seq, keys));
            let sink = sinks.map(|s| s[h]);
            let mut tiles = on_tiles.then(|| HeadTiles::new(k_head, v_head, &dims, false));
            let mut scores = vec![0f32; strip_len(seq, keys, on_tiles)];
            let mut fallback = Vec::new();
            let key_norm = max_key_norm(k_head, head_dim);
            for i0 in (0..seq).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(seq - i0);
                let width = visible_keys(i0 + rows - 1, &dims, &spec);
                let stride = strip_stride(width, on_tiles);
                let block = (i0, rows, width, stride);
                let pending = block_scores(
                    q_head,
                    k_head,
                    mask,
                    block,
                    &dims,
                    &spec,
                    tiles.as_mut(),
                    &mut scores,
                    None,
                );
                // On tiles each row's 1/sum is applied as P is packed (one pass fewer).
                let mut normalisers = [1f32; BLOCK_ROWS];
                for r in 0..rows {
                    let row = &mut scores[r * stride..r * stride + width];
                    let visible = visible_keys(i0 + r, &dims, &spec);
                    let (seen, hidden) = row.split_at_mut(visible);
                    hidden.fill(0.0);
                    let best = row_max(seen) * pending;
                    if best < FULLY_MASKED || may_see_hidden_keys(q_head, i0 + r, key_norm, &dims, &spec) {
                        seen.fill(0.0);
                        fallback.push(i0 + r);
                        continue;
                    }
                    let max = sink.map_or(best, |s| s.max(best));
                    let sum = sink.map_or(0.0, |s| (s - max).exp()) + exp_shifted(seen, pending, max);
                    if tiles.is_some() {
                        normalisers[r] = 1.0 / sum;
                    } else {
                        scale_row(seen, 1.0 / sum);
                    }
                    lse_head[i0 + r] = max + sum.ln();
                }
                let out_block = &mut out_head[i0 * value_dim..(i0 + rows) * value_dim];
                match tiles.as_mut() {
                    Some(tiles) => {
                        tiles.strip_times(&scores, (rows, width, stride), Some(&normalisers), value_dim, out_block)
                    }
                    None => matmul(
                        (rows, value_dim, width),
                        out_block,
                        (value_dim, 1),
                        false,
                        &scores,
                        (stride, 1),
                        v_head,
                        (value_dim, 1),
                        1.0,
                    ),
                }
                for i in fallback.drain(..) {
                    let row = FullRow::new(q_head, k_head, mask, i, &dims, &spec);
                    lse_head[i] = row.forward(v_head, sink, &dims, &mut out_head[i * value_dim..(i + 1) * value_dim]);
                }
            }
        });
    (out, lse)
}

/// One query row attended over every key with plain loops: the exact path for rows that see
/// only masked keys (see [`FULLY_MASKED`]).
struct FullRow {
    /// Scaled, softcapped, masked scores over all keys.
    scores: Vec<f32>,
    /// `d capped / d scaled` per key (1 without a softcap).
    slope: Vec<f32>,
    /// The row's query.
    query: Vec<f32>,
}

impl FullRow {
    fn new(
        q_head: &[f32],
        k_head: &[f32],
        mask: Option<&[f32]>,
        i: usize,
        dims: &AttentionDims,
        spec: &AttentionSpec,
    ) -> Self {
        let d = dims.head_dim;
        let query = q_head[i * d..(i + 1) * d].to_vec();
        let mut scores = Vec::with_capacity(dims.keys);
        let mut slope = Vec::with_capacity(dims.keys);
        for j in 0..dims.keys {
            let key = &k_head[j * d..(j + 1) * d];
            let mut x = query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * spec.scale;
            let mut dx = 1.0;
            if let Some(cap) = spec.softcap {
                let t = (x / cap).tanh();
                x = cap * t;
                dx = 1.0 - t * t;
            }
            if let Some(mask) = mask {
                x += mask[i * dims.keys + j];
            }
            scores.push(x);
            slope.push(dx);
        }
        FullRow { scores, slope, query }
    }

    /// Writes the row's output; returns its log-sum-exp.
    fn forward(&self, v_head: &[f32], sink: Option<f32>, dims: &AttentionDims, out: &mut [f32]) -> f32 {
        let max = self
            .scores
            .iter()
            .fold(sink.unwrap_or(f32::NEG_INFINITY), |a, &x| a.max(x));
        out.fill(0.0);
        if max == f32::NEG_INFINITY {
            // Every score −∞ (overflowed scores of a diverging run): eager softmax gives NaN,
            // and so does this, so that the divergence shows.
            out.fill(f32::NAN);
            return f32::NAN;
        }
        let mut sum = sink.map_or(0.0, |s| (s - max).exp());
        for (j, &x) in self.scores.iter().enumerate() {
            let p = (x - max).exp();
            sum += p;
            let value = &v_head[j * dims.value_dim..(j + 1) * dims.value_dim];
            out.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
        }
        out.iter_mut().for_each(|o| *o /= sum);
        max + sum.ln()
    }

    /// Adds the row's gradients: `dq_row` (overwritten), `dk_head` and `dv_head` (accumulated).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        k_head: &[f32],
        v_head: &[f32],
        delta: f32,
        d_out: &[f32],
        dims: &AttentionDims,
        spec: &AttentionSpec,
        dq_row: &mut [f32],
        dk_head: &mut [f32],
        dv_head: &mut [f32],
    ) {
        let (d, dv) = (dims.head_dim, dims.value_dim);
        dq_row.fill(0.0);
        // The row's log-sum-exp is of the minimum's order, where `max + ln(sum)` loses `ln(sum)`
        // to rounding: normalise by the sum itself. (A sink would have dominated such a row's
        // log-sum-exp, so these rows have none.)
        let max = self.scores.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let sum: f32 = self.scores.iter().map(|&x| (x - max).exp()).sum();
        if max == f32::NEG_INFINITY {
            // Not reached: such a row's log-sum-exp is NaN (see `forward`), not below FULLY_MASKED.
            return;
        }
        for (j, (&x, &slope)) in self.scores.iter().zip(&self.slope).enumerate() {
            let p = (x - max).exp() / sum;
            let value = &v_head[j * dv..(j + 1) * dv];
            let d_p: f32 = d_out.iter().zip(value).map(|(g, v)| g * v).sum();
            let d_score = p * (d_p - delta) * slope * spec.scale;
            let key = &k_head[j * d..(j + 1) * d];
            dq_row.iter_mut().zip(key).for_each(|(g, k)| *g += d_score * k);
            let dk = &mut dk_head[j * d..(j + 1) * d];
            dk.iter_mut().zip(&self.query).for_each(|(g, q)| *g += d_score * q);
            let dv_row = &mut dv_head[j * dv..(j + 1) * dv];
            dv_row.iter_mut().zip(d_out).for_each(|(g, o)| *g += p * o);
        }
    }
}

/// The backward pass on host buffers: `(dq, dk, dv)` from the forward's output and
/// log-sum-exp and the output's gradient `d_out`, recomputing the probabilities block by block.
/// Key/value gradients sum over the query heads of their group.
///
/// # Shapes
/// As [`host_attention_forward`]; `d_out` like its output, `lse` `[batch, heads, seq]`.
#[allow(clippy::too_many_arguments)]
pub fn host_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<HostMask<'_>>,
    dims: AttentionDims,
    spec: AttentionSpec,
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionDims {
        batch,
        heads,
        kv_heads,
        seq,
        keys,
        head_dim,
        value_dim,
    } = dims;
    let mut dq = vec![0f32; batch * heads * seq * head_dim];
    // Per query head, summed over each group afterwards (more parallel work than per kv head).
    let mut dk_heads = vec![0f32; batch * heads * keys * head_dim];
    let mut dv_heads = vec![0f32; batch * heads * keys * value_dim];
    let on_tiles = HeadTiles::used(&spec, seq);
    let mask = mask.and_then(|m| m.unless_plain_causal(&dims, &spec));
    if seq > 0 && keys > 0 {
        dq.par_chunks_mut(seq * head_dim)
            .zip(dk_heads.par_chunks_mut(keys * head_dim))
            .zip(dv_heads.par_chunks_mut(keys * value_dim))
            .enumerate()
            .for_each(|(bh, ((dq_head, dk_head), dv_head))| {
                let (b, h) = (bh / heads, bh % heads);
                let kvh = b * kv_heads + h / dims.groups();
                let q_head = &q[bh * seq * head_dim..(bh + 1) * seq * head_dim];
                let k_head = &k[kvh * keys * head_dim..(kvh + 1) * keys * head_dim];
                let v_head = &v[kvh * keys * value_dim..(kvh + 1) * keys * value_dim];
                let out_head = &out[bh * seq * value_dim..(bh + 1) * seq * value_dim];
                let d_out_head = &d_out[bh * seq * value_dim..(bh + 1) * seq * value_dim];
                let lse_head = &lse[bh * seq..(bh + 1) * seq];
                let mask = mask.map(|m| m.of_sequence(b, seq, keys));
                let strip = strip_len(seq, keys, on_tiles);
                let mut tiles = on_tiles.then(|| HeadTiles::new(k_head, v_head, &dims, true));
                let mut probs = vec![0f32; strip];
                let mut d_scores = vec![0f32; strip];
                let mut slope = vec![0f32; if spec.softcap.is_some() { strip } else { 0 }];
                let mut fallback = Vec::new();
                let key_norm = max_key_norm(k_head, head_dim);
                for i0 in (0..seq).step_by(BLOCK_ROWS) {
                    let rows = BLOCK_ROWS.min(seq - i0);
                    let width = visible_keys(i0 + rows - 1, &dims, &spec);
                    let stride = strip_stride(width, on_tiles);
                    let block = (i0, rows, width, stride);
                    let probs = &mut probs[..];
                    let d_scores = &mut d_scores[..];
                    let mut slope = spec.softcap.map(|_| &mut slope[..]);
                    let pending = block_scores(
                        q_head,
                        k_head,
                        mask,
                        block,
                        &dims,
                        &spec,
                        tiles.as_mut(),
                        probs,
                        slope.as_deref_mut(),
                    );
                    for r in 0..rows {
                        let visible = visible_keys(i0 + r, &dims, &spec);
                        let lse_row = lse_head[i0 + r];
                        let (seen, hidden) = probs[r * stride..r * stride + width].split_at_mut(visible);
                        hidden.fill(0.0);
                        if lse_row < FULLY_MASKED || may_see_hidden_keys(q_head, i0 + r, key_norm, &dims, &spec) {
                            // Done over all keys below (its log-sum-exp is the minimum's order).
                            seen.fill(0.0);
                            fallback.push(i0 + r);
                        } else {
                            exp_shifted(seen, pending, lse_row);
                        }
                    }
                    let d_out_block = &d_out_head[i0 * value_dim..(i0 + rows) * value_dim];
                    let q_block = &q_head[i0 * head_dim..(i0 + rows) * head_dim];
                    let dq_block = &mut dq_head[i0 * head_dim..(i0 + rows) * head_dim];
                    if let Some(tiles) = tiles.as_mut() {
                        tiles.gather(d_out_block, value_dim, probs, (rows, width, stride), true);
                        tiles.prob_grad(d_out_block, (rows, width, stride), value_dim, d_scores);
                    } else {
                        // dV += Pᵀ·dO
                        matmul(
                            (width, value_dim, rows),
                            dv_head,
                            (value_dim, 1),
                            true,
                            probs,
                            (1, stride),
                            d_out_block,
                            (value_dim, 1),
                            1.0,
                        );
                        // dP = dO·Vᵀ
                        matmul(
                            (rows, width, value_dim),
                            d_scores,
                            (stride, 1),
                            false,
                            d_out_block,
                            (value_dim, 1),
                            v_head,
                            (1, value_dim),
                            1.0,
                        );
                    }
                    // dS = P∘(dP − rowsum(dO∘O)), through the softcap's slope. On tiles the scale
                    // goes into dS before it is rounded (both products use it): in the same pass
                    // without a softcap, in a pass after the slope's with one.
                    let scale_in_pass = if tiles.is_some() && slope.is_none() {
                        spec.scale
                    } else {
                        1.0
                    };
                    for r in 0..rows {
                        let i = i0 + r;
                        let row = r * stride..r * stride + width;
                        softmax_grad_row(
                            &mut d_scores[row.clone()],
                            &probs[row.clone()],
                            &d_out_head[i * value_dim..(i + 1) * value_dim],
                            &out_head[i * value_dim..(i + 1) * value_dim],
                            scale_in_pass,
                        );
                        if let Some(slope) = slope.as_deref() {
                            d_scores[row.clone()]
                                .iter_mut()
                                .zip(&slope[row])
                                .for_each(|(d, s)| *d *= s);
                        }
                    }
                    if let Some(tiles) = tiles.as_mut() {
                        if slope.is_some() {
                            for r in 0..rows {
                                scale_row(&mut d_scores[r * stride..r * stride + width], spec.scale);
                            }
                        }
                        tiles.strip_times(d_scores, (rows, width, stride), None, head_dim, dq_block);
                        tiles.gather(q_block, head_dim, d_scores, (rows, width, stride), false);
                    } else {
                        // dQ = dS·K·scale
                        matmul(
                            (rows, head_dim, width),
                            dq_block,
                            (head_dim, 1),
                            false,
                            d_scores,
                            (stride, 1),
                            k_head,
                            (head_dim, 1),
                            spec.scale,
                        );
                        // dK += dSᵀ·Q·scale
                        matmul(
                            (width, head_dim, rows),
                            dk_head,
                            (head_dim, 1),
                            true,
                            d_scores,
                            (1, stride),
                            q_block,
                            (head_dim, 1),
                            spec.scale,
                        );
                    }
                    for i in fallback.drain(..) {
                        let row = FullRow::new(q_head, k_head, mask, i, &dims, &spec);
                        let g = &d_out_head[i * value_dim..(i + 1) * value_dim];
                        let o = &out_head[i * value_dim..(i + 1) * value_dim];
                        let delta: f32 = o.iter().zip(g).map(|(a, b)| a * b).sum();
                        let dq_row = &mut dq_head[i * head_dim..(i + 1) * head_dim];
                        row.backward(k_head, v_head, delta, g, &dims, &spec, dq_row, dk_head, dv_head);
                    }
                }
                if let Some(tiles) = tiles {
                    tiles.finish(&dims, dk_head, dv_head);
                }
            });
    }
    let groups = dims.groups();
    let sum_groups = |per_head: Vec<f32>, width: usize| -> Vec<f32> {
        if groups == 1 {
            return per_head;
        }
        let head_len = keys * width;
        let mut summed = vec![0f32; batch * kv_heads * head_len];
        summed.par_chunks_mut(head_len).enumerate().for_each(|(kvh, dst)| {
            for g in 0..groups {
                let src = &per_head[(kvh * groups + g) * head_len..][..head_len];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        });
        summed
    };
    let dk = sum_groups(dk_heads, head_dim);
    let dv = sum_groups(dv_heads, value_dim);
    (dq, dk, dv)
}

/// `[batch, kv_heads, keys, d]` → `[batch, kv_heads·groups, keys, d]`, each head repeated.
fn repeat_heads<B: burn::tensor::backend::Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let [batch, kv_heads, keys, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, groups, keys, d])
        .reshape([batch, kv_heads * groups, keys, d])
}

/// `[batch, kv_heads·groups, keys, d]` → `[batch, kv_heads, keys, d]`, summed over each group.
fn sum_heads<B: burn::tensor::backend::Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let [batch, heads, keys, d] = x.dims();
    x.reshape([batch, heads / groups, groups, keys, d])
        .sum_dim(2)
        .reshape([batch, heads / groups, keys, d])
}

/// Scaled, softcapped, masked scores on the device, and the softcap's slope.
fn device_scores<B: burn::tensor::backend::Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    mask: Option<Tensor<B, 4>>,
    spec: &AttentionSpec,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(spec.scale);
    let mut slope = None;
    if let Some(cap) = spec.softcap {
        let t = scores.div_scalar(cap).tanh();
        slope = Some(t.clone().powi_scalar(2).neg().add_scalar(1.0));
        scores = t.mul_scalar(cap);
    }
    if let Some(mask) = mask {
        scores = scores + mask;
    }
    (scores, slope)
}

/// The forward pass with burn's tensor ops (any backend): output and log-sum-exp.
///
/// # Shapes
/// As [`host_forward`].
pub fn device_attention_forward<B: burn::tensor::backend::Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: Option<FloatTensor<B>>,
    sinks: Option<FloatTensor<B>>,
    spec: AttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
    let dims = AttentionDims::of(&q.dims(), &k.dims(), &v.dims());
    let groups = dims.groups();
    let (scores, _) = device_scores(q, repeat_heads(k, groups), mask.map(float::<B, 4>), &spec);
    let (probs, lse) = device_softmax(scores, sinks, &dims);
    let out = probs.matmul(repeat_heads(v, groups));
    (prim(out), prim(lse.reshape([dims.batch, dims.heads, dims.seq])))
}

/// Softmax over the keys with the sink logits in the denominator: probabilities and the
/// log-sum-exp `[batch, heads, seq, 1]`.
fn device_softmax<B: burn::tensor::backend::Backend>(
    scores: Tensor<B, 4>,
    sinks: Option<FloatTensor<B>>,
    dims: &AttentionDims,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let mut max = scores.clone().max_dim(3);
    let sinks = sinks.map(|s| float::<B, 1>(s).reshape([1, dims.heads, 1, 1]));
    if let Some(sinks) = &sinks {
        max = max.max_pair(sinks.clone().expand([dims.batch, dims.heads, dims.seq, 1]));
    }
    let exp = (scores - max.clone()).exp();
    let mut sum = exp.clone().sum_dim(3);
    if let Some(sinks) = sinks {
        sum = sum + (sinks - max.clone()).exp();
    }
    let lse = max + sum.clone().log();
    (exp / sum, lse)
}

/// The backward pass with burn's tensor ops: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn device_attention_backward<B: burn::tensor::backend::Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: Option<FloatTensor<B>>,
    sinks: Option<FloatTensor<B>>,
    spec: AttentionSpec,
    out: FloatTensor<B>,
    _lse: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
    let dims = AttentionDims::of(&q.dims(), &k.dims(), &v.dims());
    let groups = dims.groups();
    let (k_rep, v_rep) = (repeat_heads(k, groups), repeat_heads(v, groups));
    let (scores, slope) = device_scores(q.clone(), k_rep.clone(), mask.map(float::<B, 4>), &spec);
    // Normalised again rather than `exp(scores − lse)`: a padded query row's log-sum-exp is of
    // the mask minimum's order, where rounding loses its `ln(sum)` (see [`FULLY_MASKED`]).
    let (probs, _) = device_softmax(scores, sinks, &dims);
    let d_out = float::<B, 4>(d_out);
    let dv = probs.clone().swap_dims(2, 3).matmul(d_out.clone());
    let d_probs = d_out.clone().matmul(v_rep.swap_dims(2, 3));
    let delta = (d_out * float::<B, 4>(out)).sum_dim(3);
    let mut d_scores = probs * (d_probs - delta);
    if let Some(slope) = slope {
        d_scores = d_scores * slope;
    }
    let dq = d_scores.clone().matmul(k_rep).mul_scalar(spec.scale);
    let dk = d_scores.swap_dims(2, 3).matmul(q).mul_scalar(spec.scale);
    (prim(dq), prim(sum_heads(dk, groups)), prim(sum_heads(dv, groups)))
}

pub(crate) mod autodiff {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::ops::FloatTensor;

    use super::AttentionSpec;
    use crate::quant::EmberBackend;

    /// What the backward pass of [`EmberBackend::fused_attention`] keeps: the inputs, the output and
    /// its log-sum-exp per row (no probabilities).
    #[derive(Debug, Clone)]
    pub(crate) struct AttentionState<B: EmberBackend> {
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        mask: Option<FloatTensor<B>>,
        sinks: Option<FloatTensor<B>>,
        spec: AttentionSpec,
        out: FloatTensor<B>,
        lse: FloatTensor<B>,
    }

    #[derive(Debug)]
    struct AttentionBackward;

    impl<B: EmberBackend> Backward<B, 3> for AttentionBackward {
        type State = AttentionState<B>;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_q, node_k, node_v] = ops.parents;
            let d_out = grads.consume::<B>(&ops.node);
            let s = ops.state;
            let (dq, dk, dv) = B::fused_attention_backward(s.q, s.k, s.v, s.mask, s.sinks, s.spec, s.out, s.lse, d_out);
            for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    /// [`EmberBackend::fused_attention`] under autodiff: the inner backend's fused forward, and
    /// [`EmberBackend::fused_attention_backward`] for the gradients.
    pub(crate) fn attention<B: EmberBackend, C: CheckpointStrategy>(
        q: FloatTensor<Autodiff<B, C>>,
        k: FloatTensor<Autodiff<B, C>>,
        v: FloatTensor<Autodiff<B, C>>,
        mask: Option<FloatTensor<Autodiff<B, C>>>,
        sinks: Option<FloatTensor<Autodiff<B, C>>>,
        spec: AttentionSpec,
    ) -> FloatTensor<Autodiff<B, C>> {
        let inner = |t: FloatTensor<Autodiff<B, C>>| Autodiff::<B, C>::inner(t);
        let mask = mask.map(inner);
        let sinks = sinks.map(inner);
        match AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.primitive, k.primitive, v.primitive);
                let (out, lse) =
                    B::fused_attention_forward(q.clone(), k.clone(), v.clone(), mask.clone(), sinks.clone(), spec);
                let state = AttentionState {
                    q,
                    k,
                    v,
                    mask,
                    sinks,
                    spec,
                    out: out.clone(),
                    lse,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_attention(
                q.primitive,
                k.primitive,
                v.primitive,
                mask,
                sinks,
                spec,
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::activation::softmax;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Tensor, TensorData};

    use super::*;

    type Cpu = NdArray<f32>;
    type Grad = Autodiff<Cpu>;

    /// Deterministic values in `[-amplitude, amplitude)` (an LCG from `seed`).
    pub(crate) fn random(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * amplitude
            })
            .collect()
    }

    /// `values` as a tensor of shape `dims` on the default device.
    pub(crate) fn tensor<B: Backend, const D: usize>(values: Vec<f32>, dims: [usize; D]) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(values, dims), &Default::default())
    }

    /// The composition the model used before the fused op (transformers' eager attention).
    fn reference<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4>,
        sinks: Option<Tensor<B, 1>>,
        spec: AttentionSpec,
    ) -> Tensor<B, 4> {
        let [batch, heads, seq, _] = q.dims();
        let groups = heads / k.dims()[1];
        let (k, v) = (repeat_heads(k, groups), repeat_heads(v, groups));
        let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(spec.scale);
        if let Some(cap) = spec.softcap {
            scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
        }
        let scores = scores + mask;
        let probs = match sinks {
            None => softmax(scores, 3),
            Some(sinks) => {
                let keys = scores.dims()[3];
                let sinks = sinks.reshape([1, heads, 1, 1]).expand([batch, heads, seq, 1]);
                softmax(Tensor::cat(vec![scores, sinks], 3), 3).narrow(3, 0, keys)
            }
        };
        probs.matmul(v)
    }

    /// A causal mask over `past + seq` keys with `pads[b]` leading pads per row (whose query
    /// rows see only masked keys) and an optional sliding window, `[batch, 1, seq, keys]`.
    fn mask(pads: &[usize], seq: usize, past: usize, window: Option<usize>) -> Vec<f32> {
        let keys = past + seq;
        let mut m = Vec::new();
        for &pad in pads {
            for i in 0..seq {
                let pos = i + past;
                for j in 0..keys {
                    let hidden = j > pos || j < pad || window.is_some_and(|w| pos - j >= w);
                    m.push(if hidden { f32::MIN } else { 0.0 });
                }
            }
        }
        m
    }

    struct Case {
        batch: usize,
        heads: usize,
        kv_heads: usize,
        seq: usize,
        past: usize,
        head_dim: usize,
        value_dim: usize,
        pads: Vec<usize>,
        window: Option<usize>,
        softcap: Option<f32>,
        sinks: bool,
    }

    /// Output and q/k/v gradients (of `Σ out∘w`) of the fused op on autodiff, against autodiff
    /// of the reference composition, padded query rows included.
    fn check(case: Case, device_path: bool) {
        let Case {
            batch,
            heads,
            kv_heads,
            seq,
            past,
            head_dim,
            value_dim,
            ..
        } = case;
        let keys = past + seq;
        let spec = AttentionSpec {
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: case.softcap,
            causal: true,
            bf16_products: false,
        };
        let mask_values = mask(&case.pads, seq, past, case.window);
        let q = random(batch * heads * seq * head_dim, 1, 1.5);
        let k = random(batch * kv_heads * keys * head_dim, 2, 1.5);
        let v = random(batch * kv_heads * keys * value_dim, 3, 1.0);
        let sinks = case.sinks.then(|| random(heads, 4, 2.0));
        let weights = random(batch * heads * seq * value_dim, 5, 1.0);
        let run = |fused: bool| {
            let qt = tensor::<Grad, 4>(q.clone(), [batch, heads, seq, head_dim]).require_grad();
            let kt = tensor::<Grad, 4>(k.clone(), [batch, kv_heads, keys, head_dim]).require_grad();
            let vt = tensor::<Grad, 4>(v.clone(), [batch, kv_heads, keys, value_dim]).require_grad();
            let m = tensor::<Grad, 4>(mask_values.clone(), [batch, 1, seq, keys]);
            let s = sinks.clone().map(|s| tensor::<Grad, 1>(s, [heads]));
            let out = if !fused {
                reference(qt.clone(), kt.clone(), vt.clone(), m, s, spec)
            } else if device_path {
                // The GPU backends' default path, run on the CPU through the same autodiff op.
                let (out, _) = device_attention_forward::<Cpu>(
                    prim(qt.clone().inner()),
                    prim(kt.clone().inner()),
                    prim(vt.clone().inner()),
                    Some(prim(m.inner())),
                    s.map(|s| prim(s.inner())),
                    spec,
                );
                return (float::<Cpu, 4>(out).into_data().to_vec::<f32>().unwrap(), None);
            } else {
                attention(qt.clone(), kt.clone(), vt.clone(), Some(m), s, spec)
            };
            let w = tensor::<Grad, 4>(weights.clone(), [batch, heads, seq, value_dim]);
            let values = out.clone().into_data().to_vec::<f32>().unwrap();
            let grads = (out * w).sum().backward();
            let g = |t: &Tensor<Grad, 4>| t.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
            (values, Some([g(&qt), g(&kt), g(&vt)]))
        };
        let (expected, expected_grads) = run(false);
        let (actual, actual_grads) = run(true);
        let worst = actual
            .iter()
            .zip(&expected)
            .fold(0f32, |m, (a, e)| m.max((a - e).abs()));
        assert!(worst <= 1e-5, "output: max abs diff {worst:.3e}");
        if let (Some(actual), Some(expected)) = (actual_grads, expected_grads) {
            for (name, a, e) in [
                ("dq", &actual[0], &expected[0]),
                ("dk", &actual[1], &expected[1]),
                ("dv", &actual[2], &expected[2]),
            ] {
                let scale = e.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = a.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(scale > 0.0, "{name}: the reference gradient is zero");
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "{name}: max abs diff {diff:.3e} (scale {scale:.3e})"
                );
            }
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            // GQA, two sequences (one left-padded), two query blocks, prefill.
            Case {
                batch: 2,
                heads: 6,
                kv_heads: 2,
                seq: 70,
                past: 0,
                head_dim: 16,
                value_dim: 16,
                pads: vec![0, 5],
                window: None,
                softcap: None,
                sinks: false,
            },
            // Decoding-like: a few queries over a longer cache, a sliding window, softcap.
            Case {
                batch: 1,
                heads: 4,
                kv_heads: 4,
                seq: 3,
                past: 40,
                head_dim: 8,
                value_dim: 8,
                pads: vec![42],
                window: Some(16),
                softcap: Some(5.0),
                sinks: false,
            },
            // A plain causal mask (no pads, no window): the kernels drop it and skip by position.
            Case {
                batch: 2,
                heads: 2,
                kv_heads: 1,
                seq: 40,
                past: 3,
                head_dim: 8,
                value_dim: 8,
                pads: vec![0, 0],
                window: None,
                softcap: None,
                sinks: false,
            },
            // Sinks, MLA-like value width, softcap, one block.
            Case {
                batch: 2,
                heads: 4,
                kv_heads: 1,
                seq: 20,
                past: 4,
                head_dim: 12,
                value_dim: 6,
                pads: vec![3, 0],
                window: Some(9),
                softcap: Some(3.0),
                sinks: true,
            },
        ]
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_libm_and_zero_for_masked_scores() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (fast, exact) = (fast_exp(x), x.exp());
            assert!(
                (fast - exact).abs() <= 2.0 * f32::EPSILON * exact,
                "e^{x}: {fast} vs {exact}"
            );
            x += 0.0137;
        }
        assert_eq!(fast_exp(f32::MIN), 0.0);
        assert_eq!(fast_exp(-1e30), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        // The row kernels (compiled for the CPU's widest vectors) give fast_exp's values bit for bit.
        let scores: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 * 0.19 - 150.0).collect();
        let mut row = scores.clone();
        exp_shifted(&mut row, 1.0, 3.0);
        for (got, x) in row.iter().zip(&scores) {
            assert_eq!(got.to_bits(), fast_exp(x - 3.0).to_bits(), "e^({x} - 3)");
        }
        let best = scores.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        assert_eq!(row_max(&scores), best);
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let sum = exp_shifted(&mut row, 1.0, 1.0);
        let exact: f32 = (0..37).map(|i| (i as f32 * 0.1 - 1.0).exp()).sum();
        assert!((sum - exact).abs() <= 1e-5 * exact, "{sum} vs {exact}");
    }

    #[test]
    fn ndarray_tensors_are_read_in_place_or_copied_in_logical_order() {
        let t = tensor::<Cpu, 4>(random(2 * 3 * 4 * 5, 11, 1.0), [2, 3, 4, 5]);
        let whole = prim(t.clone());
        let (contiguous, dims) = Cpu::host_f32::<4>(&whole);
        assert!(matches!(contiguous, Cow::Borrowed(_)), "a contiguous array is borrowed");
        assert_eq!(dims, [2, 3, 4, 5]);
        for strided in [t.clone().swap_dims(1, 2), t.clone().swap_dims(2, 3), t.narrow(3, 1, 3)] {
            let expected = strided.clone().into_data().to_vec::<f32>().unwrap();
            let primitive = prim(strided.clone());
            let (values, dims) = Cpu::host_f32::<4>(&primitive);
            assert_eq!(dims, strided.dims());
            assert_eq!(&*values, &expected[..]);
        }
    }

    #[test]
    fn only_a_plain_causal_mask_is_dropped() {
        let (seq, past) = (5, 2);
        let dims = AttentionDims {
            batch: 2,
            heads: 1,
            kv_heads: 1,
            seq,
            keys: seq + past,
            head_dim: 4,
            value_dim: 4,
        };
        let spec = AttentionSpec {
            scale: 1.0,
            softcap: None,
            causal: true,
            bf16_products: false,
        };
        let shape = [2, 1, seq, seq + past];
        let plain = mask(&[0, 0], seq, past, None);
        assert!(HostMask::new(&plain, &shape, &dims)
            .unless_plain_causal(&dims, &spec)
            .is_none());
        for other in [mask(&[0, 1], seq, past, None), mask(&[0, 0], seq, past, Some(3))] {
            assert!(HostMask::new(&other, &shape, &dims)
                .unless_plain_causal(&dims, &spec)
                .is_some());
        }
        let not_causal = AttentionSpec { causal: false, ..spec };
        assert!(HostMask::new(&plain, &shape, &dims)
            .unless_plain_causal(&dims, &not_causal)
            .is_some());
    }

    #[test]
    fn the_cpu_kernels_match_autodiff_of_eager_attention() {
        for case in cases() {
            check(case, false);
        }
    }

    #[test]
    fn the_device_composition_matches_eager_attention() {
        for case in cases() {
            check(case, true);
        }
    }

    #[test]
    fn the_device_backward_matches_the_cpu_backward() {
        // Both backward passes on the same forward results (the GPU path's formulas on the CPU).
        let (batch, heads, kv_heads, seq, past, d, dv) = (2, 6, 3, 9, 5, 8, 4); // row 1: 7 pads
        let keys = seq + past;
        let m = mask(&[0, 7], seq, past, Some(7));
        let spec = AttentionSpec {
            scale: 0.3,
            softcap: Some(4.0),
            causal: true,
            bf16_products: false,
        };
        let q = tensor::<Cpu, 4>(random(batch * heads * seq * d, 7, 1.0), [batch, heads, seq, d]);
        let k = tensor::<Cpu, 4>(random(batch * kv_heads * keys * d, 8, 1.0), [batch, kv_heads, keys, d]);
        let v = tensor::<Cpu, 4>(
            random(batch * kv_heads * keys * dv, 9, 1.0),
            [batch, kv_heads, keys, dv],
        );
        let mask = tensor::<Cpu, 4>(m, [batch, 1, seq, keys]);
        let g = tensor::<Cpu, 4>(random(batch * heads * seq * dv, 10, 1.0), [batch, heads, seq, dv]);
        let (out, lse) = host_forward::<Cpu>(
            prim(q.clone()),
            prim(k.clone()),
            prim(v.clone()),
            Some(prim(mask.clone())),
            None,
            spec,
        );
        let (dout, dlse) = device_attention_forward::<Cpu>(
            prim(q.clone()),
            prim(k.clone()),
            prim(v.clone()),
            Some(prim(mask.clone())),
            None,
            spec,
        );
        let close = |a: FloatTensor<Cpu>, b: FloatTensor<Cpu>, what: &str, dims: usize| {
            let (a, b) = if dims == 3 {
                (
                    float::<Cpu, 3>(a).into_data().to_vec::<f32>().unwrap(),
                    float::<Cpu, 3>(b).into_data().to_vec::<f32>().unwrap(),
                )
            } else {
                (
                    float::<Cpu, 4>(a).into_data().to_vec::<f32>().unwrap(),
                    float::<Cpu, 4>(b).into_data().to_vec::<f32>().unwrap(),
                )
            };
            let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5, "{what}: {diff:.3e}");
        };
        close(out.clone(), dout, "out", 4);
        close(lse.clone(), dlse, "lse", 3);
        let host = host_backward::<Cpu>(
            prim(q.clone()),
            prim(k.clone()),
            prim(v.clone()),
            Some(prim(mask.clone())),
            None,
            spec,
            out.clone(),
            lse.clone(),
            prim(g.clone()),
        );
        let device = device_attention_backward::<Cpu>(
            prim(q),
            prim(k),
            prim(v),
            Some(prim(mask)),
            None,
            spec,
            out,
            lse,
            prim(g),
        );
        close(host.0, device.0, "dq", 4);
        close(host.1, device.1, "dk", 4);
        close(host.2, device.2, "dv", 4);
    }

    /// The tile path's formulas in f64 (see [`AttentionSpec::bf16_products`]): `r(·)` rounds to
    /// bf16; `S = scale·r(Q)·r(K)ᵀ`, `P` softmax in full precision, `O = r(P)·r(V)`;
    /// `dV = r(P)ᵀ·r(dO)`, `dP = r(dO)·r(V)ᵀ`, `dS = scale·P∘(dP − δ)`, `dQ = r(dS)·r(K)`,
    /// `dK = r(dS)ᵀ·r(Q)`. Rows that see only masked keys go over all keys unrounded (the
    /// kernels' exact path). Returns `[out, dq, dk, dv]` and, per element, what one rounding
    /// step (one bf16 ulp) of its largest rounded probability or score gradient term would
    /// move it: `P` and `dS` are computed in f32 by the kernels, and a value that close to a
    /// rounding boundary may round the other way there.
    #[allow(clippy::too_many_arguments)]
    fn rounded_reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        sinks: Option<&[f32]>,
        dims: AttentionDims,
        spec: AttentionSpec,
        d_out: &[f32],
    ) -> ([Vec<f32>; 4], [Vec<f32>; 4]) {
        let AttentionDims {
            batch,
            heads,
            kv_heads,
            seq,
            keys,
            head_dim: d,
            value_dim: dv,
        } = dims;
        let r = |x: f32, round: bool| {
            if round {
                crate::amx::bf16_value(crate::amx::bf16_bits(x)) as f64
            } else {
                x as f64
            }
        };
        let mut out = vec![0f64; batch * heads * seq * dv];
        let (mut dq, mut dk, mut dvv) = (
            vec![0f64; q.len()],
            vec![0f64; batch * kv_heads * keys * d],
            vec![0f64; batch * kv_heads * keys * dv],
        );
        let mut flips = [out.clone(), dq.clone(), dk.clone(), dvv.clone()];
        let ulp = |x: f64| x.abs() / 128.0;
        let scale = spec.scale as f64;
        for b in 0..batch {
            for h in 0..heads {
                let kvh = b * kv_heads + h / (heads / kv_heads);
                let bh = b * heads + h;
                for i in 0..seq {
                    let qi = &q[(bh * seq + i) * d..][..d];
                    let visible = i + 1 + keys - seq;
                    let raw: Vec<(f64, f64)> = (0..keys)
                        .map(|j| {
                            let kj = &k[(kvh * keys + j) * d..][..d];
                            let dot: f64 = qi.iter().zip(kj).map(|(&a, &c)| r(a, true) * r(c, true)).sum();
                            let mut x = dot * scale;
                            let mut slope = 1.0;
                            if let Some(cap) = spec.softcap {
                                let t = (x / cap as f64).tanh();
                                x = cap as f64 * t;
                                slope = 1.0 - t * t;
                            }
                            (x + mask[(b * seq + i) * keys + j] as f64, slope)
                        })
                        .collect();
                    let exact = raw[..visible].iter().all(|&(x, _)| x < FULLY_MASKED as f64);
                    let row_keys = if exact { keys } else { visible };
                    let round = !exact;
                    // The exact path's scores are the unrounded ones.
                    let scores: Vec<(f64, f64)> = if exact {
                        (0..keys)
                            .map(|j| {
                                let kj = &k[(kvh * keys + j) * d..][..d];
                                let dot: f64 = qi.iter().zip(kj).map(|(&a, &c)| a as f64 * c as f64).sum();
                                let mut x = dot * scale;
                                let mut slope = 1.0;
                                if let Some(cap) = spec.softcap {
                                    let t = (x / cap as f64).tanh();
                                    x = cap as f64 * t;
                                    slope = 1.0 - t * t;
                                }
                                (x + mask[(b * seq + i) * keys + j] as f64, slope)
                            })
                            .collect()
                    } else {
                        raw
                    };
                    let sink = sinks.map(|s| s[h] as f64);
                    let max = scores[..row_keys]
                        .iter()
                        .fold(sink.unwrap_or(f64::NEG_INFINITY), |a, &(x, _)| a.max(x));
                    let sum: f64 = scores[..row_keys].iter().map(|&(x, _)| (x - max).exp()).sum::<f64>()
                        + sink.map_or(0.0, |s| (s - max).exp());
                    let p: Vec<f64> = scores[..row_keys].iter().map(|&(x, _)| (x - max).exp() / sum).collect();
                    let oi = &mut out[(bh * seq + i) * dv..][..dv];
                    for (j, &pj) in p.iter().enumerate() {
                        let vj = &v[(kvh * keys + j) * dv..][..dv];
                        let pr = r(pj as f32, round);
                        oi.iter_mut().zip(vj).for_each(|(o, &x)| *o += pr * r(x, round));
                        let flip = &mut flips[0][(bh * seq + i) * dv..][..dv];
                        flip.iter_mut()
                            .zip(vj)
                            .for_each(|(f, &x)| *f = f.max(ulp(pr * x as f64)));
                    }
                    let gi = &d_out[(bh * seq + i) * dv..][..dv];
                    let delta: f64 = oi.iter().zip(gi).map(|(&o, &g)| o * g as f64).sum();
                    for (j, &pj) in p.iter().enumerate() {
                        let vj = &v[(kvh * keys + j) * dv..][..dv];
                        let d_p: f64 = gi.iter().zip(vj).map(|(&g, &x)| r(g, round) * r(x, round)).sum();
                        let ds = r((pj * (d_p - delta) * scores[j].1 * scale) as f32, round);
                        let pr = r(pj as f32, round);
                        let dvj = &mut dvv[(kvh * keys + j) * dv..][..dv];
                        dvj.iter_mut().zip(gi).for_each(|(o, &g)| *o += pr * r(g, round));
                        let kj = &k[(kvh * keys + j) * d..][..d];
                        let dqi = &mut dq[(bh * seq + i) * d..][..d];
                        dqi.iter_mut().zip(kj).for_each(|(o, &x)| *o += ds * r(x, round));
                        let dkj = &mut dk[(kvh * keys + j) * d..][..d];
                        dkj.iter_mut().zip(qi).for_each(|(o, &x)| *o += ds * r(x, round));
                        for c in 0..d {
                            let f = &mut flips[1][(bh * seq + i) * d + c];
                            *f = f.max(ulp(ds * kj[c] as f64));
                            let f = &mut flips[2][(kvh * keys + j) * d + c];
                            *f = f.max(ulp(ds * qi[c] as f64));
                        }
                        for c in 0..dv {
                            let f = &mut flips[3][(kvh * keys + j) * dv + c];
                            *f = f.max(ulp(pr * gi[c] as f64));
                        }
                    }
                }
            }
        }
        let f32s = |t: Vec<f64>| t.into_iter().map(|x| x as f32).collect();
        ([out, dq, dk, dvv].map(f32s), flips.map(f32s))
    }

    #[test]
    fn bf16_products_round_their_operands_as_the_reference_formulas_say() {
        // Two query blocks (the second 44 rows: padded tiles), head widths off the tile sizes,
        // GQA, a padded sequence (its first rows take the exact path), sinks; then softcap, a
        // sliding window and a cache (keys ≠ queries); then a plain causal mask (dropped: the
        // scale folded into the exponentials, the normalisation into the packing of P).
        let cases = [
            (2, 4, 2, BLOCK_ROWS + 44, 0, 40, 24, vec![0, 7], None, None, true),
            (1, 2, 1, 70, 10, 64, 64, vec![3], Some(30), Some(5.0), false),
            (1, 3, 1, BLOCK_ROWS + 20, 0, 32, 48, vec![0], None, None, false),
        ];
        for (batch, heads, kv_heads, seq, past, d, dv, pads, window, softcap, with_sinks) in cases {
            let keys = seq + past;
            let dims = AttentionDims {
                batch,
                heads,
                kv_heads,
                seq,
                keys,
                head_dim: d,
                value_dim: dv,
            };
            let spec = AttentionSpec {
                scale: 1.0 / (d as f32).sqrt(),
                softcap,
                causal: true,
                bf16_products: true,
            };
            let m = mask(&pads, seq, past, window);
            let q = random(batch * heads * seq * d, 21, 1.5);
            let k = random(batch * kv_heads * keys * d, 22, 1.5);
            let v = random(batch * kv_heads * keys * dv, 23, 1.0);
            let g = random(batch * heads * seq * dv, 24, 1.0);
            let sinks = with_sinks.then(|| random(heads, 25, 2.0));
            let host_mask = HostMask::new(&m, &[batch, 1, seq, keys], &dims);
            let run = |spec: AttentionSpec| {
                let (out, lse) = host_attention_forward(&q, &k, &v, Some(host_mask), sinks.as_deref(), dims, spec);
                let (dq, dk, dv) = host_attention_backward(&q, &k, &v, Some(host_mask), dims, spec, &out, &lse, &g);
                [out, dq, dk, dv]
            };
            let tiles = run(spec);
            let f32_products = run(AttentionSpec {
                bf16_products: false,
                ..spec
            });
            let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            for (n, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                let scale = f32_products[n].iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(scale > 0.0, "{name}: zero");
                if !crate::amx::available() {
                    // Without AMX the products stay f32: the same kernels, bit for bit.
                    assert_eq!(tiles[n], f32_products[n], "{name} without AMX");
                    continue;
                }
                let (reference, flips) = rounded_reference(&q, &k, &v, &m, sinks.as_deref(), dims, spec, &g);
                let tight = 2e-5 * scale;
                let mut flipped = 0;
                for (i, ((a, e), f)) in tiles[n].iter().zip(&reference[n]).zip(&flips[n]).enumerate() {
                    let diff = (a - e).abs();
                    flipped += usize::from(diff > tight);
                    assert!(diff <= tight + f, "{name}[{i}]: {a} vs {e} (one rounding step: {f})");
                }
                let to_f32 = max_diff(&tiles[n], &f32_products[n]) / scale;
                // One flipped score gradient moves a whole row of dQ and one of dK: a few rows.
                assert!(
                    flipped * 20 <= tiles[n].len(),
                    "{name}: {flipped} of {} values beyond 2e-5 of the rounded formulas",
                    tiles[n].len()
                );
                // The rounding is there: f32 products differ by a bf16 rounding's order.
                assert!(to_f32 > 1e-4 && to_f32 < 2e-2, "{name}: {to_f32:.3e} from f32 products");
            }
        }
    }
}
