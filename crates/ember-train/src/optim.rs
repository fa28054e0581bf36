//! AdamW with torch's semantics, the learning-rate schedules, and global-norm clipping as
//! torch's `clip_grad_norm_` does it (one norm over all adapter gradients).

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::LrScheduler;

/// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments,
/// `p ← p·(1 − lr·wd) − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)`.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    /// (β₁, β₂).
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Optimizer steps taken (t).
    pub step: usize,
    /// First and second moments by parameter name.
    pub state: BTreeMap<String, (Tensor<B, 2>, Tensor<B, 2>)>,
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        Self {
            betas,
            eps,
            weight_decay,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Updates every parameter in `params` with its gradient in `grads` (same keys).
    /// Call once per optimizer step.
    pub fn step(
        &mut self,
        lr: f64,
        params: &mut BTreeMap<String, Tensor<B, 2>>,
        grads: &BTreeMap<String, Tensor<B, 2>>,
    ) {
        self.step += 1;
        let (b1, b2) = self.betas;
        let t = self.step as i32;
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        for (name, param) in params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let (m, v) = self
                .state
                .remove(name)
                .unwrap_or_else(|| (g.zeros_like(), g.zeros_like()));
            // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            let m = m.clone() + (g.clone() - m).mul_scalar(1.0 - b1);
            let v = v.mul_scalar(b2) + (g.clone() * g.clone()).mul_scalar(1.0 - b2);
            let mut p = param.clone();
            if self.weight_decay != 0.0 {
                p = p.mul_scalar(1.0 - lr * self.weight_decay);
            }
            let denom = v.clone().sqrt().div_scalar(bias2_sqrt).add_scalar(self.eps);
            *param = p - (m.clone() / denom).mul_scalar(lr / bias1);
            self.state.insert(name.clone(), (m, v));
        }
    }
}

/// Clips gradients in place to a global L2 norm of at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping.
pub fn clip_global_norm<B: Backend>(grads: &mut BTreeMap<String, Tensor<B, 2>>, max_norm: Option<f64>) -> f64 {
    let total: f64 = grads
        .values()
        .map(|g| {
            let s: f32 = (g.clone() * g.clone()).sum().into_scalar().elem_f32();
            s as f64
        })
        .sum::<f64>()
        .sqrt();
    if let Some(max_norm) = max_norm {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = g.clone().mul_scalar(coef);
            }
        }
    }
    total
}

trait ElemF32 {
    fn elem_f32(self) -> f32;
}
impl<E: burn::tensor::ElementConversion> ElemF32 for E {
    fn elem_f32(self) -> f32 {
        self.elem()
    }
}

/// The learning rate at optimizer step `step` (0-based), as transformers' schedulers give it:
/// linear warm-up from 0 over `warmup` steps, then constant, linear or cosine decay to 0 at `total`.
pub fn learning_rate(kind: LrScheduler, peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        LrScheduler::Constant => peak,
        LrScheduler::Linear => peak * (1.0 - progress).max(0.0),
        LrScheduler::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    }
}
