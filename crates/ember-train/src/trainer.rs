//! The training step: forward → masked cross-entropy → backward → adapter gradients →
//! accumulate → clip → AdamW → next learning rate.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use ember_lora::{EmberAutodiffBackend, EmberBackend};
use ember_model::lora::LayerReach;
use ember_model::{CausalLm, ModelInput};

use crate::data::Batch;
use crate::error::{Result, TrainError};
use crate::loss::target_loss_sum;
use crate::optim::{clip_global_norm, AdamW};

/// A global gradient norm below this at a loss above 0.5 counts as vanished: healthy LoRA
/// runs have norms of 1e-2 to 1e1 at such losses; saturated ones fall to ~1e-7.
pub const VANISHED_GRADIENT: f64 = 1e-5;

/// A global gradient norm above this counts as exploded, five orders of magnitude above
/// healthy runs. (A saturated softmax's gradient vanished under burn's composed softmax
/// backward; the fused attention's direct formula, as PyTorch's, lets it explode instead:
/// a run at learning rate 1e6 reaches 8e6 at its third step.)
pub const EXPLODED_GRADIENT: f64 = 1e6;

/// Inner (non-autodiff) backend of `B`.
pub type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean loss over the window's target tokens (before the update).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens in the window.
    pub target_tokens: usize,
    /// All tokens (padding excluded) in the window.
    pub tokens: usize,
    /// The learning rate used.
    pub lr: f64,
}

/// A model with adapters and the optimizer that trains them.
pub struct Trainer<B: EmberAutodiffBackend> {
    /// The model; only adapter parameters require gradients.
    pub model: CausalLm<B>,
    /// AdamW state.
    pub optimizer: AdamW<Inner<B>>,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Seed from which each micro-batch's dropout seed derives.
    pub seed: u64,
    /// The device.
    pub device: B::Device,
}

/// Moves a host batch to the device as model input plus labels.
pub fn batch_to_device<B: EmberBackend>(batch: &Batch, device: &B::Device) -> (ModelInput<B>, Tensor<B, 2, Int>) {
    let int = |v: &[i64]| Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), batch.dims), device);
    let input = ModelInput {
        input_ids: int(&batch.input_ids),
        attention_mask: Some(int(&batch.attention_mask)),
        position_ids: Some(int(&batch.position_ids)),
        segment_ids: batch.segment_ids.as_deref().map(int),
    };
    (input, int(&batch.labels))
}

/// Parameter names of adapter tensors: `<module path>.lora_A` / `.lora_B`.
fn names(path: &str) -> (String, String) {
    (format!("{path}.lora_A"), format!("{path}.lora_B"))
}

impl<B: EmberAutodiffBackend> Trainer<B> {
    /// A trainer over `model` (adapters already attached).
    pub fn new(
        model: CausalLm<B>,
        optimizer: AdamW<Inner<B>>,
        max_grad_norm: Option<f64>,
        seed: u64,
        device: B::Device,
    ) -> Self {
        Self {
            model,
            optimizer,
            max_grad_norm,
            seed,
            device,
        }
    }

    /// One optimizer step over the micro-batches of an accumulation window, at learning rate `lr`.
    ///
    /// The loss of every micro-batch is its summed cross-entropy divided by the number of
    /// target tokens in the whole window, so the accumulated gradient is that of the mean over
    /// all the window's targets (not the mean of micro-batch means).
    ///
    /// On a CPU backend the step runs on a worker of Ember's thread pool ([`ember_lora::threads`]).
    pub fn train_step(&mut self, window: &[Batch], lr: f64) -> Result<StepStats> {
        ember_lora::threads::run_for::<B, _>(|| self.train_step_here(window, lr))
    }

