//! The frozen linear layer with an optional low-rank adapter.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, FloatDType, Int, Tensor, TensorData};

use crate::config::{InitLoraWeights, ModuleLora};
use crate::error::{LoraError, Result};
use crate::quant::{quant_input_grad, quant_linear, EmberBackend, QuantMatrix, QuantizedWeight};

/// A low-rank adapter `s·B(A(dropout(x)))` attached to a linear layer.
///
/// PEFT layout: `lora_a` is `[r, in]`, `lora_b` is `[out, r]`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `lora_A.weight`, shape `[r, in]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `lora_B.weight`, shape `[out, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// The scale `s` of the adapter branch: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub scaling: f64,
    /// Dropout probability applied to the adapter's input during training.
    pub dropout: f64,
    /// When false the adapter branch is skipped (the base layer alone is computed).
    pub enabled: bool,
    /// True while `s·B·A` is folded into the base weight (the branch is then skipped).
    pub merged: bool,
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter for a `[out, in]` layer, initialised as PEFT does.
    ///
    /// `true`: A ~ U(−1/√in, 1/√in) (`kaiming_uniform_(a=√5)`), B = 0. `"gaussian"`:
    /// A ~ N(0, 1/r²), B = 0. `false`: A as `true`, B ~ U(−1/√r, 1/√r).
    pub fn init(
        out: usize,
        inp: usize,
        lora: ModuleLora,
        dropout: f64,
        init: InitLoraWeights,
        device: &B::Device,
    ) -> Self {
        let r = lora.r;
        let kaiming =
            |fan_in: usize| Distribution::Uniform(-1.0 / (fan_in as f64).sqrt(), 1.0 / (fan_in as f64).sqrt());
        let a = match init {
            InitLoraWeights::Named(crate::config::InitName::Gaussian) => {
                Tensor::random([r, inp], Distribution::Normal(0.0, 1.0 / r as f64), device)
            }
            InitLoraWeights::Bool(_) => Tensor::random([r, inp], kaiming(inp), device),
        };
        let b = match init {
            InitLoraWeights::Bool(false) => Tensor::random([out, r], kaiming(r), device),
            _ => Tensor::zeros([out, r], device),
        };
        Self::from_tensors(a, b, lora.scaling, dropout)
    }

    /// An adapter from given A `[r, in]` and B `[out, r]`.
    pub fn from_tensors(lora_a: Tensor<B, 2>, lora_b: Tensor<B, 2>, scaling: f64, dropout: f64) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            scaling,
            dropout,
            enabled: true,
            merged: false,
        }
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[0]
    }

    /// `s·B·A` in f32, shape `[out, in]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b.val().matmul(self.lora_a.val()).mul_scalar(self.scaling)
    }
}

/// A frozen base weight `[out, in]`: a float tensor (f32, bf16 or f16) or quantized blocks.
#[derive(Module, Debug)]
pub enum FrozenWeight<B: Backend> {
    /// A float tensor, never trained.
    Dense(Param<Tensor<B, 2>>),
    /// Quantized blocks on the host (CPU backends multiply them with fused kernels; GPU
    /// backends keep a device copy of the codes), see [`crate::quant`].
    Quantized(QuantizedWeight),
}

impl<B: Backend> FrozenWeight<B> {
    /// A float weight, marked as not requiring gradients (its memory layout is kept).
    ///
    /// # Shapes
    /// - `weight`: `[out, in]`
    pub fn from_tensor(weight: Tensor<B, 2>) -> Self {
        FrozenWeight::Dense(Param::from_tensor(weight).set_require_grad(false))
    }

