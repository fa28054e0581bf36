//! `ember train run.yaml`: the whole run around [`Trainer::train_step`]: data, schedule,
//! evaluation, logging, checkpoints, resume, Ctrl-C and the final adapter.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;

use burn::tensor::{Tensor, TensorData};
use ember_lora::adapter::write_safetensors;
use ember_lora::atomic::Staging;
use ember_lora::{AdapterFiles, LoraConfig};
use ember_model::{CausalLm, Tokenizer, Weights};

use ember_lora::EmberAutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::data::{collate, epoch_order, load_samples, rows, split_validation, Batch, DataStats, Encoder, Sample};
use crate::error::{io, Result, TrainError};
use crate::eval::{evaluate_loss, LossReport};
use crate::optim::{learning_rate, AdamW};
use crate::trainer::{Inner, Trainer};

/// Which checkpoint to resume from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest `checkpoint-N` in `output_dir`.
    Latest,
    /// This checkpoint folder.
    Dir(PathBuf),
}

/// How the run is driven.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Set (e.g. by Ctrl-C) to save a checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Print a progress line to stderr.
    pub progress: bool,
    /// Start afresh in an `output_dir` that holds an earlier run: its adapter, checkpoints,
    /// metrics and plots are removed once the new run has loaded its model and data. Without
    /// this (or `resume`), such an `output_dir` is refused.
    pub overwrite: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Optimizer steps done in total.
    pub steps: usize,
    /// Loss of the last step.
    pub final_loss: Option<f64>,
    /// Evaluation before the first step.
    pub eval_before: Option<LossReport>,
    /// Evaluation after the last step.
    pub eval_after: Option<LossReport>,
    /// Where the final adapter is (absent when stopped early).
    pub adapter_dir: Option<PathBuf>,
    /// Whether the run stopped before the last step (Ctrl-C).
    pub interrupted: bool,
    /// Training data statistics.
    pub train_data: DataStats,
}

/// The state saved with a checkpoint besides adapter and optimizer moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Total steps of the run.
    pub total_steps: usize,
    /// Epoch of the next micro-batch.
    pub epoch: usize,
    /// Rows of that epoch already consumed.
    pub position: usize,
    /// The run's seed (shuffles and dropout derive from it and the step).
    pub seed: u64,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
}

/// Data prepared for a run.
pub struct PreparedData {
    /// Training samples.
    pub train: Vec<Sample>,
    /// Evaluation samples (may be empty).
    pub eval: Vec<Sample>,
    /// Statistics of the training file.
    pub train_stats: DataStats,
    /// Statistics of the evaluation file.
    pub eval_stats: Option<DataStats>,
}

/// Reads the tokenizer and the data of a run (shared by `train`, `data preview` and `eval`).
pub fn prepare_data(
    config: &RunConfig,
    tokenizer: &Tokenizer,
    model_config: &ember_model::DecoderConfig,
) -> Result<PreparedData> {
    let encoder = Encoder::new(tokenizer, &config.data, model_config.eos_token_ids.first().copied())?
        .with_vocab_size(model_config.vocab_size);
    let (mut train, train_stats) =
        load_samples(&config.data.train, &config.data, &encoder, config.data.max_train_rows)?;
    let (eval, eval_stats) = match (&config.data.eval, config.data.val_split) {
        (Some(path), _) => {
            let (s, st) = load_samples(path, &config.data, &encoder, config.data.max_eval_rows)?;
            (s, Some(st))
        }
        (None, Some(fraction)) => {
            let (t, mut e) = split_validation(train, fraction, config.seed);
            train = t;
            if let Some(n) = config.data.max_eval_rows {
                e.truncate(n);
            }
            (e, None)
        }
        (None, None) => (Vec::new(), None),
    };
    if train.is_empty() {
        return Err(TrainError::Data {
            path: config.data.train.clone(),
            message: format!(
                "no sample survives preparation ({} rows, {} over max_seq_len {}, {} without targets, {} held out \
                 for evaluation by val_split)",
                train_stats.rows,
                train_stats.dropped_overlong,
                config.data.max_seq_len,
                train_stats.dropped_no_targets,
                eval.len()
            ),
        });
    }
    Ok(PreparedData {
        train,
        eval,
        train_stats,
        eval_stats,
    })
}

