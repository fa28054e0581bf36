//! The run config (`ember train run.yaml`): one YAML tree, every knob documented, unknown keys
//! rejected with file:line and the nearest valid key, `--set key.path=value` overrides, and
//! the resolved config saved beside the outputs.

use std::path::{Path, PathBuf};

use ember_lora::LoraConfig;
use ember_model::BaseDtype;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::error::{io, Result, TrainError};

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The base model: a HuggingFace folder (config.json, *.safetensors, tokenizer.json).
    pub base_model: PathBuf,
    /// Where checkpoints, the final adapter, metrics and the resolved config go.
    pub output_dir: PathBuf,
    /// Seed of adapter init, shuffling and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `cpu`, `flex`, `cuda` or `wgpu` (see [`DeviceKind`]).
    #[serde(default)]
    pub device: DeviceKind,
    /// YAML `base_dtype:` (also `dtype:`): how the frozen base is stored, `float32`,
    /// `bfloat16`, `float16`, or quantized (QLoRA): `gguf` (a GGUF base's blocks as stored),
    /// `q8_0`, `q4_0`, `nf4` (quantized on load); see [`BaseDtype`]. Adapters, optimizer
    /// moments, activations and the loss are f32 in every case.
    #[serde(default, rename = "base_dtype", alias = "dtype")]
    pub dtype: BaseDtype,
    /// LoRA settings (PEFT's names) plus `init_from`.
    #[serde(default)]
    pub lora: LoraSection,
    /// Training data.
    pub data: DataConfig,
    /// The optimisation schedule.
    #[serde(default)]
    pub train: TrainConfig,
}

fn default_seed() -> u64 {
    42
}

/// Where the model runs, and on which burn backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU: burn-ndarray for an f32 base, burn-flex for a bf16/f16 one (burn-ndarray
    /// holds no half types).
    #[default]
    Cpu,
    /// The CPU on burn-flex, whatever the dtype.
    Flex,
    /// The first NVIDIA GPU on burn-cuda (build with `--features cuda`).
    Cuda,
    /// The first GPU wgpu finds (Vulkan, Metal, DX12; build with `--features wgpu`).
    Wgpu,
}

impl DeviceKind {
    /// Every choice.
    pub const ALL: [DeviceKind; 4] = [DeviceKind::Cpu, DeviceKind::Flex, DeviceKind::Cuda, DeviceKind::Wgpu];

    /// The name (`cpu`, `flex`, `cuda`, `wgpu`).
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Flex => "flex",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Wgpu => "wgpu",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        DeviceKind::ALL
            .into_iter()
            .find(|d| d.name() == s.trim())
            .ok_or_else(|| format!("`{s}`: use cpu, flex, cuda or wgpu"))
    }
}

/// `lora:`: PEFT's LoRA settings, and optionally an adapter to start from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Start from this PEFT adapter folder (continue a run made elsewhere); its rank and
    /// targets replace the settings below.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// PEFT settings: r, lora_alpha, lora_dropout, target_modules, ...
    #[serde(flatten)]
    pub config: LoraConfig,
}

/// Record layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// `text`: plain text; every token trains.
    Completion,
    /// `instruction`, `input`, `output`: the Alpaca prompt, the response trains.
    Alpaca,
    /// `messages` [{role, content}]: the model's chat template, assistant turns train.
    Chat,
    /// `input_ids` and optional `labels` (-100 = ignored), already tokenized.
    Tokens,
}

/// What to do with samples longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Skip them (counted and reported).
    #[default]
    Drop,
    /// Keep the first `max_seq_len` tokens (a sample left without targets is dropped).
    Truncate,
}

/// What to do with rows that cannot be read (missing field, wrong type).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadRows {
    /// Stop with an error naming the file and row.
    #[default]
    Error,
    /// Skip them (counted and reported).
    Skip,
}

/// Column names of each format's fields, when a file uses other names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldMap {
    /// Completion text.
    pub text: String,
    /// Alpaca instruction.
    pub instruction: String,
    /// Alpaca input (optional per row).
    pub input: String,
    /// Alpaca output.
    pub output: String,
    /// Chat messages.
    pub messages: String,
    /// Token ids.
    pub input_ids: String,
    /// Token labels.
    pub labels: String,
}

impl Default for FieldMap {
    fn default() -> Self {
        Self {
            text: "text".into(),
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            messages: "messages".into(),
            input_ids: "input_ids".into(),
            labels: "labels".into(),
        }
    }
}

