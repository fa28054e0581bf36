//! Causal-LM cross-entropy over target tokens.
//!
//! The output head is the largest single cost of a LoRA step on a small model: SmolLM2's
//! `[tokens, 49152]` logits are 200 MB for 1024 tokens, and autodiff's log-softmax, gather and
//! their backward passes walk them a dozen times. While the head is frozen (the usual case), the
//! loss is instead computed in row chunks outside the autodiff graph, with its gradient
//! `∂L/∂h = (softmax(z) − onehot(y))·W` formed chunk by chunk, so at most one chunk of logits is
//! alive and the graph holds only `[targets, hidden]` tensors (see [`target_loss_sum`]).

use burn::tensor::activation::log_softmax;

use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use ember_lora::fused::CrossEntropySpec;
use ember_lora::{is_tracked, EmberBackend, FrozenWeight};
use ember_model::CausalLm;

use crate::data::IGNORE;

/// Logits computed at once by the chunked loss: 16 Mi values (64 MB in f32). Fewer, larger
/// chunks matter for speed: each chunk's head matmuls repack the whole `[vocab, hidden]` weight,
/// so SmolLM2's 1024 tokens in 12 chunks of 85 rows (4 Mi values) spent 0.96 s per step in them
/// against 0.56 s in 3 chunks and 0.44 s in one (bench/README.md).
const CHUNK_LOGITS: usize = 1 << 24;

/// The positions whose next token is a target, with those targets and their batch rows.
struct Targets {
    /// Flat `b·seq + t` index of each predicting position.
    positions: Vec<i64>,
    /// The token each of them must predict.
    tokens: Vec<i64>,
    /// The batch row of each.
    rows: Vec<usize>,
}

impl Targets {
    fn of(labels: &[i64], batch: usize, seq: usize) -> Self {
        let mut t = Targets {
            positions: Vec::new(),
            tokens: Vec::new(),
            rows: Vec::new(),
        };
        for b in 0..batch {
            for i in 0..seq - 1 {
                let label = labels[b * seq + i + 1];
                if label != IGNORE {
                    t.positions.push((b * seq + i) as i64);
                    t.tokens.push(label);
                    t.rows.push(b);
                }
            }
        }
        t
    }

    /// The hidden states of the predicting positions.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]`; output: `[targets, hidden]`
    fn pick<B: EmberBackend>(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let [batch, seq, width] = hidden.dims();
        let n = self.positions.len();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(self.positions.clone(), [n]), &hidden.device());
        hidden.reshape([batch * seq, width]).select(0, index)
    }
}

/// Log-probabilities of the target tokens, computing logits only at positions that have a
/// target: their hidden states are gathered first, so `[tokens, vocab]` logits are never held
/// for prompt or padding positions (for classification data that is nearly all of them).
/// Returns the log-probabilities and the batch row of each; `None` when nothing is a target.
///
/// # Shapes
/// - `hidden`: `[batch, seq, hidden]` (final normed states)
/// - `labels`: host `[batch·seq]` row-major, −100 = ignored
/// - output: `[targets]`
pub fn target_log_probs<B: EmberBackend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    labels: &[i64],
) -> Option<(Tensor<B, 1>, Vec<usize>)> {
    let [batch, seq, _] = hidden.dims();
    let targets = Targets::of(labels, batch, seq);
    if targets.positions.is_empty() {
        return None;
    }
    let picked = targets.pick(hidden);
    Some((log_probs_of_picked(model, &targets, picked), targets.rows))
}

/// [`target_log_probs`] of already gathered hidden states: chunked while the head is frozen
/// and nothing asks for a gradient, else autodiff through log-softmax of the head's logits.
///
/// # Shapes
/// - `picked`: `[targets, hidden]`; output: `[targets]`
fn log_probs_of_picked<B: EmberBackend>(model: &CausalLm<B>, targets: &Targets, picked: Tensor<B, 2>) -> Tensor<B, 1> {
    if model.frozen_lm_head_weight().is_some() && !is_tracked(&picked) {
        return chunked_nll(model, picked, &targets.tokens, None, chunk_rows(model))
            .0
            .neg();
    }
    let n = targets.tokens.len();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(targets.tokens.clone(), [n, 1]), &picked.device());
    log_softmax(model.lm_head_logits(picked), 1)
        .gather(1, tokens)
        .reshape([n])
}