    /// [`Trainer::train_step`] on the calling thread.
    fn train_step_here(&mut self, window: &[Batch], lr: f64) -> Result<StepStats> {
        let target_tokens: usize = window.iter().map(|b| b.target_tokens).sum();
        let tokens: usize = window
            .iter()
            .map(|b| b.attention_mask.iter().filter(|&&m| m == 1).count())
            .sum();
        let step = self.optimizer.step;
        if target_tokens == 0 {
            return Err(TrainError::Config(format!(
                "step {}: no target tokens in the batch",
                step + 1
            )));
        }
        let mut grads: BTreeMap<String, Tensor<Inner<B>, 2>> = BTreeMap::new();
        let mut loss_total = 0.0f64;
        for (k, batch) in window.iter().enumerate() {
            // Dropout masks depend only on (seed, step, micro-batch): resumed runs repeat them.
            B::seed(
                &self.device,
                self.seed.wrapping_mul(1_000_003).wrapping_add((step * 1024 + k) as u64),
            );
            let (input, _) = batch_to_device::<B>(batch, &self.device);
            let hidden = self.model.forward_hidden(input);
            let loss = target_loss_sum(&self.model, hidden, &batch.labels).div_scalar(target_tokens as f64);
            let value: f32 = loss.clone().into_scalar().elem_f32();
            loss_total += value as f64;
            let backward = loss.backward();
            for (path, layer) in self.model.linear_layers() {
                let Some(adapter) = &layer.adapter else {
                    continue;
                };
                let (a_name, b_name) = names(&path);
                for (name, param) in [(a_name, &adapter.lora_a), (b_name, &adapter.lora_b)] {
                    if let Some(g) = param.val().grad(&backward) {
                        let sum = match grads.remove(&name) {
                            Some(prev) => prev + g,
                            None => g,
                        };
                        grads.insert(name, sum);
                    }
                }
            }
        }
        self.fill_unrouted_experts(&mut grads);
        if !loss_total.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: step + 1,
                loss: loss_total,
            });
        }
        let grad_norm = clip_global_norm(&mut grads, self.max_grad_norm);
        // A gradient that is NaN, that has exploded, or that has all but vanished while the loss
        // is far from 0, means the adapters have blown the activations up (normalisation layers
        // then pass almost no gradient): the run has diverged and further steps change nothing.
        if !grad_norm.is_finite()
            || grad_norm > EXPLODED_GRADIENT
            || (grad_norm < VANISHED_GRADIENT && loss_total > 0.5)
        {
            return Err(TrainError::Diverged {
                step: step + 1,
                loss: loss_total,
                grad_norm,
                lr,
            });
        }
        let mut params = self.adapter_values();
        self.optimizer.step(lr, &mut params, &grads);
        self.set_adapter_values(params);
        Ok(StepStats {
            loss: loss_total,
            grad_norm,
            target_tokens,
            tokens,
            lr,
        })
    }

    /// An expert no token was routed to has no gradient this step; in PEFT it is a slice of
    /// one flat parameter whose other experts do, so its slice gets a zero gradient and AdamW
    /// still moves it by its moments. The same here: zeros for every expert adapter missing
    /// from `grads`.
    fn fill_unrouted_experts(&self, grads: &mut BTreeMap<String, Tensor<Inner<B>, 2>>) {
        for (path, reach, layer) in self.model.adaptable_layers() {
            let (LayerReach::Expert { .. }, Some(adapter)) = (reach, &layer.adapter) else {
                continue;
            };
            let (a_name, b_name) = names(&path);
            for (name, param) in [(a_name, &adapter.lora_a), (b_name, &adapter.lora_b)] {
                grads.entry(name).or_insert_with(|| {
                    let value = param.val().inner();
                    Tensor::zeros(value.dims(), &value.device())
                });
            }
        }
    }

    /// Current adapter tensors by parameter name (inner backend, detached).
    pub fn adapter_values(&self) -> BTreeMap<String, Tensor<Inner<B>, 2>> {
        let mut out = BTreeMap::new();
        for (path, layer) in self.model.linear_layers() {
            if let Some(adapter) = &layer.adapter {
                let (a, b) = names(&path);
                out.insert(a, adapter.lora_a.val().inner());
                out.insert(b, adapter.lora_b.val().inner());
            }
        }
        out
    }

    /// Replaces adapter tensors by parameter name; they keep requiring gradients.
    pub fn set_adapter_values(&mut self, mut values: BTreeMap<String, Tensor<Inner<B>, 2>>) {
        for (path, layer) in self.model.linear_layers_mut() {
            if let Some(adapter) = layer.adapter.as_mut() {
                let (a, b) = names(&path);
                if let Some(v) = values.remove(&a) {
                    adapter.lora_a = Param::initialized(adapter.lora_a.id, Tensor::from_inner(v).require_grad());
                }
                if let Some(v) = values.remove(&b) {
                    adapter.lora_b = Param::initialized(adapter.lora_b.id, Tensor::from_inner(v).require_grad());
                }
            }
        }
    }

    /// Gradients of the mean loss over `batch`'s targets, by parameter name (for checks).
    pub fn gradients(&mut self, batch: &Batch) -> BTreeMap<String, Tensor<Inner<B>, 2>> {
        ember_lora::threads::run_for::<B, _>(|| self.gradients_here(batch))
    }

    /// [`Trainer::gradients`] on the calling thread.
    fn gradients_here(&mut self, batch: &Batch) -> BTreeMap<String, Tensor<Inner<B>, 2>> {
        let (input, _) = batch_to_device::<B>(batch, &self.device);
        let hidden = self.model.forward_hidden(input);
        let loss = target_loss_sum(&self.model, hidden, &batch.labels).div_scalar(batch.target_tokens as f64);
        let backward = loss.backward();
        let mut out = BTreeMap::new();
        for (path, layer) in self.model.linear_layers() {
            if let Some(adapter) = &layer.adapter {
                let (a, b) = names(&path);
                if let Some(g) = adapter.lora_a.val().grad(&backward) {
                    out.insert(a, g);
                }
                if let Some(g) = adapter.lora_b.val().grad(&backward) {
                    out.insert(b, g);
                }
            }
        }
        self.fill_unrouted_experts(&mut out);
        out
    }
}

trait ElemF32 {
    fn elem_f32(self) -> f32;
}
impl<E: burn::tensor::ElementConversion> ElemF32 for E {
    fn elem_f32(self) -> f32 {
        self.elem()
    }
}
