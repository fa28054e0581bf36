//! The frozen linear layer with an optional low-rank adapter.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

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
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            adapter: None,
        }
    }

    /// `[out, in]` of the base weight.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.val().dims()
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// - `x`: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let base = linear(x.clone(), self.weight.val(), self.bias.as_ref().map(|b| b.val()));
        match &self.adapter {
            Some(adapter) if adapter.enabled => {
                // Dropout is active only under autodiff, i.e. while training.
                let x = burn::nn::DropoutConfig::new(adapter.dropout)
                    .init()
                    .forward(x);
                let low = linear(x, adapter.lora_a.val(), None);
                let delta = linear(low, adapter.lora_b.val(), None);
                base + delta.mul_scalar(adapter.scaling)
            }
            _ => base,
        }
    }
}

/// `x·Wᵀ + b` with `W` in HF layout `[out, in]`.
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
    let y = x.reshape([rows, inp]).matmul(weight.transpose());
    let y = match bias {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    };
    let mut out_dims = dims;
    out_dims[D - 1] = out;
    y.reshape(out_dims)
}