/// Summed cross-entropy over the target tokens (see [`target_log_probs`]).
///
/// With a frozen output head the value and the gradient come from the chunked computation:
/// the returned tensor is `L + Σ h⊙G − Σ sg(h)⊙G` with `G = ∂L/∂h` held constant, whose value
/// is `L` (the last two sums are the same numbers) and whose gradient with respect to the hidden
/// states `h` is `G`, exactly as autodiff through the head would give.
///
/// # Shapes
/// - `hidden`: `[batch, seq, hidden]`; `labels`: host `[batch·seq]`; output: `[1]`
pub fn target_loss_sum<B: EmberBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, labels: &[i64]) -> Tensor<B, 1> {
    let [batch, seq, _] = hidden.dims();
    let targets = Targets::of(labels, batch, seq);
    if targets.positions.is_empty() {
        return hidden.sum().mul_scalar(0.0);
    }
    let picked = targets.pick(hidden);
    match model.frozen_lm_head_weight() {
        Some(head) if is_tracked(&picked) => {
            frozen_head_loss_sum(model, picked, &targets.tokens, head, chunk_rows(model))
        }
        _ => log_probs_of_picked(model, &targets, picked).sum().neg(),
    }
}

/// Rows per chunk of logits: [`CHUNK_LOGITS`] values, at least one row.
fn chunk_rows<B: EmberBackend>(model: &CausalLm<B>) -> usize {
    (CHUNK_LOGITS / model.config().vocab_size).max(1)
}

/// `L + Σ h⊙G − Σ sg(h)⊙G` (see [`target_loss_sum`]) from [`chunked_nll`] in chunks of `rows`.
///
/// # Shapes
/// - `picked`: `[targets, hidden]` (tracked); `tokens`: host `[targets]`; `head`: `[vocab, hidden]`
fn frozen_head_loss_sum<B: EmberBackend>(
    model: &CausalLm<B>,
    picked: Tensor<B, 2>,
    tokens: &[i64],
    head: &FrozenWeight<B>,
    rows: usize,
) -> Tensor<B, 1> {
    let constant = picked.clone().detach();
    let (nll, grad) = chunked_nll(model, constant.clone(), tokens, Some(head), rows);
    let grad = grad.expect("a gradient was asked for");
    let surrogate = picked.mul(grad.clone()).sum();
    let same = constant.mul(grad).sum();
    surrogate.sub(same).add(nll.sum())
}