    /// A quantized weight.
    pub fn from_quantized(matrix: QuantMatrix) -> Self {
        FrozenWeight::Quantized(QuantizedWeight(Arc::new(matrix)))
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenWeight::Dense(w) => w.val().dims(),
            FrozenWeight::Quantized(q) => q.0.shape(),
        }
    }

    /// The float tensor, when the weight is not quantized.
    pub fn dense(&self) -> Option<Tensor<B, 2>> {
        match self {
            FrozenWeight::Dense(w) => Some(w.val()),
            FrozenWeight::Quantized(_) => None,
        }
    }

    /// The quantized blocks, when the weight is quantized.
    pub fn quantized(&self) -> Option<&Arc<QuantMatrix>> {
        match self {
            FrozenWeight::Dense(_) => None,
            FrozenWeight::Quantized(q) => Some(&q.0),
        }
    }

    /// The weight as a float tensor in f32 on `device` (dequantized when quantized).
    pub fn to_f32(&self, device: &B::Device) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(w) => w.val().cast(FloatDType::F32),
            FrozenWeight::Quantized(q) => Tensor::from_data(TensorData::new(q.0.dequantize(), q.0.shape()), device),
        }
    }

    /// How the weight is stored: `float32`, `bfloat16`, `float16` or the block format (`Q4_0`).
    pub fn storage(&self) -> String {
        match self {
            FrozenWeight::Dense(w) => match w.val().dtype() {
                burn::tensor::DType::BF16 => "bfloat16".into(),
                burn::tensor::DType::F16 => "float16".into(),
                _ => "float32".into(),
            },
            FrozenWeight::Quantized(q) => q.0.format().name().into(),
        }
    }

    /// Bytes the weight takes.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => {
                let w = w.val();
                w.shape().num_elements() * w.dtype().size()
            }
            FrozenWeight::Quantized(q) => q.0.bytes(),
        }
    }
}

impl<B: EmberBackend> FrozenWeight<B> {
    /// `x·Wᵀ (+ b)`; differentiable in `x` (see [`linear`] and [`crate::quant::quant_linear`]).
    ///
    /// # Shapes
    /// - `x`: `[..., in]`; `bias`: `[out]`; output: `[..., out]`
    pub fn linear<const D: usize>(&self, x: Tensor<B, D>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
        match self {
            FrozenWeight::Dense(w) => linear(x, w.val(), bias),
            FrozenWeight::Quantized(q) => {
                let dtype = x.dtype();
                let y = quant_linear(x, &q.0);
                match bias {
                    Some(b) => y + b.cast(dtype).unsqueeze::<D>(),
                    None => y,
                }
            }
        }
    }

    /// `g·W` in f32: the gradient of `x·Wᵀ` with respect to `x`, for hand-written backward
    /// passes (the chunked loss's frozen output head).
    ///
    /// # Shapes
    /// - `g`: `[m, out]`; output: `[m, in]`
    pub fn input_grad(&self, g: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            // (g·W) as (Wᵀ·gᵀ)ᵀ: the weight is stored as its transpose (matmul_layout), so Wᵀ is
            // read in place and only `g` is transposed. A half weight multiplies g cast to its
            // dtype (burn does not promote).
            FrozenWeight::Dense(w) => {
                let w = w.val();
                let g = g.cast(w.dtype()).transpose();
                w.transpose().matmul(g).transpose().cast(FloatDType::F32)
            }
            FrozenWeight::Quantized(q) => quant_input_grad(g, &q.0),
        }
    }

    /// Rows `ids` of the weight, as f32 (an embedding lookup in a frozen table).
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]`; output: `[batch, seq, in]`
    pub fn rows(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match self {
            // A half-precision table gives f32 rows: the residual stream is always f32.
            FrozenWeight::Dense(w) => burn::tensor::module::embedding(w.val(), ids).cast(FloatDType::F32),
            FrozenWeight::Quantized(q) => {
                let [batch, seq] = ids.dims();
                let device = ids.device();
                let ids: Vec<usize> = ids
                    .into_data()
                    .convert::<i64>()
                    .to_vec::<i64>()
                    .expect("int ids")
                    .into_iter()
                    .map(|i| i as usize)
                    .collect();
                let cols = q.0.shape()[1];
                Tensor::from_data(TensorData::new(q.0.rows(&ids), [batch, seq, cols]), &device)
            }
        }
    }
}

/// A linear layer whose base weight is frozen, with an optional LoRA adapter.
///
/// The weight keeps HuggingFace's layout `[out, in]`, so checkpoints load without transposes.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// The frozen base weight, shape `[out, in]`.
    pub weight: FrozenWeight<B>,
    /// The frozen base bias, shape `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The trainable adapter, if one is attached.
    pub adapter: Option<LoraAdapter<B>>,
}

