//! The frozen linear layer with an optional low-rank adapter.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, FloatDType, Tensor};

use crate::config::{InitLoraWeights, ModuleLora};
use crate::error::{LoraError, Result};

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

/// A linear layer whose base weight is frozen, with an optional LoRA adapter.
///
/// The weight keeps HuggingFace's layout `[out, in]`, so checkpoints load without transposes.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// The frozen base weight, shape `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
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
        Self {
            weight: Param::from_tensor(matmul_layout(weight)).set_require_grad(false),
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
    /// Errors (and changes nothing) if the result would hold NaN or infinity.
    pub fn merge(&mut self, path: &str) -> Result<()> {
        let Some(adapter) = self.adapter.as_mut().filter(|a| !a.merged) else {
            return Ok(());
        };
        let weight = self.weight.val();
        let dtype = weight.dtype();
        // In f32, then stored back in the base's dtype (bf16 stays bf16).
        let merged = (weight.cast(FloatDType::F32) + adapter.delta_weight()).cast(dtype);
        let non_finite: i64 = merged.clone().is_finite().bool_not().int().sum().into_scalar().elem();
        if non_finite > 0 {
            return Err(LoraError::NonFinite {
                key: format!("{path}.weight"),
            });
        }
        self.weight = Param::from_tensor(matmul_layout(merged)).set_require_grad(false);
        adapter.merged = true;
        Ok(())
    }

    /// Undoes [`LoraLinear::merge`] by subtracting `s·B·A` again.
    pub fn unmerge(&mut self) {
        if let Some(adapter) = self.adapter.as_mut().filter(|a| a.merged) {
            let weight = self.weight.val();
            let dtype = weight.dtype();
            let restored = (weight.cast(FloatDType::F32) - adapter.delta_weight()).cast(dtype);
            self.weight = Param::from_tensor(matmul_layout(restored)).set_require_grad(false);
            adapter.merged = false;
        }
    }

    /// `[out, in]` of the base weight.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.val().dims()
    }

    /// Applies the layer. A base weight stored in a half dtype multiplies `x` cast to that
    /// dtype (see [`linear`]); the adapter branch computes in `x`'s dtype (f32).
    ///
    /// # Shapes
    /// - `x`: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let base = linear(x.clone(), self.weight.val(), self.bias.as_ref().map(|b| b.val()));
        match &self.adapter {
            Some(adapter) if adapter.enabled && !adapter.merged => {
                // Dropout is active only under autodiff, i.e. while training.
                let x = burn::nn::DropoutConfig::new(adapter.dropout).init().forward(x);
                let low = linear(x, adapter.lora_a.val(), None);
                let delta = linear(low, adapter.lora_b.val(), None);
                base + delta.mul_scalar(adapter.scaling)
            }
            _ => base,
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
