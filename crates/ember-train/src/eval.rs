//! Evaluation shared by `ember eval` and the trainer's periodic evaluation: loss and
//! perplexity over target tokens (prompts masked exactly as in training).

use ember_lora::EmberBackend;
use ember_model::{CausalLm, Tokenizer};
use serde::Serialize;

use crate::data::{alpaca_prompt, collate, Record, Sample, IGNORE};
use crate::error::{Result, TrainError};
use crate::loss::{target_loss_per_row, target_loss_sum};
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
pub fn evaluate_loss<B: EmberBackend>(
    model: &CausalLm<B>,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
) -> LossReport {
    let device = model.device();
    let mut total = 0.0f64;
    let mut tokens = 0usize;
    // Similar lengths together: less padding (the sum does not depend on the order).
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.input_ids.len()));
    for chunk in sorted.chunks(batch_size.max(1)) {
        let rows: Vec<Vec<&Sample>> = chunk.iter().map(|s| vec![*s]).collect();
        let batch = collate(&rows, pad_id);
        if batch.target_tokens == 0 {
            continue;
        }
        let (input, _) = batch_to_device::<B>(&batch, &device);
        // the head and the loss on the worker pool too (the forward already runs there)
        let value: f32 = ember_lora::threads::run_for::<B, _>(|| {
            let sum = target_loss_sum(model, model.forward_hidden(input), &batch.labels);
            burn::tensor::ElementConversion::elem(sum.into_scalar())
        });
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

/// A classification example: the prompt as token ids and the gold answer text.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledPrompt {
    /// Prompt tokens (for chat: the conversation up to the assistant's turn).
    pub prompt: Vec<u32>,
    /// The expected answer.
    pub gold: String,
}

/// Builds label-scoring examples from records: chat records end with the assistant's answer
/// (the prompt is the rest, with the generation prompt); alpaca records use the Alpaca prompt.
pub fn labeled_prompts(records: &[Record], tokenizer: &Tokenizer) -> Result<Vec<LabeledPrompt>> {
    let mut out = Vec::with_capacity(records.len());
    for (row, r) in records.iter().enumerate() {
        let (text, gold, special) = match r {
            Record::Chat { messages } => {
                let Some((last, context)) = messages.split_last().filter(|(m, _)| m.role == "assistant") else {
                    return Err(TrainError::Config(format!(
                        "row {}: label scoring needs a conversation that ends with the assistant's answer",
                        row + 1
                    )));
                };
                (
                    tokenizer.apply_chat_template(context, true)?,
                    last.content.clone(),
                    false,
                )
            }
            Record::Alpaca {
                instruction,
                input,
                output,
            } => (alpaca_prompt(instruction, input), output.clone(), true),
            _ => {
                return Err(TrainError::Config(
                    "label scoring needs chat or alpaca records (a prompt and an answer)".into(),
                ))
            }
        };
        out.push(LabeledPrompt {
            prompt: tokenizer.encode(&text, special)?,
            gold: gold.trim().to_string(),
        });
    }
    Ok(out)
}

/// Log-likelihood of each candidate continuation after each prompt, as lm-evaluation-harness
/// scores multiple choice: Σ log p(candidate token | prompt, earlier candidate tokens).
/// Returns `[prompt][candidate]`.
pub fn label_log_likelihoods<B: EmberBackend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    candidates: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    progress: impl FnMut(usize),
) -> Vec<Vec<f64>> {
    let none = vec![GoldContinuation::default(); prompts.len()];
    label_scores_and_gold_loss(model, prompts, &none, candidates, batch_size, pad_id, progress).0
}

/// The tokens that follow a prompt in its training sample (the gold answer and the end of
/// turn) with their labels (`IGNORE` where not a target); empty when the row has no sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GoldContinuation {
    /// Token ids after the prompt.
    pub tokens: Vec<u32>,
    /// Their labels.
    pub labels: Vec<i64>,
}

