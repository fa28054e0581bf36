//! Sparse mixture-of-experts feed-forward blocks (Mixtral, Qwen3-MoE, gpt-oss, Llama 4,
//! Gemma 4, GLM-4.5).
//!
//! Routing picks `top_k` experts per token; each expert runs only on the tokens routed to it
//! (gathered with `select`, scattered back with an additive `select_assign`), so compute is
//! `top_k / num_experts` of a dense evaluation. Expert and router weights are frozen; LoRA may
//! adapt the router and each expert's two projections (PEFT's `target_parameters`), an
//! expert's adapter running only on the tokens routed to it (X·A then ·B, never a ΔW per
//! expert). Gradients flow through the experts and the routing weights, as in PyTorch.

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};
use ember_lora::{EmberBackend, LoraLinear};

use crate::config::{DecoderConfig, ExpertActivation, GroupScores, MoeConfig, MoeLayout, Routing};
use crate::error::Result;
use crate::model::{gated, Mlp};
use crate::weights::Weights;

/// One expert's gated MLP: two frozen linear layers in `nn.Linear` layout (`y = x·Wᵀ + b`),
/// each of which can carry its own LoRA adapter (PEFT's `target_parameters` on the stacked
/// `experts.gate_up_proj` / `experts.down_proj`: one rank-r adapter per expert).
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    /// Gate rows then up rows, `[2·intermediate, hidden]` (bias `[2·intermediate]`, gpt-oss).
    pub gate_up: LoraLinear<B>,
    /// `[hidden, intermediate]` (bias `[hidden]`, gpt-oss).
    pub down: LoraLinear<B>,
}

impl<B: EmberBackend> Expert<B> {
    /// # Shapes
    /// - `x`: `[tokens, hidden]`
    /// - output: `[tokens, hidden]`
    fn forward(&self, x: Tensor<B, 2>, activation: ExpertActivation) -> Tensor<B, 2> {
        let gate_up = self.gate_up.forward(x);
        let inter = gate_up.dims()[1] / 2;
        let gate = gate_up.clone().narrow(1, 0, inter);
        let up = gate_up.narrow(1, inter, inter);
        let hidden = match activation {
            ExpertActivation::Gated(act) => gated(gate, up, act),
            ExpertActivation::ClampedSwiGlu { alpha, limit } => {
                let gate = gate.clamp_max(limit as f32);
                let up = up.clamp(-limit as f32, limit as f32);
                let glu = gate.clone() * sigmoid(gate.mul_scalar(alpha as f32));
                up.add_scalar(1.0) * glu
            }
        };
        self.down.forward(hidden)
    }
}

/// A router and its experts (`block_sparse_moe` / `mlp`).
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// The router, weight `[experts, hidden]` (bias `[experts]`, gpt-oss); LoRA can adapt it.
    pub router: LoraLinear<B>,
    /// The experts.
    pub experts: Vec<Expert<B>>,
    /// Experts per token.
    pub top_k: usize,
    /// Routing rule.
    #[module(skip)]
    pub routing: Routing,
    /// Expert activation.
    #[module(skip)]
    pub activation: ExpertActivation,
    /// The routing weight scales the expert's input (Llama 4) instead of its output.
    #[module(skip)]
    pub scale_input: bool,
    /// A dense MLP every token also goes through (Llama 4's `shared_expert`; its projections
    /// are linear layers LoRA can adapt).
    pub shared_expert: Option<Mlp<B>>,
    /// `[1, hidden]`: the shared expert's output is scaled by the sigmoid of this projection
    /// (Qwen 3.5-MoE's `shared_expert_gate`).
    pub shared_expert_gate: Option<LoraLinear<B>>,
    /// Gemma 4: the router reads `rms_norm(x) · scale · hidden^-½`, `scale` `[hidden]`.
    pub router_input_scale: Option<Param<Tensor<B, 1>>>,
    /// Gemma 4: routing weights times a per-expert factor, `[experts]`.
    pub per_expert_scale: Option<Param<Tensor<B, 1>>>,
    /// ε of the router's input norm.
    pub router_norm_eps: f64,
    /// DeepSeek-style routing: a per-expert bias added to the scores when choosing experts
    /// (not when weighting them), `[experts]` (`e_score_correction_bias`, a buffer in
    /// transformers: a constant here, not a parameter).
    pub score_correction_bias: Option<Tensor<B, 1>>,
}