/// Summed cross-entropy of each batch row over that row's targets, on the host.
pub fn target_loss_per_row<B: EmberBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, labels: &[i64]) -> Vec<f64> {
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

/// Negative log-likelihood of each target, `logsumexp(z) − z[y]`, with `z` the logits of the
/// output head (final softcap included), computed `rows` rows at a time. With `head`
/// (the frozen head weight) it also returns `∂(Σ nll)/∂h = (softmax(z) − onehot(y))·∂z/∂h`:
/// `(p − onehot)·W`, times `1 − (z/cap)²` first under a final softcap `z = cap·tanh(·/cap)`.
/// `hidden` must be outside any autodiff graph (detached).
///
/// # Shapes
/// - `hidden`: `[targets, hidden]`; `tokens`: host `[targets]`; `head`: `[vocab, hidden]`
/// - output: `[targets]` and `[targets, hidden]`
fn chunked_nll<B: EmberBackend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 2>,
    tokens: &[i64],
    head: Option<&FrozenWeight<B>>,
    rows: usize,
) -> (Tensor<B, 1>, Option<Tensor<B, 2>>) {
    let [n, _] = hidden.dims();
    let rows = rows.clamp(1, n);
    let softcap = model.config().final_softcap;
    let mut nll = Vec::new();
    let mut grads = Vec::new();
    let spec = CrossEntropySpec {
        softcap: softcap.map(|cap| cap as f32),
        gradient: head.is_some(),
    };
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let logits = model.lm_head_logits(hidden.clone().narrow(0, start, len));
        let (chunk_nll, dz) =
            B::fused_cross_entropy(logits.into_primitive().tensor(), &tokens[start..start + len], spec);
        nll.push(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(chunk_nll)));
        if let (Some(head), Some(dz)) = (head, dz) {
            grads.push(head.input_grad(Tensor::from_primitive(TensorPrimitive::Float(dz))));
        }
    }
    let nll = Tensor::cat(nll, 0);
    let grad = head.map(|_| Tensor::cat(grads, 0));
    (nll, grad)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};
    use ember_model::CausalLm;

    use super::{chunked_nll, frozen_head_loss_sum, target_loss_sum};

    type B = Autodiff<NdArray<f32>>;

    fn fixture(arch: &str) -> CausalLm<B> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(arch);
        CausalLm::<B>::from_path(&dir, &Default::default()).expect("fixture model loads")
    }

    /// The chunked loss and its hand-made gradient equal autodiff through log-softmax of the
    /// full logits, over several ragged chunks (7 targets in chunks of 3), for a tied head
    /// (qwen2), an untied one (llama) and a final softcap with a tied head (gemma2).
    #[test]
    fn chunked_loss_and_gradient_match_autodiff_through_log_softmax() {
        for arch in ["llama", "qwen2", "gemma2"] {
            let model = fixture(arch);
            let config = model.config().clone();
            let device = Default::default();
            let tokens: Vec<i64> = (0..7).map(|i| (i * 37 % config.vocab_size) as i64).collect();
            let hidden = Tensor::<B, 2>::random([7, config.hidden_size], Distribution::Normal(0.0, 1.0), &device);

            let reference_in = hidden.clone().detach().require_grad();
            let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.clone(), [7, 1]), &device);
            let reference = log_softmax(model.lm_head_logits(reference_in.clone()), 1)
                .gather(1, targets)
                .sum()
                .neg();
            let reference_grad = reference_in.grad(&reference.backward()).expect("gradient");

            let fused_in = hidden.detach().require_grad();
            let head = model.frozen_lm_head_weight().expect("no adapter on the head");
            let fused = frozen_head_loss_sum(&model, fused_in.clone(), &tokens, head, 3);
            let fused_grad = fused_in.grad(&fused.backward()).expect("gradient");

            let (r, f): (f32, f32) = (reference.into_scalar(), fused.into_scalar());
            assert!((r - f).abs() <= 1e-5 * r.abs(), "{arch}: loss {f} vs {r}");
            let diff: f32 = (fused_grad - reference_grad).abs().max().into_scalar();
            assert!(diff <= 1e-5, "{arch}: gradient differs by {diff}");

            let (nll, _) = chunked_nll(&model, fused_in.detach(), &tokens, None, 2);
            let total: f32 = nll.sum().into_scalar();
            assert!((total - r).abs() <= 1e-5 * r.abs(), "{arch}: summed nll {total} vs {r}");
        }
    }

    /// With an adapter on the output head (so the head trains), the loss goes through autodiff
    /// of the full head; with B = 0 the adapted head computes the frozen one, so both paths must
    /// give the same loss and the same gradient for the hidden states.
    #[test]
    fn an_adapted_head_takes_the_autodiff_path_with_the_same_result() {
        let mut model = fixture("llama");
        let device = Default::default();
        let [batch, seq, width] = [2, 6, model.config().hidden_size];
        let hidden = Tensor::<B, 3>::random([batch, seq, width], Distribution::Normal(0.0, 1.0), &device);
        let mut labels: Vec<i64> = (0..batch * seq).map(|i| (i * 53 % 384) as i64).collect();
        labels[3] = crate::data::IGNORE;

        let run = |model: &CausalLm<B>| {
            let input = hidden.clone().detach().require_grad();
            let loss = target_loss_sum(model, input.clone(), &labels);
            let grad = input.grad(&loss.backward()).expect("gradient");
            (loss.into_scalar(), grad)
        };
        assert!(model.frozen_lm_head_weight().is_some());
        let (fused, fused_grad) = run(&model);
        let config = ember_lora::LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: ember_lora::TargetModules::List(vec!["lm_head".into()]),
            ..Default::default()
        };
        model.attach_lora(&config, &device).expect("lm_head takes an adapter");
        assert!(model.frozen_lm_head_weight().is_none(), "the head now trains");
        let (plain, plain_grad) = run(&model);
        assert!((fused - plain).abs() <= 1e-5 * plain.abs(), "loss {fused} vs {plain}");
        let diff: f32 = (fused_grad - plain_grad).abs().max().into_scalar();
        assert!(diff <= 1e-5, "gradient differs by {diff}");
    }
}