/// Walks the training rows epoch after epoch.
struct DataCursor<'a> {
    samples: &'a [Sample],
    packing: bool,
    shuffle: bool,
    group_by_length: bool,
    micro_batch_size: usize,
    max_seq_len: usize,
    seed: u64,
    epoch: usize,
    position: usize,
    rows: Vec<Vec<&'a Sample>>,
}

impl<'a> DataCursor<'a> {
    fn new(samples: &'a [Sample], config: &RunConfig, epoch: usize, position: usize) -> Self {
        let mut c = Self {
            samples,
            packing: config.data.packing,
            shuffle: config.data.shuffle,
            group_by_length: config.data.group_by_length,
            micro_batch_size: config.train.micro_batch_size,
            max_seq_len: config.data.max_seq_len,
            seed: config.seed,
            epoch,
            position,
            rows: Vec::new(),
        };
        c.rows = c.epoch_rows(epoch);
        c
    }

    fn epoch_rows(&self, epoch: usize) -> Vec<Vec<&'a Sample>> {
        let mut order = epoch_order(self.samples.len(), self.shuffle, self.seed, epoch);
        if self.group_by_length {
            // Megabatches of 64 micro-batches keep the shuffle's randomness across the epoch.
            for chunk in order.chunks_mut(self.micro_batch_size * 64) {
                chunk.sort_by_key(|&i| std::cmp::Reverse(self.samples[i].input_ids.len()));
            }
        }
        let ordered: Vec<&Sample> = order.iter().map(|&i| &self.samples[i]).collect();
        rows(&ordered, self.packing, self.max_seq_len)
    }

    fn next_batch(&mut self, size: usize, pad_id: u32) -> Batch {
        if self.position >= self.rows.len() {
            self.epoch += 1;
            self.position = 0;
            self.rows = self.epoch_rows(self.epoch);
        }
        let end = (self.position + size).min(self.rows.len());
        let batch = collate(&self.rows[self.position..end], pad_id);
        self.position = end;
        batch
    }
}

fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output_dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("trainer_state.json").exists().then_some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Whether `name` is something a run writes into its `output_dir` (or a staging folder of one).
fn is_run_output(name: &str) -> bool {
    let name = name
        .strip_prefix('.')
        .and_then(|n| n.split_once(".tmp-").map(|(n, _)| n))
        .unwrap_or(name);
    matches!(
        name,
        "adapter" | "metrics.jsonl" | "loss.png" | "resolved_config.yaml" | "eval_report.json"
    ) || name
        .strip_prefix("checkpoint-")
        .is_some_and(|n| n.parse::<usize>().is_ok())
}

/// Refuses an `output_dir` that already holds files, unless the run resumes or overwrites.
fn check_output_dir(output_dir: &Path, options: &RunOptions) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(());
    };
    let mut found: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != ember_lora::atomic::LOCK_FILE)
        .collect();
    if found.is_empty() || options.resume.is_some() {
        return Ok(());
    }
    found.sort();
    if options.overwrite {
        if let Some(other) = found.iter().find(|n| !is_run_output(n)) {
            return Err(TrainError::OutputDirInUse {
                path: output_dir.to_path_buf(),
                found: format!("`{other}`, which is not an Ember output (--overwrite removes only those)"),
            });
        }
        return Ok(());
    }
    let shown: Vec<&str> = found.iter().take(6).map(String::as_str).collect();
    let more = found.len().saturating_sub(shown.len());
    Err(TrainError::OutputDirInUse {
        path: output_dir.to_path_buf(),
        found: format!(
            "{}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
    })
}