/// `data:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training file: .jsonl, .json (lines), .csv or .parquet.
    pub train: PathBuf,
    /// Evaluation file; or use `val_split`.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Fraction of the training rows held out for evaluation (after a seeded shuffle).
    #[serde(default)]
    pub val_split: Option<f64>,
    /// Record layout.
    pub format: DataFormat,
    /// Column names, when they differ from the format's defaults.
    #[serde(default)]
    pub fields: FieldMap,
    /// Longest sample in tokens.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Train on prompt tokens too (default: only responses / assistant turns).
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Pack several samples into one row (they never attend to each other).
    #[serde(default)]
    pub packing: bool,
    /// Shuffle the training rows every epoch (seeded); `false` keeps file order.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Batch samples of similar length together (shuffled megabatches of 64 micro-batches,
    /// sorted by length inside, as transformers' `group_by_length`): less padding.
    #[serde(default)]
    pub group_by_length: bool,
    /// Samples over `max_seq_len`: `drop` or `truncate`.
    #[serde(default)]
    pub overlong: Overlong,
    /// Unreadable rows: `error` or `skip`.
    #[serde(default)]
    pub bad_rows: BadRows,
    /// Use at most this many training rows (file order, before shuffling).
    #[serde(default)]
    pub max_train_rows: Option<usize>,
    /// Use at most this many evaluation rows.
    #[serde(default)]
    pub max_eval_rows: Option<usize>,
}

fn default_max_seq_len() -> usize {
    512
}
fn yes() -> bool {
    true
}

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to 0 after warm-up.
    #[default]
    Linear,
    /// Cosine decay to 0 after warm-up.
    Cosine,
}

/// `train:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the training data (ignored when `max_steps` is set).
    pub epochs: f64,
    /// Optimizer steps to run; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Rows per forward pass.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// `constant`, `linear` or `cosine`.
    pub lr_scheduler: LrScheduler,
    /// Warm-up steps (linear from 0).
    pub warmup_steps: Option<usize>,
    /// Warm-up as a fraction of all steps.
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this (torch's `clip_grad_norm_`); `null` = off.
    pub max_grad_norm: Option<f64>,
    /// Recompute activations in the backward pass to save memory.
    pub gradient_checkpointing: bool,
    /// Evaluate every N optimizer steps (and before the first); 0 = only at start and end.
    pub eval_every: usize,
    /// Save a checkpoint every N steps; 0 = only at the end.
    pub save_every: usize,
    /// Log every N steps.
    pub log_every: usize,
    /// Keep this many checkpoints (older ones are pruned after a new one is complete).
    pub keep_last: usize,
    /// Rows per evaluation batch.
    pub eval_batch_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1.0,
            max_steps: None,
            micro_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-4,
            lr_scheduler: LrScheduler::Linear,
            warmup_steps: None,
            warmup_ratio: None,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            gradient_checkpointing: false,
            eval_every: 0,
            save_every: 0,
            log_every: 1,
            keep_last: 2,
            eval_batch_size: 8,
        }
    }
}

/// Every key path the config accepts, for "did you mean" suggestions.
const KEYS: &[&str] = &[
    "base_model",
    "output_dir",
    "seed",
    "device",
    "base_dtype",
    "dtype",
    "lora",
    "data",
    "train",
    "init_from",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "bias",
    "init_lora_weights",
    "eval",
    "val_split",
    "format",
    "fields",
    "max_seq_len",
    "train_on_inputs",
    "packing",
    "shuffle",
    "group_by_length",
    "overlong",
    "bad_rows",
    "max_train_rows",
    "max_eval_rows",
    "text",
    "instruction",
    "input",
    "output",
    "messages",
    "input_ids",
    "labels",
    "epochs",
    "max_steps",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "betas",
    "eps",
    "max_grad_norm",
    "gradient_checkpointing",
    "eval_every",
    "save_every",
    "log_every",
    "keep_last",
    "eval_batch_size",
];

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The nearest accepted key to `key`, if any is close.
pub fn nearest_key(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (distance(key, k), *k))
        .filter(|(d, k)| *d <= (k.len().max(key.len()) / 2).max(2))
        .min()
        .map(|(_, k)| k)
}

fn explain(source: &str, err: &serde_yaml::Error) -> String {
    let mut msg = err.to_string();
    if let Some(start) = msg.find("unknown field `") {
        let rest = &msg[start + 15..];
        if let Some(end) = rest.find('`') {
            if let Some(near) = nearest_key(&rest[..end]) {
                msg.push_str(&format!(" (did you mean `{near}`?)"));
            }
        }
    }
    match err.location() {
        Some(loc) => format!("{source}:{}:{}: {msg}", loc.line(), loc.column()),
        None => format!("{source}: {msg}"),
    }
}

