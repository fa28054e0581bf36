//! `ember`: LoRA fine-tuning for open-weight models.
//!
//! Subcommands: `train` (LoRA from a YAML run config), `data preview`, `inspect` (a model or
//! adapter folder), `forward` (logits for given token ids, optionally with an adapter),
//! `merge` (fold an adapter into the base weights).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Parser, Subcommand, ValueEnum};
use ember_lora::merge::MergeDtype;
use ember_lora::AdapterFiles;
use ember_model::{BaseDtype, CausalLm, ModelInput, Weights};
use ember_train::config::DeviceKind;
use ember_train::{Resume, RunConfig, RunOptions};
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod device;
use device::{on_device, BackendJob};
use ember_lora::EmberBackend;

/// `println!` that returns an error instead of panicking when stdout is closed (`| head`).
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

/// `eprintln!` that ignores a closed stderr: a message is never worth a panic.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that ignores a closed stderr.
macro_rules! progress {
    ($($arg:tt)*) => {{
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// The system allocator with a memory budget for chat templates (a hostile template cannot
/// exhaust the machine's memory).
#[global_allocator]
static ALLOCATOR: ember_model::allocator::GuardedAllocator = ember_model::allocator::GuardedAllocator;

/// The exit status of a run stopped by Ctrl-C (128 + SIGINT), so `ember train && ember merge`
/// does not go on with an unfinished adapter.
const EXIT_INTERRUPTED: u8 = 130;
/// The exit status when stdout's reader went away (128 + SIGPIPE), as `cat` would give.
const EXIT_BROKEN_PIPE: u8 = 141;

#[derive(Parser)]
#[command(name = "ember", version, about = "LoRA fine-tuning for open-weight models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Storage dtype of a merged checkpoint.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    /// Keep each tensor's stored dtype.
    Same,
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

/// Where a command runs and how the frozen base is stored (`--device`, `--dtype`).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
struct DeviceArgs {
    /// cpu (burn-ndarray; burn-flex for a bf16/f16 base), flex, cuda or wgpu.
    #[arg(long)]
    device: Option<DeviceKind>,
    /// How the frozen base is stored: float32, bfloat16, float16, or quantized (QLoRA): gguf
    /// (a .gguf base's blocks as stored), q8_0, q4_0, nf4 (quantized on load).
    #[arg(long = "base-dtype", visible_alias = "dtype")]
    dtype: Option<BaseDtype>,
}

impl DeviceArgs {
    /// The flags, else the given defaults (a run config's), else cpu and float32.
    fn or(self, device: DeviceKind, dtype: BaseDtype) -> (DeviceKind, BaseDtype) {
        (self.device.unwrap_or(device), self.dtype.unwrap_or(dtype))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter as a YAML run config says (see configs/).
    Train {
        /// The run config.
        config: PathBuf,
        /// Override a config value, e.g. `--set train.learning_rate=1e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// Continue from the newest checkpoint in output_dir, or from the given checkpoint folder.
        #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
        resume: Option<String>,
        /// Start afresh in an output_dir that holds an earlier run (its adapter, checkpoints
        /// and metrics are removed once the new run has loaded model and data).
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// `--device`/`--dtype` override the config's `device:`/`dtype:`.
        #[command(flatten)]
        on: DeviceArgs,
    },
    /// Evaluate the base model and adapters side by side: loss/perplexity over answer tokens,
    /// label-scoring accuracy, optionally generation match. Writes eval_report.json.
    Eval(EvalArgs),
    /// Generate text from a prompt (streams tokens to the terminal).
    Generate {
        /// Model folder or .gguf.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt text.
        #[arg(long)]
        prompt: Option<String>,
        /// Start from these token ids instead (comma-separated).
        #[arg(long, value_delimiter = ',')]
        input_ids: Vec<u32>,
        /// Wrap the prompt as a user turn with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// New tokens at most.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sample among the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop when the text ends with this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Print the generated ids and text as JSON instead of streaming.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        on: DeviceArgs,
    },
    /// Inspect training data as the trainer will see it.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Describe a HuggingFace model folder (architecture, sizes, dtype, parameter count) or a
    /// PEFT adapter folder (rank, alpha, targets, parameters).
    Inspect {
        /// The model folder (config.json + *.safetensors) or adapter folder (adapter_config.json).
        path: PathBuf,
    },
    /// Write a GGUF model (llama architecture) as a HuggingFace folder transformers loads.
    Convert {
        /// The .gguf file.
        gguf: PathBuf,
        /// The output folder; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge a PEFT adapter into the base weights and write a HuggingFace folder.
    Merge {
        /// The base model folder or .gguf file (read only; a GGUF base is dequantized to f32 and
        /// the merged folder is a HF checkpoint).
        #[arg(long)]
        base: PathBuf,
        /// The adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The output folder; must not exist.
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the output (the delta is always computed in f32).
        #[arg(long, value_enum, default_value = "same")]
        dtype: DtypeArg,
    },
    /// Compute logits for token ids and write them as safetensors (`logits` [batch, seq, vocab], f32).
    Forward {
        /// The model folder.
        #[arg(long)]
        model: PathBuf,
        /// JSON with `input_ids` [[..]], optional `attention_mask` and `position_ids` of the same shape.
        #[arg(long)]
        inputs: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// A PEFT adapter to apply (unmerged).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[command(flatten)]
        on: DeviceArgs,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print a few samples token by token with their labels, and dataset statistics.
    Preview {
        /// The run config.
        config: PathBuf,
        /// Override a config value (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// How many samples to show.
        #[arg(long, default_value_t = 3)]
        samples: usize,
    },
}

fn main() -> ExitCode {
    ember_model::allocator::reuse_freed_buffers();
    match run() {
        Ok(code) => code,
        Err(e) if broken_pipe(&e) => ExitCode::from(EXIT_BROKEN_PIPE),
        Err(e) => {
            note!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `error` comes from writing to a stdout whose reader has gone.
fn broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("EMBER_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let done = match cli.command {
        Command::Train {
            config,
            overrides,
            resume,
            overwrite,
            on,
        } => {
            // As overrides, so that the resume hint repeats them.
            let mut overrides = overrides;
            overrides.extend(on.device.map(|d| format!("device={d}")));
            overrides.extend(on.dtype.map(|d| format!("base_dtype={d}")));
            return train(&config, &overrides, resume, overwrite);
        }
        Command::Data {
            command:
                DataCommand::Preview {
                    config,
                    overrides,
                    samples,
                },
        } => preview(&config, &overrides, samples),
        Command::Eval(args) => eval(args),
        Command::Generate {
            model,
            adapter,
            prompt,
            input_ids,
            chat,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            json,
            on,
        } => {
            let config = ember_model::generate::GenerationConfig {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
                eos_token_ids: Vec::new(),
                use_cache: true,
            };
            let (device, dtype) = on.or(DeviceKind::Cpu, BaseDtype::Float32);
            let job = GenerateJob {
                model,
                adapter,
                prompt,
                input_ids,
                chat,
                config,
                stop,
                json,
                dtype,
            };
            on_device(device, dtype, job)
        }
        Command::Inspect { path } => {
            if path.join("adapter_config.json").exists() {
                inspect_adapter(&path)
            } else {
                inspect(&path)
            }
        }
        Command::Convert { gguf, out } => {
            let start = std::time::Instant::now();
            ember_model::source::convert_gguf(&gguf, &out).with_context(|| format!("converting {}", gguf.display()))?;
            note!("wrote {} in {:.1} s", out.display(), start.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Merge {
            base,
            adapter,
            out,
            dtype,
        } => merge(&base, &adapter, &out, dtype),
        Command::Forward {
            model,
            inputs,
            out,
            adapter,
            on,
        } => {
            let (device, dtype) = on.or(DeviceKind::Cpu, BaseDtype::Float32);
            let job = ForwardJob {
                model,
                inputs,
                out,
                adapter,
                dtype,
            };
            on_device(device, dtype, job)
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// What `ember forward` was asked to do.
struct ForwardJob {
    model: PathBuf,
    inputs: PathBuf,
    out: PathBuf,
    adapter: Option<PathBuf>,
    dtype: BaseDtype,
}

impl BackendJob for ForwardJob {
    type Output = ();

    fn run<B: EmberBackend>(self, device: B::Device) -> Result<()> {
        forward::<B>(&self, &device)
    }
}

fn inspect(path: &Path) -> Result<()> {
    let config = ember_model::source::read_config(path)?;
    let weights = if ember_model::source::is_gguf(path) {
        ember_model::source::gguf_weights(path)?.1
    } else {
        Weights::open_dir(path)?
    };
    let names = ember_model::family::ModuleNames::for_checkpoint(&config, weights.keys().map(String::as_str));
    let mut params = 0usize;
    for key in weights.keys().filter(|k| !names.is_ignored_key(k)) {
        let (shape, _) = weights.info(key).expect("key from the checkpoint");
        params += shape.iter().product::<usize>();
    }
    let mut ignored = names.ignored_components(weights.keys().map(String::as_str));
    if let Some((label, keys)) = config.unloaded_indexers(weights.keys().map(String::as_str)) {
        ignored.push((label, keys.len()));
    }
    let dtype = if ember_model::source::is_gguf(path) {
        format!(
            "GGUF {} (dequantized to f32 on load)",
            ember_model::gguf::GgufFile::open(path)?.type_summary()
        )
    } else {
        weights
            .dominant_dtype()
            .map(|d| format!("{d:?}").to_lowercase())
            .unwrap_or_else(|| "none".into())
    };
    let windows: Vec<String> = config
        .sliding_window
        .iter()
        .zip(&config.attention_chunk)
        .map(|(w, c)| match (w, c) {
            (Some(w), _) => format!("window {w}"),
            (None, Some(c)) => format!("chunk {c}"),
            (None, None) => "global".to_string(),
        })
        .collect();
    out!("model:          {}", path.display());
    out!("architecture:   {} ({})", config.model_type, config.spec().summary);
    if let Some(wrapper) = &config.wrapper {
        out!(
            "wrapper:        {wrapper} (multimodal); text decoder under `{}`, loaded alone",
            names.checkpoint_decoder
        );
    }
    for (component, tensors) in &ignored {
        out!("  ignored:      {component} ({tensors} tensors, not loaded)");
    }
    out!("parameters:     {params} ({:.1} M)", params as f64 / 1e6);
    out!("dtype:          {dtype}");
    out!("layers:         {}", config.num_layers);
    out!("hidden size:    {}", config.hidden_size);
    out!("intermediate:   {}", config.intermediate_size);
    out!(
        "heads:          {} query, {} key/value, head_dim {}",
        config.num_heads,
        config.num_kv_heads,
        config.head_dim
    );
    out!("vocab:          {}", config.vocab_size);
    out!(
        "tied embeddings: {}",
        if config.tie_word_embeddings { "yes" } else { "no" }
    );
    out!(
        "rope:           theta {} {:?}, {} rotary dims",
        config.rope.theta,
        config.rope.scaling,
        config.rope.rotary_dim
    );
    if let Some(local) = &config.local_rope {
        out!(
            "local rope:     theta {} {:?} (sliding-window layers)",
            local.theta,
            local.scaling
        );
    }
    out!("attention:      {}", compress(&windows));
    if config.rope_layers.iter().any(|r| !r) {
        let layers: Vec<String> = (0..config.num_layers)
            .filter(|&i| !config.rope_layers[i])
            .map(|i| i.to_string())
            .collect();
        out!("no rope:        layers {}", layers.join(", "));
    }
    if let Some(scale) = &config.query_scale {
        out!("query scale:    {scale:?} (per position)");
    }
    let base_shape = (config.head_dim, config.num_kv_heads, config.intermediate_size);
    let shapes: Vec<String> = config
        .layer_shapes
        .iter()
        .map(|s| {
            let mut parts = Vec::new();
            if (s.head_dim, s.num_kv_heads) != (base_shape.0, base_shape.1) {
                parts.push(format!("head_dim {}, {} key/value", s.head_dim, s.num_kv_heads));
            }
            if s.linear_attention {
                parts.push("linear attention".to_string());
            }
            if s.values_from_keys {
                parts.push("keys as values".to_string());
            }
            if let Some(j) = s.kv_shared_from {
                parts.push(format!("keys/values of layer {j}"));
            }
            if s.intermediate_size != base_shape.2 {
                parts.push(format!("intermediate {}", s.intermediate_size));
            }
            if parts.is_empty() {
                "as above".to_string()
            } else {
                parts.join(", ")
            }
        })
        .collect();
    if shapes.iter().any(|s| s != "as above") {
        out!("per layer:      {}", compress(&shapes));
    }
    if let Some(mla) = &config.latent_attention {
        out!(
            "latent attention: query rank {}, key/value latent {} (cached), per head {} + {} RoPE (shared key), values {}",
            mla.q_lora_rank.map_or("none (q_proj)".to_string(), |r| r.to_string()),
            mla.kv_lora_rank,
            mla.nope_dim,
            mla.rope_dim,
            mla.v_dim
        );
    }
    if let Some(la) = &config.linear_attention {
        let layers = config.layer_shapes.iter().filter(|s| s.linear_attention).count();
        out!(
            "linear attention: Gated DeltaNet on {layers} of {} layers: {} query/key heads of {}, {} value heads of {}, \
             {}-tap causal convolution; recurrent state {} per sequence instead of a key/value cache",
            config.num_layers,
            la.num_k_heads,
            la.k_dim,
            la.num_v_heads,
            la.v_dim,
            la.conv_kernel,
            la.num_v_heads * la.k_dim * la.v_dim * layers
        );
    }
    if config.attention_output_gate {
        out!("output gate:    sigmoid gate per head from q_proj on full-attention layers");
    }
    if let Some(limit) = config.max_exact_positions() {
        out!("max positions (exact): {limit} (sparse attention keeps every key up to here; longer is refused)");
    }
    if config.value_norm {
        out!("value norm:     weightless RMS norm of each value head");
    }
    if let Some(ple) = &config.per_layer_inputs {
        out!(
            "per-layer inputs: {} per layer from a {}-row table ({} wide)",
            ple.width,
            ple.vocab_size,
            ple.width * config.num_layers
        );
    }
    if let Some(moe) = &config.moe {
        let sparse = moe.sparse_layers.iter().filter(|s| **s).count();
        out!(
            "experts:        {} per MoE layer, top {}, {:?}, expert width {} ({sparse} of {} layers sparse{})",
            moe.num_experts,
            moe.top_k,
            moe.routing,
            moe.intermediate_size,
            config.num_layers,
            if moe.layout == ember_model::config::MoeLayout::Gemma4 {
                ", beside the dense MLP"
            } else {
                ""
            }
        );
        let (router, router_is_linear) = moe.layout.router_module();
        let experts = moe.layout.experts_module();
        let router = if router_is_linear {
            format!("router `{router}` (a linear layer: target_modules)")
        } else {
            format!("router `{router}.weight`")
        };
        out!(
            "expert LoRA:    target_parameters `{experts}.gate_up_proj`, `{experts}.down_proj` (one adapter per expert, \
             PEFT's flat layout), {router}{}",
            if config.spec().peft_fused_moe.is_some() {
                "; `all-linear` and the v4 names gate/gate_proj/up_proj/down_proj mean these, as PEFT rewrites them"
            } else {
                ""
            }
        );
    }
    out!("max positions:  {}", config.max_position_embeddings);
    Ok(())
}

/// `a, a, b` → `2× a, 1× b`.
fn compress(items: &[String]) -> String {
    let mut out: Vec<(usize, &String)> = Vec::new();
    for item in items {
        match out.last_mut() {
            Some((n, last)) if *last == item => *n += 1,
            _ => out.push((1, item)),
        }
    }
    out.iter()
        .map(|(n, s)| format!("{n}× {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a `[[i64]]` field of the inputs file; `None` when absent or a note (a string).
fn matrix(value: &serde_json::Value, key: &str, path: &Path) -> Result<Option<(Vec<i64>, [usize; 2])>> {
    let Some(v) = value.get(key) else {
        return Ok(None);
    };
    if v.is_string() || v.is_null() {
        return Ok(None);
    }
    let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone())
        .with_context(|| format!("{}: `{key}` must be a list of lists of integers", path.display()))?;
    let width = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || width == 0 {
        bail!("{}: `{key}` is empty", path.display());
    }
    if let Some(i) = rows.iter().position(|r| r.len() != width) {
        bail!(
            "{}: `{key}` row {i} has {} entries, row 0 has {width}",
            path.display(),
            rows[i].len()
        );
    }
    Ok(Some((rows.concat(), [rows.len(), width])))
}

fn forward<B: EmberBackend>(job: &ForwardJob, device: &B::Device) -> Result<()> {
    let (model_dir, inputs, out) = (job.model.as_path(), job.inputs.as_path(), job.out.as_path());
    refuse_to_replace_non_logits(out)?;
    let text = std::fs::read_to_string(inputs).with_context(|| format!("cannot read {}", inputs.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", inputs.display()))?;
    let (ids, dims) =
        matrix(&value, "input_ids", inputs)?.with_context(|| format!("{}: missing `input_ids`", inputs.display()))?;
    let mask = matrix(&value, "attention_mask", inputs)?;
    let positions = matrix(&value, "position_ids", inputs)?;
    for (name, m) in [("attention_mask", &mask), ("position_ids", &positions)] {
        if let Some((_, d)) = m {
            if *d != dims {
                bail!(
                    "{}: `{name}` has shape {d:?} but `input_ids` has {dims:?}",
                    inputs.display()
                );
            }
        }
    }
    let mut model = CausalLm::<B>::from_path_as(model_dir, device, job.dtype)?;
    if let Some(adapter) = &job.adapter {
        let files = AdapterFiles::read(adapter)?;
        let report = model
            .load_adapter(&files, device)
            .with_context(|| format!("adapter {} does not fit {}", adapter.display(), model_dir.display()))?;
        note!("adapter {}: {report}", adapter.display());
    }
    let vocab = model.config().vocab_size as i64;
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= vocab) {
        bail!(
            "{}: token id {bad} is outside the vocabulary (0..{vocab})",
            inputs.display()
        );
    }
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, dims), device);
    let input = ModelInput {
        input_ids: int(ids),
        attention_mask: mask.map(|(m, _)| int(m)),
        position_ids: positions.map(|(p, _)| int(p)),
        segment_ids: None,
    };
    let logits = model.forward(input);
    let shape = logits.dims().to_vec();
    let values = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &bytes)?;
    let file = safetensors::serialize(vec![("logits", view)], None)?;
    ember_lora::atomic::write_file(out, &file)?;
    note!("wrote logits {shape:?} to {}", out.display());
    Ok(())
}

/// `ember forward --out` replaces an earlier logits file, never anything else (a model's
/// weights, say): an existing file that is not exactly one `logits` tensor is refused.
fn refuse_to_replace_non_logits(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let is_logits = out.is_file()
        && std::fs::File::open(out)
            .ok()
            .and_then(|f| {
                let mut header = [0u8; 8];
                std::io::Read::read_exact(&mut &f, &mut header).ok()?;
                let len = u64::from_le_bytes(header).min(1 << 20) as usize;
                let mut json = vec![0u8; len];
                std::io::Read::read_exact(&mut &f, &mut json).ok()?;
                let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
                let keys: Vec<&String> = value.as_object()?.keys().filter(|k| *k != "__metadata__").collect();
                Some(keys == ["logits"])
            })
            .unwrap_or(false);
    if !is_logits {
        bail!(
            "{} exists and is not an earlier `ember forward` output; choose another --out",
            out.display()
        );
    }
    Ok(())
}

fn inspect_adapter(path: &Path) -> Result<()> {
    let files = AdapterFiles::read(path)?;
    let c = &files.config;
    let params: usize = files.tensors.values().map(|t| t.lora_a.len() + t.lora_b.len()).sum();
    let mut ranks: Vec<usize> = files.tensors.values().map(|t| t.rank()).collect();
    ranks.sort();
    ranks.dedup();
    let mut names: Vec<&str> = files
        .tensors
        .keys()
        .map(|p| p.rsplit('.').next().unwrap_or(p))
        .collect();
    names.sort();
    names.dedup();
    out!("adapter:        {}", path.display());
    out!("type:           LoRA (PEFT)");
    out!(
        "base model:     {}",
        files.base_model_name_or_path.as_deref().unwrap_or("(not recorded)")
    );
    out!("rank r:         {} (in file: {ranks:?})", c.r);
    out!("lora_alpha:     {}", c.lora_alpha);
    out!(
        "scaling:        {}{}",
        c.module_lora("x").scaling,
        if c.use_rslora {
            " (rsLoRA: alpha/√r)"
        } else {
            " (alpha/r)"
        }
    );
    out!("dropout:        {}", c.lora_dropout);
    out!("target_modules: {:?}", c.target_modules);
    out!("adapted:        {} modules ({})", files.tensors.len(), names.join(", "));
    out!("parameters:     {params} ({:.2} M)", params as f64 / 1e6);
    Ok(())
}

/// A temporary folder, removed when dropped.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn merge(base: &Path, adapter: &Path, out: &Path, dtype: DtypeArg) -> Result<()> {
    let files = AdapterFiles::read(adapter)?;
    let dtype = match dtype {
        DtypeArg::Same => MergeDtype::Same,
        DtypeArg::F32 => MergeDtype::F32,
        DtypeArg::Bf16 => MergeDtype::Bf16,
        DtypeArg::F16 => MergeDtype::F16,
    };
    let start = std::time::Instant::now();
    // A GGUF base (quantized or not) is dequantized to a f32 HF folder beside `out` first, and
    // the adapter is folded into that: merging into 4-bit blocks would drift.
    let _converted;
    let base_dir = if ember_model::source::is_gguf(base) {
        if out.exists() {
            bail!("{}: output folder exists; choose a new one", out.display());
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = out.with_file_name(format!(".{name}.base-from-gguf"));
        let _ = std::fs::remove_dir_all(&tmp); // left by an interrupted merge
        ember_model::source::convert_gguf(base, &tmp)
            .with_context(|| format!("dequantizing {} to a f32 folder for the merge", base.display()))?;
        note!("dequantized {} to f32 for the merge", base.display());
        _converted = RemovedOnDrop(tmp.clone());
        tmp
    } else {
        base.to_path_buf()
    };
    let report = ember_model::lora::merge_checkpoint(&base_dir, &files, out, dtype)
        .with_context(|| format!("merging {} into {}", adapter.display(), base.display()))?;
    note!(
        "merged {} weights into {} shard(s), {:.1} MB, in {:.2} s -> {}",
        report.merged.len(),
        report.shards.len(),
        report.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

fn train(config_path: &Path, overrides: &[String], resume: Option<String>, overwrite: bool) -> Result<ExitCode> {
    let config = RunConfig::load(config_path, overrides)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            note!("\nCtrl-C: saving a checkpoint after this step (press again to quit at once)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let options = RunOptions {
        resume: resume.map(|r| {
            if r == "latest" {
                Resume::Latest
            } else {
                Resume::Dir(r.into())
            }
        }),
        stop,
        progress: true,
        overwrite,
    };
    let (device, dtype) = (config.device, config.dtype);
    let summary = on_device(
        device,
        dtype,
        TrainJob {
            config: &config,
            options: &options,
        },
    )?;
    let d = &summary.train_data;
    note!(
        "data: {} rows, {} samples ({} over max_seq_len dropped, {} truncated, {} without targets, {} bad rows skipped)",
        d.rows, d.samples, d.dropped_overlong, d.truncated, d.dropped_no_targets, d.skipped_bad_rows
    );
    if let (Some(b), Some(a)) = (&summary.eval_before, &summary.eval_after) {
        note!(
            "eval loss {:.4} -> {:.4}, perplexity {:.3} -> {:.3}",
            b.loss,
            a.loss,
            b.perplexity,
            a.perplexity
        );
    }
    match &summary.adapter_dir {
        Some(dir) => {
            note!("{} steps; adapter written to {}", summary.steps, dir.display());
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let sets: String = overrides.iter().map(|o| format!(" --set {}", shell_quote(o))).collect();
            note!(
                "stopped after {} steps; resume with `ember train {}{sets} --resume`",
                summary.steps,
                shell_quote(&config_path.display().to_string())
            );
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
    }
}

/// `s` as one shell word (single-quoted when it holds anything but safe characters).
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `ember train` on a chosen backend.
struct TrainJob<'a> {
    config: &'a RunConfig,
    options: &'a RunOptions,
}

impl BackendJob for TrainJob<'_> {
    type Output = ember_train::RunSummary;

    fn run<B: EmberBackend>(self, device: B::Device) -> Result<Self::Output> {
        use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
        use burn::backend::Autodiff;
        let (config, options) = (self.config, self.options);
        // Gradient checkpointing recomputes activations in the backward pass (burn's balanced
        // strategy), on every backend.
        Ok(if config.train.gradient_checkpointing {
            ember_train::run::<Autodiff<B, BalancedCheckpointing>>(config, options, &device)?
        } else {
            ember_train::run::<Autodiff<B>>(config, options, &device)?
        })
    }
}

fn preview(config_path: &Path, overrides: &[String], count: usize) -> Result<()> {
    let config = RunConfig::load(config_path, overrides)?;
    let model_config = ember_model::source::read_config(&config.base_model)?;
    let tokenizer = ember_model::source::read_tokenizer(&config.base_model)?;
    let data = ember_train::run::prepare_data(&config, &tokenizer, &model_config)?;
    out!("{}", ember_train::data::preview(&tokenizer, &data.train, count)?);
    let show = |name: &str, s: &ember_train::data::DataStats| -> Result<()> {
        out!(
            "{name}: {} rows -> {} samples; {} tokens, {} target tokens, longest {}; dropped: {} over max_seq_len, {} without targets; {} truncated; {} bad rows skipped",
            s.rows, s.samples, s.tokens, s.target_tokens, s.max_len, s.dropped_overlong, s.dropped_no_targets, s.truncated, s.skipped_bad_rows
        );
        Ok(())
    };
    show("train", &data.train_stats)?;
    if let Some(s) = &data.eval_stats {
        show("eval", s)?;
    } else if !data.eval.is_empty() {
        out!("eval: {} samples held out by val_split", data.eval.len());
    }
    let hist = ember_train::data::length_histogram(&data.train);
    let hist: Vec<String> = hist.iter().map(|(k, v)| format!("<={k}: {v}")).collect();
    out!("train lengths: {}", hist.join(", "));
    Ok(())
}

/// Arguments of `ember eval`.
#[derive(clap::Args)]
struct EvalArgs {
    /// A run config: its base model, eval data and final adapter (other flags override).
    config: Option<PathBuf>,
    /// Base model folder or .gguf.
    #[arg(long)]
    model: Option<PathBuf>,
    /// An adapter to compare with the base (repeatable).
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Data file (.jsonl, .csv, .parquet).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Record format: completion, alpaca, chat.
    #[arg(long, default_value = "chat")]
    format: String,
    /// Candidate labels for scoring (comma-separated); default: the distinct answers.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Use at most this many rows.
    #[arg(long)]
    max_rows: Option<usize>,
    /// Longest sample in tokens for the loss (longer ones are dropped).
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Also generate answers greedily and report exact / normalised match.
    #[arg(long)]
    generate: bool,
    /// Folder for eval_report.json (default: the run's output_dir, else the current folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Default: the run config's `device:`/`dtype:`, else cpu and float32.
    #[command(flatten)]
    on: DeviceArgs,
}

fn eval(a: EvalArgs) -> Result<()> {
    let run = a.config.as_deref().map(|p| RunConfig::load(p, &[])).transpose()?;
    let model = a
        .model
        .or_else(|| run.as_ref().map(|r| r.base_model.clone()))
        .context("give a run config or --model")?;
    let mut adapters = a.adapter;
    if adapters.is_empty() {
        if let Some(r) = &run {
            adapters.push(r.output_dir.join("adapter"));
        }
    }
    let data_path = a
        .data
        .or_else(|| run.as_ref().and_then(|r| r.data.eval.clone()))
        .context("give --data (or a run config with data.eval)")?;
    let mut data: ember_train::config::DataConfig = match &run {
        Some(r) => r.data.clone(),
        None => serde_yaml::from_str(&format!("train: x\nformat: {}\n", a.format))
            .with_context(|| format!("--format {}: use completion, alpaca, chat or tokens", a.format))?,
    };
    data.train = data_path;
    if run.is_none() {
        data.max_seq_len = a.max_seq_len;
    }
    let max_rows = a.max_rows.or(run.as_ref().and_then(|r| r.data.max_eval_rows));
    let (device, dtype) = match &run {
        Some(r) => a.on.or(r.device, r.dtype),
        None => a.on.or(DeviceKind::Cpu, BaseDtype::Float32),
    };
    let spec = ember_train::eval::EvalSpec {
        model,
        adapters,
        data,
        labels: a.labels,
        max_rows,
        batch_size: a.batch_size,
        generate: a.generate,
        dtype,
    };
    let report = on_device(device, dtype, EvalJob(&spec))?;
    note!();
    out!("{}", report.markdown());
    let out = a
        .out
        .or_else(|| run.as_ref().map(|r| r.output_dir.clone()))
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("eval_report.json");
    ember_lora::atomic::write_file(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    note!("report written to {}", path.display());
    Ok(())
}

/// `ember eval` on a chosen backend.
struct EvalJob<'a>(&'a ember_train::eval::EvalSpec);

impl BackendJob for EvalJob<'_> {
    type Output = ember_train::eval::EvalReport;

    fn run<B: EmberBackend>(self, device: B::Device) -> Result<Self::Output> {
        Ok(ember_train::eval::evaluate_models::<B>(self.0, &device, |m| {
            if m.starts_with("  ") {
                progress!("\r{m}   ");
            } else {
                note!("{m}");
            }
        })?)
    }
}

/// What `ember generate` was asked to do.
struct GenerateJob {
    model: PathBuf,
    adapter: Option<PathBuf>,
    prompt: Option<String>,
    input_ids: Vec<u32>,
    chat: bool,
    config: ember_model::generate::GenerationConfig,
    stop: Vec<String>,
    json: bool,
    dtype: BaseDtype,
}

impl BackendJob for GenerateJob {
    type Output = ();

    fn run<B: EmberBackend>(self, device: B::Device) -> Result<()> {
        generate_text::<B>(self, &device)
    }
}

fn generate_text<B: EmberBackend>(job: GenerateJob, device: &B::Device) -> Result<()> {
    let GenerateJob {
        model: model_path,
        adapter,
        prompt,
        input_ids,
        chat,
        mut config,
        stop,
        json,
        dtype,
    } = job;
    let model_path = model_path.as_path();
    if !config.temperature.is_finite() || config.temperature < 0.0 {
        bail!("--temperature {}: must be 0 (greedy) or positive", config.temperature);
    }
    if config.top_p.is_nan() || config.top_p <= 0.0 || config.top_p > 1.0 {
        bail!("--top-p {}: must be in (0, 1]", config.top_p);
    }
    let model_config = ember_model::source::read_config(model_path)?;
    let tokenizer = ember_model::source::read_tokenizer(model_path)?;
    let mut model = CausalLm::<B>::from_path_as(model_path, device, dtype)?;
    if let Some(a) = &adapter {
        model.load_adapter(&AdapterFiles::read(a)?, device)?;
    }
    let ids = if !input_ids.is_empty() {
        input_ids
    } else {
        let prompt = prompt.context("give --prompt or --input-ids")?;
        if chat {
            let text = tokenizer.apply_chat_template(&[ember_model::ChatMessage::new("user", prompt)], true)?;
            tokenizer.encode(&text, false)?
        } else {
            tokenizer.encode(&prompt, true)?
        }
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens; give a non-empty --prompt or --input-ids");
    }
    let vocab = model_config.vocab_size;
    if let Some((i, bad)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        bail!(
            "token id {bad} (position {i} of the prompt) is outside the vocabulary of {} (0..{vocab})",
            model_path.display()
        );
    }
    model_config
        .check_sequence_length(ids.len() + config.max_new_tokens)
        .context("--max-new-tokens with this prompt")?;
    config.eos_token_ids = model_config.eos_token_ids.clone();
    if let Some(id) = tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        if !config.eos_token_ids.contains(&id) {
            config.eos_token_ids.push(id);
        }
    }
    let pad = model_config.pad_token_id.unwrap_or(0);
    let mut printed = String::new();
    let mut write_error: Option<std::io::Error> = None;
    let out = ember_model::generate::generate(
        &model,
        std::slice::from_ref(&ids),
        &config,
        pad,
        |_, _| {},
        |_, new| {
            let text = tokenizer.decode(new, true).unwrap_or_default();
            // A token that ends inside a UTF-8 character decodes to U+FFFD until the rest arrives.
            if !json && !text.ends_with('\u{FFFD}') {
                let fresh = text
                    .strip_prefix(printed.as_str())
                    .or_else(|| text.get(printed.len()..))
                    .unwrap_or_default();
                let mut stdout = std::io::stdout();
                let written = write!(stdout, "{fresh}").and_then(|()| stdout.flush());
                if let Err(e) = written {
                    // The reader went away (`| head`): stop generating.
                    write_error = Some(e);
                    return true;
                }
                printed = text.clone();
            }
            stop.iter().any(|s| text.ends_with(s.as_str()))
        },
    );
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let text = tokenizer.decode(&out[0], true)?;
    if json {
        out!(
            "{}",
            serde_json::json!({"prompt_ids": ids, "generated_ids": out[0], "text": text})
        );
    } else {
        out!();
    }
    Ok(())
}
