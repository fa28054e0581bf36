//! Causal-LM cross-entropy over target tokens.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::data::IGNORE;

/// Sum of `−log p(labels[t+1] | ≤ t)` over positions whose shifted label is not −100.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`
/// - `labels`: `[batch, seq]` (−100 = ignored)
/// - output: `[1]`
pub fn causal_lm_loss_sum<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    per_token_loss(logits, labels).sum()
}

/// Per-position loss, 0 where ignored.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`
/// - `labels`: `[batch, seq]`
/// - output: `[batch, seq − 1]`
pub fn per_token_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [batch, seq, _vocab] = logits.dims();
    let logits = logits.narrow(1, 0, seq - 1);
    let targets = labels.narrow(1, 1, seq - 1);
    let keep = targets.clone().not_equal_elem(IGNORE);
    let safe = targets.mask_fill(keep.clone().bool_not(), 0);
    let logp = log_softmax(logits, 2);
    let picked = logp
        .gather(2, safe.reshape([batch, seq - 1, 1]))
        .reshape([batch, seq - 1]);
    picked.neg() * keep.float()
}

/// The per-token vocabulary dimension never exceeds what the model produced.
pub fn check_vocab(vocab: usize, labels: &[i64]) -> Option<i64> {
    labels
        .iter()
        .copied()
        .find(|&l| l != IGNORE && (l < 0 || l as usize >= vocab))
}