/// [`label_log_likelihoods`] plus the loss of each prompt's gold continuation, from the same
/// forward: the prompt and its continuation run once into a key/value cache, the candidates'
/// first tokens are read at the last prompt position, and longer candidates continue from the
/// cache cut back to the prompt. Returns the scores and `(Σ target NLL, target tokens)`.
pub fn label_scores_and_gold_loss<B: EmberBackend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    gold: &[GoldContinuation],
    candidates: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    progress: impl FnMut(usize),
) -> (Vec<Vec<f64>>, (f64, usize)) {
    // Batch prompts of similar length together (less padding), then restore the caller's order.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let sorted: Vec<Vec<u32>> = order.iter().map(|&i| prompts[i].clone()).collect();
    let sorted_gold: Vec<GoldContinuation> = order.iter().map(|&i| gold[i].clone()).collect();
    let (scores, loss) = if candidates.iter().all(|c| !c.is_empty()) {
        cached_scores(model, &sorted, &sorted_gold, candidates, batch_size, pad_id, progress)
    } else {
        assert!(
            sorted_gold.iter().all(|g| g.tokens.is_empty()),
            "gold continuations need non-empty candidates"
        );
        (
            full_sequence_scores(model, &sorted, candidates, batch_size, pad_id, progress),
            (0.0, 0),
        )
    };
    let mut out = vec![Vec::new(); prompts.len()];
    for (k, &i) in order.iter().enumerate() {
        out[i] = scores[k].clone();
    }
    (out, loss)
}

/// The same scores from one full forward per (prompt, candidate) pair; the reference the
/// faster paths are tested against.
pub fn full_sequence_scores<B: EmberBackend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    candidates: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    mut progress: impl FnMut(usize),
) -> Vec<Vec<f64>> {
    let device = model.device();
    let mut jobs: Vec<(usize, usize, Sample)> = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        for (c, cand) in candidates.iter().enumerate() {
            let mut ids = prompt.clone();
            ids.extend(cand);
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i >= prompt.len() { t as i64 } else { IGNORE })
                .collect();
            jobs.push((p, c, Sample { input_ids: ids, labels }));
        }
    }
    let mut scores = vec![vec![0.0f64; candidates.len()]; prompts.len()];
    for (done, chunk) in jobs.chunks(batch_size.max(1)).enumerate() {
        let rows: Vec<Vec<&Sample>> = chunk.iter().map(|(_, _, s)| vec![s]).collect();
        let batch = collate(&rows, pad_id);
        let (input, _) = batch_to_device::<B>(&batch, &device);
        let hidden = model.forward_hidden(input);
        let per_row = target_loss_per_row(model, hidden, &batch.labels);
        for ((p, c, _), loss) in chunk.iter().zip(per_row) {
            scores[*p][*c] = -loss;
        }
        progress(((done + 1) * batch_size).min(jobs.len()));
    }
    scores
}