/// Removes an earlier run's outputs from `output_dir` (for `--overwrite`).
fn remove_run_outputs(output_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if !is_run_output(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        } else {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Drops the lines of `metrics.jsonl` after `step` (an interrupted run logged steps its last
/// checkpoint does not hold; the resumed run logs them again).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(ember_lora::atomic::write_file(path, out.as_bytes())?)
}

/// Appends one JSON line; a line the disk had no room for is cut off again, so the file
/// always holds whole lines.
fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    let before = f.metadata().map_err(io(path))?.len();
    let line = format!("{value}\n");
    f.write_all(line.as_bytes()).map_err(|e| {
        let _ = f.set_len(before);
        TrainError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    })
}

/// Runs training as `config` says; see the crate docs for what is written where.
pub fn run<B: EmberAutodiffBackend>(
    config: &RunConfig,
    options: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary> {
    // Everything that can fail on bad input happens before anything is written, but for the
    // lock that keeps a second run out of this output_dir (an empty folder and lock file).
    let lock_path = config.output_dir.join(ember_lora::atomic::LOCK_FILE);
    let (created_dir, created_lock) = (!config.output_dir.exists(), !lock_path.exists());
    let lock = ember_lora::atomic::DirLock::acquire(&config.output_dir)?;
    let result = run_locked::<B>(config, options, device);
    if result.is_err() && created_lock {
        // A run that failed leaves no lock file it made (removed while still held).
        let _ = std::fs::remove_file(&lock_path);
    }
    drop(lock);
    if result.is_err() && created_dir {
        // ...and no empty output_dir it made.
        let _ = std::fs::remove_dir(&config.output_dir);
    }
    result
}

fn run_locked<B: EmberAutodiffBackend>(
    config: &RunConfig,
    options: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary> {
    check_output_dir(&config.output_dir, options)?;
    let model_config = ember_model::source::read_config(&config.base_model)?;
    model_config
        .check_sequence_length(config.data.max_seq_len)
        .map_err(|e| TrainError::Config(format!("data.max_seq_len: {e}")))?;
    let tokenizer = ember_model::source::read_tokenizer(&config.base_model)?;
    let data = prepare_data(config, &tokenizer, &model_config)?;
    let init_from = config
        .lora
        .init_from
        .as_ref()
        .map(|p| AdapterFiles::read(p))
        .transpose()?;
    let lora_config: LoraConfig = init_from
        .as_ref()
        .map_or(config.lora.config.clone(), |a| a.config.clone());
    let resume_dir = match &options.resume {
        None => None,
        Some(Resume::Dir(d)) => Some(d.clone()),
        Some(Resume::Latest) => Some(
            latest_checkpoint(&config.output_dir).ok_or_else(|| TrainError::Checkpoint {
                path: config.output_dir.clone(),
                message: "no checkpoint-N folder to resume from".into(),
            })?,
        ),
    };
    let pad_id = model_config
        .pad_token_id
        .or_else(|| tokenizer.pad_token.as_deref().and_then(|t| tokenizer.token_to_id(t)))
        .or(model_config.eos_token_ids.first().copied())
        .unwrap_or(0);

    B::seed(device, config.seed);
    let mut model = CausalLm::<B>::from_path_as(&config.base_model, device, config.dtype)?;
    let report = match &init_from {
        Some(files) => model.load_adapter(files, device)?,
        None => model.attach_lora(&lora_config, device)?,
    };
    tracing::info!("{report}");

    let t = &config.train;
    let micro_per_epoch = {
        let cursor = DataCursor::new(&data.train, config, 0, 0);
        cursor.rows.len().div_ceil(t.micro_batch_size)
    };
    let steps_per_epoch = micro_per_epoch.div_ceil(t.gradient_accumulation_steps).max(1);
    let total_steps = t
        .max_steps
        .unwrap_or_else(|| ((t.epochs * steps_per_epoch as f64).ceil() as usize).max(1));
    let warmup = t
        .warmup_steps
        .unwrap_or_else(|| (t.warmup_ratio.unwrap_or(0.0) * total_steps as f64).ceil() as usize);

    let mut trainer = Trainer::<B>::new(
        model,
        AdamW::new((t.betas[0], t.betas[1]), t.eps, t.weight_decay),
        t.max_grad_norm,
        config.seed,
        device.clone(),
    );
    let (mut epoch, mut position, mut last_loss) = (0, 0, None);
    if let Some(dir) = &resume_dir {
        let state = load_checkpoint(&mut trainer, dir, config, &lora_config)?;
        epoch = state.epoch;
        position = state.position;
        last_loss = state.last_loss;
        note!("resuming from {} at step {}", dir.display(), state.step);
    }

    if options.overwrite && options.resume.is_none() {
        remove_run_outputs(&config.output_dir)?;
    }
    std::fs::create_dir_all(&config.output_dir).map_err(io(&config.output_dir))?;
    config.save(&config.output_dir.join("resolved_config.yaml"))?;
    let metrics_path = config.output_dir.join("metrics.jsonl");
    if resume_dir.is_some() {
        truncate_metrics(&metrics_path, trainer.optimizer.step)?;
    }
    let eval = |trainer: &Trainer<B>| -> Option<LossReport> {
        (!data.eval.is_empty()).then(|| evaluate_loss(&trainer.model.valid(), &data.eval, t.eval_batch_size, pad_id))
    };
    let mut eval_before = None;
    if resume_dir.is_none() {
        eval_before = eval(&trainer);
        if let Some(e) = &eval_before {
            note!(
                "eval before training: loss {:.4}, perplexity {:.3}",
                e.loss,
                e.perplexity
            );
            append_jsonl(
                &metrics_path,
                &serde_json::json!({"step": 0, "eval_loss": e.loss, "eval_perplexity": e.perplexity}),
            )?;
        }
    }

    let mut cursor = DataCursor::new(&data.train, config, epoch, position);
    let start = Instant::now();
    let first_step = trainer.optimizer.step;
    let mut tokens_done = 0usize;
    let mut interrupted = false;
    let mut last_eval = None;
    while trainer.optimizer.step < total_steps {
        let step = trainer.optimizer.step;
        let lr = learning_rate(t.lr_scheduler, t.learning_rate, step, warmup, total_steps);
        let window: Vec<Batch> = (0..t.gradient_accumulation_steps)
            .map(|_| cursor.next_batch(t.micro_batch_size, pad_id))
            .collect();
        let stats = match trainer.train_step(&window, lr) {
            Ok(s) => s,
            Err(e) => {
                if options.progress {
                    note!();
                }
                return Err(e);
            }
        };
        tokens_done += stats.tokens;
        last_loss = Some(stats.loss);
        let done = trainer.optimizer.step;
        let elapsed = start.elapsed().as_secs_f64();
        append_jsonl(
            &metrics_path,
            &serde_json::json!({"step": done, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                "tokens": stats.tokens, "target_tokens": stats.target_tokens, "epoch": cursor.epoch, "seconds": elapsed}),
        )?;
        if options.progress && (done.is_multiple_of(t.log_every.max(1)) || done == total_steps) {
            let rate = tokens_done as f64 / elapsed.max(1e-9);
            let eta = elapsed / (done - first_step) as f64 * (total_steps - done) as f64;
            progress!(
                "\rstep {done}/{total_steps}  loss {:.4}  lr {lr:.2e}  grad_norm {:.3}  {rate:.0} tok/s  eta {}   ",
                stats.loss,
                stats.grad_norm,
                format_duration(eta)
            );
        }
        if t.eval_every > 0 && done.is_multiple_of(t.eval_every) && done < total_steps {
            if let Some(e) = eval(&trainer) {
                note!("\nstep {done}: eval loss {:.4}, perplexity {:.3}", e.loss, e.perplexity);
                append_jsonl(
                    &metrics_path,
                    &serde_json::json!({"step": done, "eval_loss": e.loss, "eval_perplexity": e.perplexity}),
                )?;
                last_eval = Some(e);
            }
        }
        let stop = options.stop.load(Ordering::SeqCst);
        if (t.save_every > 0 && done.is_multiple_of(t.save_every)) || stop {
            let state = TrainerState {
                step: done,
                total_steps,
                epoch: cursor.epoch,
                position: cursor.position,
                seed: config.seed,
                last_loss,
            };
            save_checkpoint(&trainer, config, &lora_config, &state)?;
        }
        if stop {
            note!("\nstopped at step {done}; resume with --resume");
            interrupted = true;
            break;
        }
    }
    if options.progress {
        note!();
    }
    let eval_after = if interrupted { last_eval } else { eval(&trainer) };
    if let (Some(e), false) = (&eval_after, interrupted) {
        note!(
            "eval after training: loss {:.4}, perplexity {:.3}",
            e.loss,
            e.perplexity
        );
        append_jsonl(
            &metrics_path,
            &serde_json::json!({"step": trainer.optimizer.step, "eval_loss": e.loss, "eval_perplexity": e.perplexity}),
        )?;
    }
    let adapter_dir = if interrupted {
        None
    } else {
        let dir = config.output_dir.join("adapter");
        let base_name = config.base_model.display().to_string();
        trainer.model.adapter_files(&lora_config, Some(base_name)).write(&dir)?;
        Some(dir)
    };
    crate::plot::loss_curve(&metrics_path, &config.output_dir.join("loss.png"))?;
    Ok(RunSummary {
        steps: trainer.optimizer.step,
        final_loss: last_loss,
        eval_before,
        eval_after,
        adapter_dir,
        interrupted,
        train_data: data.train_stats,
    })
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Writes `output_dir/checkpoint-N/` atomically (adapter, optimizer moments, state), then
/// prunes all but the newest `keep_last`.
pub fn save_checkpoint<B: EmberAutodiffBackend>(
    trainer: &Trainer<B>,
    config: &RunConfig,
    lora_config: &LoraConfig,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = config.output_dir.join(format!("checkpoint-{}", state.step));
    let staging_guard = Staging::new(&dir)?;
    let staging = staging_guard.path();
    let adapter = trainer
        .model
        .adapter_files(lora_config, Some(config.base_model.display().to_string()));
    adapter.write(&staging.join("adapter"))?;
    let mut tensors = Vec::new();
    for (name, (m, v)) in &trainer.optimizer.state {
        for (suffix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
            let dims = t.dims();
            let values = t.to_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
            tensors.push((
                format!("{name}.{suffix}"),
                ember_lora::adapter::f32_to_bytes(&values),
                dims,
            ));
        }
    }
    write_safetensors(&staging.join("optimizer.safetensors"), &tensors)?;
    let state_path = staging.join("trainer_state.json");
    let text = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&state_path, text).map_err(io(&state_path))?;
    // The settings that decide which rows the next steps see, checked on resume.
    config.save(&staging.join(CHECKPOINT_CONFIG))?;
    staging_guard.commit(&dir)?;
    prune_checkpoints(&config.output_dir, config.train.keep_last.max(1))?;
    Ok(dir)
}

fn prune_checkpoints(output_dir: &Path, keep: usize) -> Result<()> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .map_err(io(output_dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n: usize = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    let excess = found.len().saturating_sub(keep);
    for (_, path) in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// The run config as a checkpoint saved it.
const CHECKPOINT_CONFIG: &str = "run_config.yaml";

/// Settings that decide the data order and batches: a resumed run must share them with its
/// checkpoint, or it would not continue the same run. (Learning rate, steps, evaluation and
/// saving may change.)
fn data_order_differences(saved: &RunConfig, now: &RunConfig) -> Vec<String> {
    const KEYS: [&str; 11] = [
        "data.train",
        "data.format",
        "data.max_seq_len",
        "data.packing",
        "data.shuffle",
        "data.group_by_length",
        "data.train_on_inputs",
        "data.max_train_rows",
        "data.val_split",
        "train.micro_batch_size",
        "train.gradient_accumulation_steps",
    ];
    let (saved, now) = (
        serde_yaml::to_value(saved).unwrap_or_default(),
        serde_yaml::to_value(now).unwrap_or_default(),
    );
    let at = |root: &serde_yaml::Value, path: &str| {
        let value = path
            .split('.')
            .fold(root.clone(), |v, k| v.get(k).cloned().unwrap_or_default());
        serde_yaml::to_string(&value).unwrap_or_default().trim().to_string()
    };
    KEYS.iter()
        .filter_map(|key| {
            let (a, b) = (at(&saved, key), at(&now, key));
            (a != b).then(|| format!("{key}: {a} vs {b}"))
        })
        .collect()
}

/// Restores adapter values, optimizer moments and step from a checkpoint; returns its state.
pub fn load_checkpoint<B: EmberAutodiffBackend>(
    trainer: &mut Trainer<B>,
    dir: &Path,
    config: &RunConfig,
    lora_config: &LoraConfig,
) -> Result<TrainerState> {
    let bad = |message: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(format!("trainer_state.json: {e}")))?;
    if state.seed != config.seed {
        return Err(bad(format!(
            "was made with seed {}, the config says {}",
            state.seed, config.seed
        )));
    }
    let saved_config = dir.join(CHECKPOINT_CONFIG);
    if saved_config.exists() {
        let saved = RunConfig::load(&saved_config, &[])?;
        let changed = data_order_differences(&saved, config);
        if !changed.is_empty() {
            return Err(bad(format!(
                "it was made with other data settings (checkpoint vs config): {}; resuming would not continue \
                 the same run",
                changed.join(", ")
            )));
        }
    }
    let adapter = AdapterFiles::read(&dir.join("adapter"))?;
    let targets: Vec<String> = adapter.tensors.keys().cloned().collect();
    // The checkpoint holds the settings as PEFT writes them for this model (on MoE families
    // whose experts transformers fuses, `all-linear` rewritten to target_parameters).
    let current = trainer.model.peft_lora_config(lora_config)?;
    let changed = adapter.config.differences(&current, &targets);
    if !changed.is_empty() {
        return Err(bad(format!(
            "its LoRA settings differ from this run's (checkpoint vs config): {}; resume with the \
             checkpoint's settings or start a new run",
            changed.join(", ")
        )));
    }
    let device = trainer.device.clone();
    let mut values = std::collections::BTreeMap::new();
    for (path, t) in &trainer.model.layer_tensors(&adapter)? {
        let to = |v: &Vec<f32>, s: [usize; 2]| Tensor::<Inner<B>, 2>::from_data(TensorData::new(v.clone(), s), &device);
        values.insert(format!("{path}.lora_A"), to(&t.lora_a, t.a_shape));
        values.insert(format!("{path}.lora_B"), to(&t.lora_b, t.b_shape));
    }
    let expected: Vec<String> = trainer.adapter_values().into_keys().collect();
    let got: Vec<String> = values.keys().cloned().collect();
    if expected != got {
        return Err(bad(
            "its adapter targets other modules than this run's LoRA config".into()
        ));
    }
    trainer.set_adapter_values(values);
    let opt_path = dir.join("optimizer.safetensors");
    let weights = Weights::open_files(dir, std::slice::from_ref(&opt_path))?;
    let mut state_map = std::collections::BTreeMap::new();
    for name in &expected {
        let read = |suffix: &str| -> Result<Tensor<Inner<B>, 2>> {
            let key = format!("{name}.{suffix}");
            let (shape, _) = weights
                .info(&key)
                .ok_or_else(|| bad(format!("optimizer.safetensors has no `{key}`")))?;
            let v = weights.read_f32(&key, &shape)?;
            Ok(Tensor::from_data(TensorData::new(v, [shape[0], shape[1]]), &device))
        };
        if state.step > 0 {
            state_map.insert(name.clone(), (read("exp_avg")?, read("exp_avg_sq")?));
        }
    }
    trainer.optimizer.state = state_map;
    trainer.optimizer.step = state.step;
    Ok(state)
}
