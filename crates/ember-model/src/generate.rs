//! Text generation with a key/value cache: greedy, temperature, top-k, top-p, seeded
//! sampling, eos and stop strings, batched prompts with left padding.

use burn::tensor::{Int, Tensor, TensorData};
use ember_lora::EmberBackend;
use rand::{Rng, SeedableRng};

use crate::model::{CausalLm, KvCache, ModelInput};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// 0 = greedy; otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only among the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities sum to p (1 = all).
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Tokens that end a sequence (they are kept in the output).
    pub eos_token_ids: Vec<u32>,
    /// Reuse keys and values of earlier positions (false = recompute everything each step).
    pub use_cache: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            use_cache: true,
        }
    }
}

/// Picks the next token from one row of logits.
pub fn pick_token(logits: &[f32], config: &GenerationConfig, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold(
                (0usize, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0 as u32
    };
    if config.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if config.top_k > 0 {
        order.truncate(config.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / config.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|&p| {
                cumulative += p;
                cumulative >= config.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u: f64 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i] as u32;
        }
        u -= p;
    }
    order[probs.len() - 1] as u32
}

/// Generates continuations of `prompts` (left-padded into one batch). `on_token(row, id)` is
/// called for every new token as it is chosen (for streaming); `stop(row, new_ids)` may end a
/// row early (stop strings). Returns the new tokens of each row.
pub fn generate<B: EmberBackend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    pad_id: u32,
    mut on_token: impl FnMut(usize, u32),
    mut stop: impl FnMut(usize, &[u32]) -> bool,
) -> Vec<Vec<u32>> {
    let device = model.device();
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    // Left padding; positions count real tokens only (transformers: cumsum(mask) - 1).
    let mut ids: Vec<Vec<i64>> = Vec::with_capacity(batch);
    let mut mask: Vec<Vec<i64>> = Vec::with_capacity(batch);
    for p in prompts {
        let pad = width - p.len();
        ids.push(
            (0..pad)
                .map(|_| pad_id as i64)
                .chain(p.iter().map(|&t| t as i64))
                .collect(),
        );
        mask.push((0..width).map(|i| (i >= pad) as i64).collect());
    }
    let positions = |mask: &[Vec<i64>]| -> Vec<Vec<i64>> {
        mask.iter()
            .map(|row| {
                let mut c = -1;
                row.iter()
                    .map(|&m| {
                        c += m;
                        if m == 0 {
                            1
                        } else {
                            c
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let tensor = |rows: &[Vec<i64>]| {
        let w = rows[0].len();
        Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [rows.len(), w]), &device)
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    let mut cache = KvCache::<B>::default();
    for step in 0..config.max_new_tokens {
        let logits = if config.use_cache {
            let pos = positions(&mask);
            let (step_ids, step_pos): (Vec<Vec<i64>>, Vec<Vec<i64>>) = if step == 0 {
                (ids.clone(), pos)
            } else {
                (
                    ids.iter().map(|r| vec![*r.last().expect("non-empty")]).collect(),
                    pos.iter().map(|r| vec![*r.last().expect("non-empty")]).collect(),
                )
            };
            model.forward_step(tensor(&step_ids), tensor(&mask), tensor(&step_pos), &mut cache)
        } else {
            let input = ModelInput {
                input_ids: tensor(&ids),
                attention_mask: Some(tensor(&mask)),
                position_ids: Some(tensor(&positions(&mask))),
                segment_ids: None,
            };
            let all = model.forward(input);
            let [b, s, v] = all.dims();
            all.narrow(1, s - 1, 1).reshape([b, v])
        };
        let vocab = logits.dims()[1];
        let values = logits.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        for row in 0..batch {
            let next = if done[row] {
                pad_id
            } else {
                let t = pick_token(&values[row * vocab..(row + 1) * vocab], config, &mut rng);
                out[row].push(t);
                on_token(row, t);
                if config.eos_token_ids.contains(&t) || stop(row, &out[row]) {
                    done[row] = true;
                }
                t
            };
            ids[row].push(next as i64);
            mask[row].push(1);
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    out
}