/// Each prompt batch (with its gold continuations, if any) runs once into a key/value cache;
/// every candidate's first token is read off the prompt's next-token distribution and any
/// further tokens continue from a copy of the cache cut back to the prompt (prompts are
/// left-padded, continuations right-padded; positions count real tokens). Single-token labels
/// cost one forward.
fn cached_scores<B: EmberBackend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    gold: &[GoldContinuation],
    candidates: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    mut progress: impl FnMut(usize),
) -> (Vec<Vec<f64>>, (f64, usize)) {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, Tensor, TensorData};
    use ember_model::model::KvCache;
    let device = model.device();
    let int = |rows: &[Vec<i64>]| {
        let w = rows[0].len();
        Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [rows.len(), w]), &device)
    };
    let mut scores = Vec::with_capacity(prompts.len());
    let (mut loss_sum, mut loss_tokens) = (0.0f64, 0usize);
    let mut finished = 0;
    let batch_size = batch_size.max(1);
    for (chunk_index, chunk) in prompts.chunks(batch_size).enumerate() {
        let chunk_gold = &gold[chunk_index * batch_size..chunk_index * batch_size + chunk.len()];
        let width = chunk.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let extra = chunk_gold.iter().map(|g| g.tokens.len()).max().unwrap_or(0);
        let ids: Vec<Vec<i64>> = chunk
            .iter()
            .zip(chunk_gold)
            .map(|(p, g)| {
                std::iter::repeat_n(pad_id as i64, width - p.len())
                    .chain(p.iter().map(|&t| t as i64))
                    .chain(g.tokens.iter().map(|&t| t as i64))
                    .chain(std::iter::repeat_n(pad_id as i64, extra - g.tokens.len()))
                    .collect()
            })
            .collect();
        let mask: Vec<Vec<i64>> = chunk
            .iter()
            .zip(chunk_gold)
            .map(|(p, g)| {
                (0..width + extra)
                    .map(|i| (i >= width - p.len() && i < width + g.tokens.len()) as i64)
                    .collect()
            })
            .collect();
        let pos: Vec<Vec<i64>> = chunk
            .iter()
            .map(|p| {
                (0..width + extra)
                    .map(|i| (i as i64 - (width - p.len()) as i64).max(0))
                    .collect()
            })
            .collect();
        let mut cache = KvCache::<B>::default();
        let hidden = model.forward_step_hidden(int(&ids), int(&mask), int(&pos), &mut cache);
        let last = hidden.clone().narrow(1, width - 1, 1);
        if extra > 0 {
            let labels: Vec<i64> = chunk_gold
                .iter()
                .flat_map(|g| {
                    std::iter::repeat_n(IGNORE, width)
                        .chain(g.labels.iter().copied())
                        .chain(std::iter::repeat_n(IGNORE, extra - g.labels.len()))
                })
                .collect();
            loss_tokens += labels.iter().filter(|&&l| l != IGNORE).count();
            let sum = target_loss_sum(model, hidden, &labels);
            let value: f32 = burn::tensor::ElementConversion::elem(sum.into_scalar());
            loss_sum += value as f64;
            // Candidates continue from the prompt alone: the cache cut back to it, or (a
            // recurrent state, which cannot be rewound) the prompts run again.
            let cut: Option<Vec<_>> = cache
                .layers
                .iter()
                .map(|layer| match layer.clone() {
                    None => Some(None),
                    Some(c) => c.truncate(width).map(Some),
                })
                .collect();
            match cut {
                Some(layers) => {
                    cache.layers = layers;
                    cache.len = width;
                }
                None => {
                    cache = KvCache::<B>::default();
                    let prompt = |t: Tensor<B, 2, Int>| t.narrow(1, 0, width);
                    model.forward_step_hidden(prompt(int(&ids)), prompt(int(&mask)), prompt(int(&pos)), &mut cache);
                }
            }
        }
        let first = log_softmax(model.lm_head_logits(last.clone()), 2);
        let b = chunk.len();
        let gather_sum = |logp: Tensor<B, 3>, tokens: &[u32]| -> Vec<f32> {
            let n = tokens.len();
            let targets: Vec<i64> = (0..b).flat_map(|_| tokens.iter().map(|&t| t as i64)).collect();
            let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [b, n, 1]), &device);
            logp.gather(2, targets)
                .sum_dim(1)
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default()
        };
        let mut row_scores = vec![vec![0.0f64; candidates.len()]; b];
        for (c, cand) in candidates.iter().enumerate() {
            let n = cand.len();
            let mut values = gather_sum(first.clone(), &cand[..1]);
            if n > 1 {
                // The candidate's own hidden states predict its later tokens.
                let mut branch = cache.clone();
                let step_ids: Vec<Vec<i64>> = chunk
                    .iter()
                    .map(|_| cand[..n - 1].iter().map(|&t| t as i64).collect())
                    .collect();
                let step_mask: Vec<Vec<i64>> = mask
                    .iter()
                    .map(|m| {
                        m[..width]
                            .iter()
                            .copied()
                            .chain(std::iter::repeat_n(1, n - 1))
                            .collect()
                    })
                    .collect();
                let step_pos: Vec<Vec<i64>> = chunk
                    .iter()
                    .map(|p| (0..n - 1).map(|k| (p.len() + k) as i64).collect())
                    .collect();
                let h = model.forward_step_hidden(int(&step_ids), int(&step_mask), int(&step_pos), &mut branch);
                let rest = gather_sum(log_softmax(model.lm_head_logits(h), 2), &cand[1..]);
                values.iter_mut().zip(rest).for_each(|(v, r)| *v += r);
            }
            for (r, v) in values.into_iter().enumerate() {
                row_scores[r][c] = v as f64;
            }
        }
        scores.extend(row_scores);
        finished += chunk.len();
        progress(finished);
    }
    (scores, (loss_sum, loss_tokens))
}

