//! Causal-LM cross-entropy over target tokens.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use ember_model::CausalLm;

use crate::data::IGNORE;

/// Log-probabilities of the target tokens, computing logits only at positions that have a
/// target: their hidden states are gathered first, so `[tokens, vocab]` logits are never held
/// for prompt or padding positions (for classification data that is nearly all of them).
/// Returns the log-probabilities and the batch row of each; `None` when nothing is a target.
///
/// # Shapes
/// - `hidden`: `[batch, seq, hidden]` (final normed states)
/// - `labels`: host `[batch·seq]` row-major, −100 = ignored
/// - output: `[targets]`
pub fn target_log_probs<B: Backend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    labels: &[i64],
) -> Option<(Tensor<B, 1>, Vec<usize>)> {
    let [batch, seq, width] = hidden.dims();
    let device = hidden.device();
    let mut positions = Vec::new();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for b in 0..batch {
        for t in 0..seq - 1 {
            let label = labels[b * seq + t + 1];
            if label != IGNORE {
                positions.push((b * seq + t) as i64);
                rows.push(b);
                targets.push(label);
            }
        }
    }
    if positions.is_empty() {
        return None;
    }
    let n = positions.len();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [n]), &device);
    let picked = hidden.reshape([batch * seq, width]).select(0, index);
    let logp = log_softmax(model.lm_head_logits(picked), 1);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    Some((logp.gather(1, targets).reshape([n]), rows))
}

/// Summed cross-entropy over the target tokens (see [`target_log_probs`]).
///
/// # Shapes
/// - `hidden`: `[batch, seq, hidden]`; `labels`: host `[batch·seq]`; output: `[1]`
pub fn target_loss_sum<B: Backend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, labels: &[i64]) -> Tensor<B, 1> {
    match target_log_probs(model, hidden.clone(), labels) {
        Some((logp, _)) => logp.sum().neg(),
        None => hidden.sum().mul_scalar(0.0),
    }
}

/// Summed cross-entropy of each batch row over that row's targets, on the host.
pub fn target_loss_per_row<B: Backend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, labels: &[i64]) -> Vec<f64> {
    let batch = hidden.dims()[0];
    let mut out = vec![0.0f64; batch];
    if let Some((logp, rows)) = target_log_probs(model, hidden, labels) {
        let values = logp.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        for (b, v) in rows.iter().zip(values) {
            out[*b] -= v as f64;
        }
    }
    out
}