impl<B: Backend> LoraLinear<B> {
    /// Wraps a base weight and bias; both are marked as not requiring gradients.
    ///
    /// # Shapes
    /// - `weight`: `[out, in]`
    /// - `bias`: `[out]`
    pub fn frozen(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::with_weight(FrozenWeight::from_tensor(matmul_layout(weight)), bias)
    }

    /// Wraps a quantized base weight and a bias.
    ///
    /// # Shapes
    /// - `weight`: `[out, in]`; `bias`: `[out]`
    pub fn quantized(weight: QuantMatrix, bias: Option<Tensor<B, 1>>) -> Self {
        Self::with_weight(FrozenWeight::from_quantized(weight), bias)
    }

    /// Wraps a frozen weight of either kind and a bias.
    ///
    /// # Shapes
    /// - `weight`: `[out, in]`; `bias`: `[out]`
    pub fn with_weight(weight: FrozenWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight,
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            adapter: None,
        }
    }

    /// Attaches `adapter`, checking its shapes against the base weight.
    ///
    /// # Shapes
    /// - `adapter.lora_a`: `[r, in]`; `adapter.lora_b`: `[out, r]`
    pub fn attach(&mut self, adapter: LoraAdapter<B>, path: &str) -> Result<()> {
        let [out, inp] = self.dims();
        let [r, a_in] = adapter.lora_a.val().dims();
        let b_dims = adapter.lora_b.val().dims();
        if a_in != inp {
            return Err(LoraError::ShapeMismatch {
                key: format!("{path}.lora_A.weight"),
                expected: vec![r, inp],
                found: vec![r, a_in],
            });
        }
        if b_dims != [out, r] {
            return Err(LoraError::ShapeMismatch {
                key: format!("{path}.lora_B.weight"),
                expected: vec![out, r],
                found: b_dims.to_vec(),
            });
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Folds `s·B·A` into the base weight; the adapter stays attached but is skipped.
    /// Errors (and changes nothing) if the result would hold NaN or infinity. A quantized
    /// weight is dequantized first and the merged weight kept in f32 (re-quantizing a merged
    /// weight would move it by up to half a quantization step).
    pub fn merge(&mut self, path: &str) -> Result<()> {
        let Some(adapter) = self.adapter.as_mut().filter(|a| !a.merged) else {
            return Ok(());
        };
        let delta = adapter.delta_weight();
        // In f32, then stored back in the base's dtype (bf16 stays bf16).
        let (weight, dtype) = match &self.weight {
            FrozenWeight::Dense(w) => (w.val().cast(FloatDType::F32), w.val().dtype()),
            FrozenWeight::Quantized(_) => (self.weight.to_f32(&delta.device()), burn::tensor::DType::F32),
        };
        let merged = (weight + delta).cast(dtype);
        let non_finite: i64 = merged.clone().is_finite().bool_not().int().sum().into_scalar().elem();
        if non_finite > 0 {
            return Err(LoraError::NonFinite {
                key: format!("{path}.weight"),
            });
        }
        self.weight = FrozenWeight::from_tensor(matmul_layout(merged));
        adapter.merged = true;
        Ok(())
    }

    /// Undoes [`LoraLinear::merge`] by subtracting `s·B·A` again (a weight that was quantized
    /// stays in f32).
    pub fn unmerge(&mut self) {
        if let Some(adapter) = self.adapter.as_mut().filter(|a| a.merged) {
            let device = adapter.lora_a.val().device();
            let weight = self.weight.to_f32(&device);
            let dtype = self.weight.dense().map_or(burn::tensor::DType::F32, |w| w.dtype());
            let restored = (weight - adapter.delta_weight()).cast(dtype);
            self.weight = FrozenWeight::from_tensor(matmul_layout(restored));
            adapter.merged = false;
        }
    }

    /// `[out, in]` of the base weight.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.dims()
    }
}