/// Accuracy of label scoring with its confusion matrix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationReport {
    /// Fraction of rows whose highest-scoring label is the gold one.
    pub accuracy: f64,
    /// Rows scored.
    pub rows: usize,
    /// The candidate labels.
    pub labels: Vec<String>,
    /// `confusion[gold][predicted]` counts (rows whose gold is not a candidate are skipped).
    pub confusion: Vec<Vec<usize>>,
}

/// Scores every candidate label for every example and reports accuracy and confusion.
pub fn classify<B: EmberBackend>(
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    examples: &[LabeledPrompt],
    labels: &[String],
    batch_size: usize,
    pad_id: u32,
    progress: impl FnMut(usize),
) -> Result<ClassificationReport> {
    let candidates = encode_labels(tokenizer, labels)?;
    let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.prompt.clone()).collect();
    let scores = label_log_likelihoods(model, &prompts, &candidates, batch_size, pad_id, progress);
    Ok(classification_report(examples, labels, &scores))
}

/// The token ids of each candidate label.
fn encode_labels(tokenizer: &Tokenizer, labels: &[String]) -> Result<Vec<Vec<u32>>> {
    Ok(labels
        .iter()
        .map(|l| tokenizer.encode(l, false))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// Accuracy and confusion from per-row candidate scores.
fn classification_report(examples: &[LabeledPrompt], labels: &[String], scores: &[Vec<f64>]) -> ClassificationReport {
    let mut confusion = vec![vec![0usize; labels.len()]; labels.len()];
    let mut correct = 0;
    let mut rows = 0;
    for (e, s) in examples.iter().zip(scores) {
        let Some(gold) = labels.iter().position(|l| *l == e.gold) else {
            continue;
        };
        let predicted = s
            .iter()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0;
        confusion[gold][predicted] += 1;
        correct += usize::from(gold == predicted);
        rows += 1;
    }
    ClassificationReport {
        accuracy: correct as f64 / rows.max(1) as f64,
        rows,
        labels: labels.to_vec(),
        confusion,
    }
}

/// Exact and normalised match of greedy generations against the gold answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GenerationReport {
    /// Generated answer equals the gold one after trimming whitespace.
    pub exact_match: f64,
    /// Equal after lowercasing and dropping punctuation and extra spaces.
    pub normalized_match: f64,
    /// Rows generated.
    pub rows: usize,
}

/// Lowercase, punctuation dropped, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Greedy-generates an answer for each example (up to `max_new_tokens`, stopping at eos) and
/// compares it with the gold answer.
pub fn generation_match<B: EmberBackend>(
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    examples: &[LabeledPrompt],
    max_new_tokens: usize,
    eos_ids: &[u32],
    pad_id: u32,
    batch_size: usize,
) -> Result<GenerationReport> {
    let config = ember_model::generate::GenerationConfig {
        max_new_tokens,
        eos_token_ids: eos_ids.to_vec(),
        ..Default::default()
    };
    let (mut exact, mut normalized) = (0usize, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt.clone()).collect();
        let outs = ember_model::generate::generate(model, &prompts, &config, pad_id, |_, _| {}, |_, _| false);
        for (e, ids) in chunk.iter().zip(outs) {
            let text = tokenizer.decode(&ids, true)?;
            exact += usize::from(text.trim() == e.gold);
            normalized += usize::from(normalize_answer(&text) == normalize_answer(&e.gold));
        }
    }
    let n = examples.len().max(1) as f64;
    Ok(GenerationReport {
        exact_match: exact as f64 / n,
        normalized_match: normalized as f64 / n,
        rows: examples.len(),
    })
}