impl<B: EmberBackend> SparseMoe<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_routed(x.clone(), x)
    }

    /// Routes on `route_input` and runs the experts (and shared expert) on `x` (Gemma 4 routes
    /// on the block's un-normed input).
    ///
    /// # Shapes
    /// - `route_input`, `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward_routed(&self, route_input: Tensor<B, 3>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        let tokens = batch * seq;
        let x = x.reshape([tokens, hidden]);
        let (weights, experts) = self.route(route_input.reshape([tokens, hidden]));
        let device = x.device();
        let k = self.top_k;

        // Host-side dispatch: which (token, slot) pairs each expert serves.
        let chosen: Vec<i64> = experts.into_data().convert::<i64>().to_vec().unwrap_or_default();
        let mut per_expert: Vec<(Vec<i64>, Vec<i64>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (slot, &e) in chosen.iter().enumerate() {
            let (token_ids, slot_ids) = &mut per_expert[e as usize];
            token_ids.push((slot / k) as i64);
            slot_ids.push(slot as i64);
        }
        let weights = weights.reshape([tokens * k]);
        let mut out = Tensor::<B, 2>::zeros([tokens, hidden], &device);
        for (expert, (token_ids, slot_ids)) in self.experts.iter().zip(per_expert) {
            if token_ids.is_empty() {
                continue;
            }
            let n = token_ids.len();
            let token_ids = Tensor::<B, 1, Int>::from_data(TensorData::new(token_ids, [n]), &device);
            let slot_ids = Tensor::<B, 1, Int>::from_data(TensorData::new(slot_ids, [n]), &device);
            let w = weights.clone().select(0, slot_ids).reshape([n, 1]);
            let routed = x.clone().select(0, token_ids.clone());
            let y = if self.scale_input {
                expert.forward(routed * w, self.activation)
            } else {
                expert.forward(routed, self.activation) * w
            };
            out = out.select_assign(0, token_ids, y, IndexingUpdateOp::Add);
        }
        let out = out.reshape([batch, seq, hidden]);
        let x = x.reshape([batch, seq, hidden]);
        match (&self.shared_expert, &self.shared_expert_gate) {
            (Some(shared), Some(gate)) => shared.forward(x.clone()) * sigmoid(gate.forward(x)) + out,
            (Some(shared), None) => shared.forward(x) + out,
            _ => out,
        }
    }

    /// Routing weights and expert indices of every token. The indices are chosen without
    /// gradient; the weights are differentiable functions of the router logits.
    ///
    /// # Shapes
    /// - `x`: `[tokens, hidden]`
    /// - output: weights `[tokens, top_k]`, experts `[tokens, top_k]`
    fn route(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
        let x = match &self.router_input_scale {
            Some(scale) => {
                let hidden = x.dims()[1];
                let variance = x.clone().powi_scalar(2).mean_dim(1);
                let normed = x * variance.add_scalar(self.router_norm_eps).sqrt().recip();
                (normed * scale.val().unsqueeze::<2>()).mul_scalar((hidden as f64).powf(-0.5) as f32)
            }
            None => x,
        };
        let logits = self.router.forward(x);
        let (weights, experts) = self.route_logits(logits);
        match &self.per_expert_scale {
            Some(scale) => {
                let [tokens, k] = experts.dims();
                let factors = scale
                    .val()
                    .select(0, experts.clone().reshape([tokens * k]))
                    .reshape([tokens, k]);
                (weights * factors, experts)
            }
            None => (weights, experts),
        }
    }

    /// [`SparseMoe::route`] from the router logits.
    ///
    /// # Shapes
    /// - `logits`: `[tokens, experts]`
    /// - output: weights `[tokens, top_k]`, experts `[tokens, top_k]`
    fn route_logits(&self, logits: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
        match self.routing {
            Routing::SoftmaxTopK { renormalize } => {
                let probs = softmax(logits, 1);
                let (_, experts) = top_k(probs.clone().detach(), self.top_k);
                let mut weights = probs.gather(1, experts.clone());
                if renormalize {
                    let total = weights.clone().sum_dim(1);
                    weights = weights / total;
                }
                (weights, experts)
            }
            Routing::TopKSoftmax => {
                let (_, experts) = top_k(logits.clone().detach(), self.top_k);
                (softmax(logits.gather(1, experts.clone()), 1), experts)
            }
            Routing::TopKSigmoid => {
                let (_, experts) = top_k(logits.clone().detach(), self.top_k);
                (sigmoid(logits.gather(1, experts.clone())), experts)
            }
            Routing::GroupLimited {
                scores,
                groups,
                top_groups,
                renormalize,
                scaling,
            } => {
                let [tokens, experts] = logits.dims();
                let device = logits.device();
                let scores = match scores {
                    GroupScores::Sigmoid => sigmoid(logits),
                    GroupScores::Softmax => softmax(logits, 1),
                };
                let mut choice = scores.clone().detach();
                if let Some(bias) = &self.score_correction_bias {
                    choice = choice + bias.clone().unsqueeze::<2>();
                }
                // A group scores by its two best experts; only the best `top_groups` stay open.
                let per_group = experts / groups;
                let grouped = choice.clone().reshape([tokens, groups, per_group]);
                // (burn's topk needs more values than it keeps: a pair's two best are the pair;
                // and its value-only `topk` has no autodiff version.)
                let best_two = if per_group > 2 {
                    grouped.topk_with_indices(2, 2).0
                } else {
                    grouped
                };
                let group_scores = best_two.sum_dim(2).reshape([tokens, groups]);
                if top_groups < groups {
                    let (_, open) = group_scores.topk_with_indices(top_groups, 1);
                    let open = Tensor::<B, 2>::zeros([tokens, groups], &device).scatter(
                        1,
                        open,
                        Tensor::ones([tokens, top_groups], &device),
                        IndexingUpdateOp::Add,
                    );
                    let closed = open
                        .reshape([tokens, groups, 1])
                        .expand([tokens, groups, per_group])
                        .reshape([tokens, experts])
                        .equal_elem(0.0);
                    choice = choice.mask_fill(closed, f32::NEG_INFINITY);
                }
                let (_, chosen) = top_k(choice, self.top_k);
                let mut weights = scores.gather(1, chosen.clone());
                if renormalize {
                    let total = weights.clone().sum_dim(1).add_scalar(1e-20);
                    weights = weights / total;
                }
                (weights.mul_scalar(scaling), chosen)
            }
        }
    }
}

