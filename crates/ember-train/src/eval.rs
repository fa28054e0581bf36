//! Evaluation shared by `ember eval` and the trainer's periodic evaluation: loss and
//! perplexity over target tokens (prompts masked exactly as in training).

use burn::tensor::backend::Backend;
use ember_model::CausalLm;
use serde::Serialize;

use crate::data::{collate, Sample};
use crate::loss::target_loss_sum;
use crate::trainer::batch_to_device;

/// Loss over a data set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossReport {
    /// Mean cross-entropy per target token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens counted.
    pub target_tokens: usize,
    /// Samples evaluated.
    pub samples: usize,
}

/// Mean loss per target token over `samples`, in batches of `batch_size` (no gradients).
pub fn evaluate_loss<B: Backend>(
    model: &CausalLm<B>,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
) -> LossReport {
    let device = model.model.embed_tokens.weight.val().device();
    let mut total = 0.0f64;
    let mut tokens = 0usize;
    for chunk in samples.chunks(batch_size.max(1)) {
        let rows: Vec<Vec<&Sample>> = chunk.iter().map(|s| vec![s]).collect();
        let batch = collate(&rows, pad_id);
        if batch.target_tokens == 0 {
            continue;
        }
        let (input, _) = batch_to_device::<B>(&batch, &device);
        let sum = target_loss_sum(model, model.forward_hidden(input), &batch.labels);
        let value: f32 = burn::tensor::ElementConversion::elem(sum.into_scalar());
        total += value as f64;
        tokens += batch.target_tokens;
    }
    let loss = total / tokens.max(1) as f64;
    LossReport {
        loss,
        perplexity: loss.exp(),
        target_tokens: tokens,
        samples: samples.len(),
    }
}