/// What `ember eval` compares: the base model and each adapter on the same rows.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// Base model (HF folder or .gguf).
    pub model: std::path::PathBuf,
    /// Adapters, each evaluated on top of the base.
    pub adapters: Vec<std::path::PathBuf>,
    /// Data file and how to read it.
    pub data: crate::config::DataConfig,
    /// Candidate labels for scoring; empty = the distinct answers in the data.
    pub labels: Vec<String>,
    /// Use at most this many rows.
    pub max_rows: Option<usize>,
    /// Rows per batch.
    pub batch_size: usize,
    /// Also generate answers (greedy) and report exact / normalised match.
    pub generate: bool,
    /// Storage dtype of the frozen base.
    pub dtype: ember_model::BaseDtype,
}

/// One model's row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// `base` or the adapter path.
    pub name: String,
    /// Loss and perplexity over target tokens.
    pub loss: LossReport,
    /// Label-scoring accuracy (chat/alpaca data).
    pub classification: Option<ClassificationReport>,
    /// Generation match (with `generate`).
    pub generation: Option<GenerationReport>,
    /// Seconds spent.
    pub seconds: f64,
}

/// The base-vs-adapters report.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The data file.
    pub data: std::path::PathBuf,
    /// Rows evaluated (the same for every model).
    pub rows: usize,
    /// One entry per model, base first.
    pub models: Vec<ModelReport>,
}

impl EvalReport {
    /// A markdown table of the report.
    pub fn markdown(&self) -> String {
        let mut s = format!("Evaluation on {} ({} rows)\n\n", self.data.display(), self.rows);
        s.push_str("| model | loss | perplexity | accuracy | exact match | normalized match |\n|---|---:|---:|---:|---:|---:|\n");
        for m in &self.models {
            let acc = m
                .classification
                .as_ref()
                .map_or("-".into(), |c| format!("{:.3}", c.accuracy));
            let (em, nm) = m.generation.as_ref().map_or(("-".into(), "-".into()), |g| {
                (format!("{:.3}", g.exact_match), format!("{:.3}", g.normalized_match))
            });
            s.push_str(&format!(
                "| {} | {:.4} | {:.3} | {acc} | {em} | {nm} |\n",
                m.name, m.loss.loss, m.loss.perplexity
            ));
        }
        for m in &self.models {
            if let Some(c) = &m.classification {
                s.push_str(&format!(
                    "\nconfusion of {} (rows: gold, columns: predicted {:?}): {:?}",
                    m.name, c.labels, c.confusion
                ));
            }
        }
        s.push('\n');
        s
    }
}