/// The `k` largest values of each row and their indices (any order of ties), also when `k` is
/// the row's length (which burn's `topk` refuses).
///
/// # Shapes
/// - `x`: `[rows, n]`
/// - output: values and indices `[rows, k]`
fn top_k<B: EmberBackend>(x: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    if k < x.dims()[1] {
        x.topk_with_indices(k, 1)
    } else {
        x.sort_descending_with_indices(1)
    }
}

/// Loads the sparse block of layer `prefix` (`model.layers.{i}`), experts stored in `dtype`
/// (the router stays f32), in the checkpoint layout
/// `moe.layout`. Mixtral and Qwen experts may also come fused as transformers 5 holds them in
/// memory (`mlp.experts.gate_up_proj` `[experts, 2·inter, hidden]`, `down_proj`
/// `[experts, hidden, inter]`).
pub(crate) fn load<B: EmberBackend>(
    moe: &MoeConfig,
    config: &DecoderConfig,
    weights: &Weights,
    prefix: &str,
    device: &B::Device,
    dtype: FloatDType,
) -> Result<SparseMoe<B>> {
    let (h, inter, n) = (config.hidden_size, moe.intermediate_size, moe.num_experts);
    let frozen2 = |t: Tensor<B, 2>| LoraLinear::frozen(t, None);
    let frozen2b = |t: Tensor<B, 2>, b: Tensor<B, 1>| LoraLinear::frozen(t, Some(b));
    let frozen1 = |t: Tensor<B, 1>| Param::from_tensor(t).set_require_grad(false);
    let (block, router_name) = match moe.layout {
        MoeLayout::Mixtral => ("block_sparse_moe", "gate"),
        MoeLayout::Qwen => ("mlp", "gate"),
        MoeLayout::GptOss => ("mlp", "router"),
        MoeLayout::Llama4 => ("feed_forward", "router"),
        // Gemma 4's router and experts sit on the layer itself, beside its `mlp`.
        MoeLayout::Gemma4 => ("", "router.proj"),
        MoeLayout::DeepSeek | MoeLayout::GatedShared => ("mlp", "gate"),
    };
    let base = if block.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{block}")
    };
    let router = weights.tensor::<B, 2>(&format!("{base}.{router_name}.weight"), [n, h], device)?;
    let router_bias = match moe.layout {
        MoeLayout::GptOss => Some(weights.tensor::<B, 1>(&format!("{base}.{router_name}.bias"), [n], device)?),
        _ => None,
    };
    let (router_input_scale, per_expert_scale) = match moe.layout {
        MoeLayout::Gemma4 => (
            Some(frozen1(weights.tensor::<B, 1>(
                &format!("{base}.router.scale"),
                [h],
                device,
            )?)),
            Some(frozen1(weights.tensor::<B, 1>(
                &format!("{base}.router.per_expert_scale"),
                [n],
                device,
            )?)),
        ),
        _ => (None, None),
    };
    let fused_gate_up = format!("{base}.experts.gate_up_proj");
    let experts = match moe.layout {
        MoeLayout::GptOss => {
            // [experts, hidden, 2·inter], gate/up interleaved along the last axis; x·W layout.
            let gate_up = weights.tensor_as::<B, 3>(&fused_gate_up, [n, h, 2 * inter], device, dtype)?;
            let gate_up_bias = weights.tensor::<B, 2>(&format!("{fused_gate_up}_bias"), [n, 2 * inter], device)?;
            let down = weights.tensor_as::<B, 3>(&format!("{base}.experts.down_proj"), [n, inter, h], device, dtype)?;
            let down_bias = weights.tensor::<B, 2>(&format!("{base}.experts.down_proj_bias"), [n, h], device)?;
            (0..n)
                .map(|e| {
                    // De-interleave to [gate | up] and transpose to nn.Linear layout.
                    let w = gate_up.clone().narrow(0, e, 1).reshape([h, inter, 2]).swap_dims(1, 2);
                    let w = w.reshape([h, 2 * inter]).transpose();
                    let b = gate_up_bias.clone().narrow(0, e, 1).reshape([inter, 2]).transpose();
                    Expert {
                        gate_up: frozen2b(w, b.reshape([2 * inter])),
                        down: frozen2b(
                            down.clone().narrow(0, e, 1).reshape([inter, h]).transpose(),
                            down_bias.clone().narrow(0, e, 1).reshape([h]),
                        ),
                    }
                })
                .collect()
        }
        MoeLayout::Llama4 => {
            // [experts, hidden, 2·inter] as [gate | up] and [experts, inter, hidden]; x·W layout.
            let gate_up = weights.tensor_as::<B, 3>(&fused_gate_up, [n, h, 2 * inter], device, dtype)?;
            let down = weights.tensor_as::<B, 3>(&format!("{base}.experts.down_proj"), [n, inter, h], device, dtype)?;
            (0..n)
                .map(|e| Expert {
                    gate_up: frozen2(gate_up.clone().narrow(0, e, 1).reshape([h, 2 * inter]).transpose()),
                    down: frozen2(down.clone().narrow(0, e, 1).reshape([inter, h]).transpose()),
                })
                .collect()
        }
        _ if weights.contains(&fused_gate_up) => {
            let gate_up = weights.tensor_as::<B, 3>(&fused_gate_up, [n, 2 * inter, h], device, dtype)?;
            let down = weights.tensor_as::<B, 3>(&format!("{base}.experts.down_proj"), [n, h, inter], device, dtype)?;
            (0..n)
                .map(|e| Expert {
                    gate_up: frozen2(gate_up.clone().narrow(0, e, 1).reshape([2 * inter, h])),
                    down: frozen2(down.clone().narrow(0, e, 1).reshape([h, inter])),
                })
                .collect()
        }
        layout => {
            let (gate, up, down) = match layout {
                MoeLayout::Mixtral => ("w1", "w3", "w2"),
                _ => ("gate_proj", "up_proj", "down_proj"),
            };
            let mut experts = Vec::with_capacity(n);
            for e in 0..n {
                let key = |name: &str| format!("{base}.experts.{e}.{name}.weight");
                let g = weights.tensor_as::<B, 2>(&key(gate), [inter, h], device, dtype)?;
                let u = weights.tensor_as::<B, 2>(&key(up), [inter, h], device, dtype)?;
                experts.push(Expert {
                    gate_up: frozen2(Tensor::cat(vec![g, u], 0)),
                    down: frozen2(weights.tensor_as::<B, 2>(&key(down), [h, inter], device, dtype)?),
                });
            }
            experts
        }
    };
    Ok(SparseMoe {
        router: LoraLinear::frozen(router, router_bias),
        experts,
        top_k: moe.top_k,
        routing: moe.routing,
        activation: moe.activation,
        scale_input: moe.layout == MoeLayout::Llama4,
        // Attached by the caller, which builds the model's linear layers.
        shared_expert: None,
        shared_expert_gate: None,
        router_input_scale,
        per_expert_scale,
        router_norm_eps: config.rms_norm_eps,
        score_correction_bias: match moe.layout {
            // Sigmoid scores come with a correction bias; softmax ones (Mistral 4) without.
            MoeLayout::DeepSeek
                if matches!(
                    moe.routing,
                    Routing::GroupLimited {
                        scores: GroupScores::Sigmoid,
                        ..
                    }
                ) =>
            {
                Some(weights.tensor::<B, 1>(&format!("{base}.{router_name}.e_score_correction_bias"), [n], device)?)
            }
            _ => None,
        },
    })
}