impl<B: EmberBackend> LoraLinear<B> {
    /// Applies the layer. A base weight stored in a half dtype multiplies `x` cast to that
    /// dtype (see [`linear`]), a quantized one goes through [`crate::quant::quant_linear`]; the
    /// adapter branch computes in `x`'s dtype (f32).
    ///
    /// # Shapes
    /// - `x`: `[..., in]`
    /// - output: `[..., out]`
    ///
    /// An adapter on a float weight in `x`'s dtype runs as one op with its own backward pass
    /// ([`crate::fused::lora_linear`]); on other weights the adapter branch is composed.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        let Some(adapter) = self.adapter.as_ref().filter(|a| a.enabled && !a.merged) else {
            return self.weight.linear(x, bias);
        };
        // Dropout is active only under autodiff, i.e. while training.
        let dropped = (adapter.dropout > 0.0 && B::ad_enabled(&x.device()))
            .then(|| burn::nn::DropoutConfig::new(adapter.dropout).init().forward(x.clone()));
        // The base as one op with the adapter: a float weight in x's dtype, or host blocks
        // (quantized, or a bf16 base on a CPU backend) under f32 activations.
        let fused_base = match &self.weight {
            FrozenWeight::Dense(w) => {
                let w = w.val();
                (w.dtype() == x.dtype() && !crate::quant::is_tracked(&w))
                    .then(|| crate::fused::LoraBase::Dense(w.into_primitive().tensor()))
            }
            FrozenWeight::Quantized(q) => {
                (x.dtype() == burn::tensor::DType::F32).then(|| crate::fused::LoraBase::Blocks(q.0.clone()))
            }
        };
        match fused_base {
            Some(weight) => {
                let (dims, dtype) = (x.dims(), x.dtype());
                let [out, inp] = self.dims();
                let rows = dims[..D - 1].iter().product::<usize>();
                let y = crate::fused::lora_linear_on(
                    x.reshape([rows, inp]),
                    dropped.map(|x| x.reshape([rows, inp])),
                    weight,
                    bias.map(|b| b.cast(dtype)),
                    adapter.lora_a.val().cast(dtype),
                    adapter.lora_b.val().cast(dtype),
                    adapter.scaling as f32,
                );
                let mut out_dims = dims;
                out_dims[D - 1] = out;
                y.reshape(out_dims)
            }
            None => {
                let base = self.weight.linear(x.clone(), bias);
                let low = linear(dropped.unwrap_or(x), adapter.lora_a.val(), None);
                let delta = linear(low, adapter.lora_b.val(), None);
                base + delta.mul_scalar(adapter.scaling)
            }
        }
    }
}

/// `W` `[out, in]` re-laid out in memory as its transpose `[in, out]` (one copy), still seen as
/// `[out, in]`: [`linear`]'s `Wᵀ` is then contiguous, and CPU matmuls read it in place instead of
/// copying the whole weight on every call (burn-ndarray makes non-contiguous operands
/// contiguous; for one-token decoding that copy was half of the time).
///
/// # Shapes
/// - `weight`, output: `[out, in]`
pub fn matmul_layout<B: Backend>(weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let [out, inp] = weight.dims();
    weight.transpose().reshape([inp, out]).transpose()
}

/// `x·Wᵀ + b` with `W` in HF layout `[out, in]`.
///
/// When `W` is stored in another dtype than `x` (a bf16/f16 frozen base under f32 activations),
/// the product is computed in `W`'s dtype and returned in `x`'s: `x` is cast explicitly, since
/// burn does not promote mixed dtypes (a cubecl kernel with an f32 and a bf16 operand reads
/// garbage). The casts are differentiable, so `x`'s gradient flows through in the same way.
/// `b` is added in `x`'s dtype.
///
/// # Shapes
/// - `x`: `[..., in]`
/// - `weight`: `[out, in]`
/// - `bias`: `[out]`
/// - output: `[..., out]`
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let [out, inp] = weight.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let x_dtype = x.dtype();
    let y = x
        .reshape([rows, inp])
        .cast(weight.dtype())
        .matmul(weight.transpose())
        .cast(x_dtype);
    let y = match bias {
        Some(b) => y + b.cast(x_dtype).unsqueeze::<2>(),
        None => y,
    };
    let mut out_dims = dims;
    out_dims[D - 1] = out;
    y.reshape(out_dims)
}