impl RunConfig {
    /// Reads a YAML run config and applies `key.path=value` overrides. Relative paths in the
    /// config are resolved against the current directory, as the user typed them.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let source = path.display().to_string();
        // Parse the file as written first, so errors carry its line numbers.
        let parsed: RunConfig = serde_yaml::from_str(&text).map_err(|e| TrainError::Config(explain(&source, &e)))?;
        if overrides.is_empty() {
            parsed.validate(&source)?;
            return Ok(parsed);
        }
        let mut value: Value = serde_yaml::from_str(&text).map_err(|e| TrainError::Config(explain(&source, &e)))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let config: RunConfig = serde_yaml::from_value(value)
            .map_err(|e| TrainError::Config(format!("{source} with --set {}: {e}", overrides.join(" --set "))))?;
        config.validate(&source)?;
        Ok(config)
    }

    /// Parses YAML text (no file).
    pub fn from_yaml(text: &str) -> Result<Self> {
        let config: RunConfig = serde_yaml::from_str(text).map_err(|e| TrainError::Config(explain("<config>", &e)))?;
        config.validate("<config>")?;
        Ok(config)
    }

    /// Checks values that types alone do not.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Err(TrainError::Config(format!("{source}: `{key}`: {msg}")));
        self.lora
            .config
            .validate()
            .map_err(|e| TrainError::Config(format!("{source}: lora: {e}")))?;
        let t = &self.train;
        if t.micro_batch_size == 0 {
            return bad("train.micro_batch_size", "must be at least 1".into());
        }
        if t.gradient_accumulation_steps == 0 {
            return bad("train.gradient_accumulation_steps", "must be at least 1".into());
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return bad("train.learning_rate", format!("{} must be positive", t.learning_rate));
        }
        if t.eval_batch_size == 0 {
            return bad("train.eval_batch_size", "must be at least 1".into());
        }
        if t.max_steps.is_none() && (!t.epochs.is_finite() || t.epochs <= 0.0) {
            return bad("train.epochs", "must be positive (or set max_steps)".into());
        }
        if t.max_steps == Some(0) {
            return bad("train.max_steps", "must be at least 1".into());
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            return bad(
                "train.warmup_ratio",
                "set warmup_steps or warmup_ratio, not both".into(),
            );
        }
        if let Some(r) = t.warmup_ratio {
            if !(0.0..1.0).contains(&r) {
                return bad("train.warmup_ratio", format!("{r} is not in [0, 1)"));
            }
        }
        if !(0.0..1.0).contains(&t.betas[0]) || !(0.0..1.0).contains(&t.betas[1]) {
            return bad("train.betas", format!("{:?} must be in [0, 1)", t.betas));
        }
        // NaN (`.nan` in YAML) fails every check.
        if !t.eps.is_finite() || t.eps <= 0.0 || !t.weight_decay.is_finite() || t.weight_decay < 0.0 {
            return bad("train.eps", "eps must be positive and weight_decay non-negative".into());
        }
        if let Some(n) = t.max_grad_norm {
            if n.is_nan() || n <= 0.0 {
                return bad(
                    "train.max_grad_norm",
                    format!("{n} must be positive (or null to disable)"),
                );
            }
        }
        let d = &self.data;
        if d.max_seq_len < 2 {
            return bad("data.max_seq_len", "must be at least 2".into());
        }
        if let Some(v) = d.val_split {
            if !(0.0..1.0).contains(&v) || d.eval.is_some() {
                return bad(
                    "data.val_split",
                    "must be in (0, 1) and not combined with data.eval".into(),
                );
            }
        }
        Ok(())
    }

    /// Writes the resolved config as YAML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_yaml::to_string(self).map_err(|e| TrainError::Config(format!("cannot serialise config: {e}")))?;
        Ok(ember_lora::atomic::write_file(path, text.as_bytes())?)
    }
}

/// Applies `a.b.c=value` to a YAML tree (the value is parsed as YAML: numbers, bools, lists).
pub fn apply_override(root: &mut Value, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| TrainError::Config(format!("--set `{assignment}`: expected key.path=value")))?;
    let value: Value = serde_yaml::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    let parts: Vec<&str> = path.split('.').collect();
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if !KEYS.contains(part) {
            let hint = nearest_key(part)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err(TrainError::Config(format!(
                "--set `{path}`: unknown key `{part}`{hint}"
            )));
        }
        let map = match node {
            Value::Mapping(m) => m,
            other => {
                *other = Value::Mapping(Default::default());
                match other {
                    Value::Mapping(m) => m,
                    _ => unreachable!("just assigned a mapping"),
                }
            }
        };
        if i == 0 && (*part == "dtype" || *part == "base_dtype") && parts.len() == 1 {
            // One key under either name (serde would refuse both at once).
            map.remove(Value::String("dtype".into()));
            map.insert(Value::String("base_dtype".into()), value);
            return Ok(());
        }
        let key = Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(Value::Mapping(Default::default()));
    }
    Ok(())
}