/// Evaluates the base model and every adapter on the same rows.
pub fn evaluate_models<B: EmberBackend>(
    spec: &EvalSpec,
    device: &B::Device,
    mut log: impl FnMut(&str),
) -> Result<EvalReport> {
    let config = ember_model::source::read_config(&spec.model)?;
    config
        .check_sequence_length(spec.data.max_seq_len)
        .map_err(|e| crate::error::TrainError::Config(format!("data.max_seq_len: {e}")))?;
    let tokenizer = ember_model::source::read_tokenizer(&spec.model)?;
    let pad_id = config
        .pad_token_id
        .or(config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let (mut records, _) = crate::data::read_records_for_vocab(
        &spec.data.train,
        spec.data.format,
        &spec.data.fields,
        spec.data.bad_rows,
        Some(config.vocab_size),
    )?;
    if let Some(n) = spec.max_rows {
        records.truncate(n);
    }
    let encoder = crate::data::Encoder::new(&tokenizer, &spec.data, config.eos_token_ids.first().copied())?
        .with_vocab_size(config.vocab_size);
    // One sample per record (None when dropped as over-long or target-less).
    let mut row_samples = Vec::with_capacity(records.len());
    for record in &records {
        row_samples.push(encoder.encode(record)?.ok().map(|(s, _)| s));
    }
    let samples: Vec<Sample> = row_samples.iter().flatten().cloned().collect();
    if samples.is_empty() {
        return Err(crate::error::TrainError::Data {
            path: spec.data.train.clone(),
            message: format!(
                "none of its {} rows gives a sample to evaluate (each is longer than max_seq_len {} tokens \
                 or has no answer tokens); raise max_seq_len or check the format",
                records.len(),
                spec.data.max_seq_len
            ),
        });
    }
    let examples = match spec.data.format {
        crate::config::DataFormat::Chat | crate::config::DataFormat::Alpaca => {
            Some(labeled_prompts(&records, &tokenizer)?)
        }
        _ => None,
    };
    let labels: Vec<String> = if spec.labels.is_empty() {
        let mut l: Vec<String> = examples.iter().flatten().map(|e| e.gold.clone()).collect();
        l.sort();
        l.dedup();
        l
    } else {
        spec.labels.clone()
    };
    // Label scoring makes sense for a small closed set of answers.
    let classify_rows = examples.as_ref().filter(|_| !labels.is_empty() && labels.len() <= 20);
    let candidates = match classify_rows {
        Some(_) => encode_labels(&tokenizer, &labels)?,
        None => Vec::new(),
    };
    // When every sample is its prompt plus a continuation that holds all its targets, the loss
    // comes from the label-scoring forward (one pass per row instead of two).
    let gold: Option<Vec<GoldContinuation>> = classify_rows
        .filter(|_| candidates.iter().all(|c| !c.is_empty()))
        .and_then(|ex| {
            ex.iter()
                .zip(&row_samples)
                .map(|(e, sample)| match sample {
                    None => Some(GoldContinuation::default()),
                    Some(s) => {
                        let n = e.prompt.len();
                        let aligned = s.input_ids.len() > n
                            && s.input_ids[..n] == e.prompt[..]
                            && s.labels[..n].iter().all(|&l| l == IGNORE);
                        aligned.then(|| GoldContinuation {
                            tokens: s.input_ids[n..].to_vec(),
                            labels: s.labels[n..].to_vec(),
                        })
                    }
                })
                .collect()
        });
    // One base model; each adapter is attached in turn (the previous one removed first).
    let mut model = CausalLm::<B>::from_path_as(&spec.model, device, spec.dtype)?;
    let mut models = Vec::new();
    let names: Vec<Option<&std::path::PathBuf>> = std::iter::once(None).chain(spec.adapters.iter().map(Some)).collect();
    for adapter in names {
        let start = std::time::Instant::now();
        let name = adapter.map_or("base".to_string(), |p| p.display().to_string());
        if let Some(path) = adapter {
            let files = ember_lora::AdapterFiles::read(path)?;
            model.remove_adapters();
            model.load_adapter(&files, device)?;
        }
        let m = &model;
        log(&format!("evaluating {name}"));
        let (loss, classification) = match (classify_rows, &gold) {
            (Some(ex), Some(gold)) => {
                let total = ex.len();
                let prompts: Vec<Vec<u32>> = ex.iter().map(|e| e.prompt.clone()).collect();
                let (scores, (sum, tokens)) =
                    label_scores_and_gold_loss(m, &prompts, gold, &candidates, spec.batch_size, pad_id, |n| {
                        log(&format!("  label scoring + loss {}/{total}", n.min(total)))
                    });
                let loss = sum / tokens.max(1) as f64;
                let loss = LossReport {
                    loss,
                    perplexity: loss.exp(),
                    target_tokens: tokens,
                    samples: samples.len(),
                };
                (loss, Some(classification_report(ex, &labels, &scores)))
            }
            (Some(ex), None) => {
                let loss = evaluate_loss(m, &samples, spec.batch_size, pad_id);
                let total = ex.len();
                let report = classify(m, &tokenizer, ex, &labels, spec.batch_size, pad_id, |n| {
                    log(&format!("  label scoring {}/{total}", n.min(total)))
                })?;
                (loss, Some(report))
            }
            (None, _) => (evaluate_loss(m, &samples, spec.batch_size, pad_id), None),
        };
        let generation = match (&examples, spec.generate) {
            (Some(ex), true) => Some(generation_match(
                m,
                &tokenizer,
                ex,
                16,
                &config.eos_token_ids,
                pad_id,
                spec.batch_size,
            )?),
            _ => None,
        };
        models.push(ModelReport {
            name,
            loss,
            classification,
            generation,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(EvalReport {
        data: spec.data.train.clone(),
        rows: records.len(),
        models,
    })
}
