//! GGUF (v2/v3) base models: metadata, tensors dequantized to f32 (F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1, Q4_K, Q6_K), llama/qwen2/qwen3 tensor names mapped to HF names (llama.cpp's q/k row
//! permutation of llama undone), a HF `config.json` built from the metadata, and the tokenizer built from
//! the GGUF vocabulary and merges (gpt2-style byte-level BPE) with the chat template.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::{json, Value};

use ember_lora::{QuantFormat, QuantMatrix, SharedBytes};

use crate::error::{ModelError, Result};
use crate::tokenizer::{ChatTemplate, Tokenizer};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// An array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Int(i) => Some(*i as f64),
            MetaValue::Float(f) => Some(*f),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// llama.cpp name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, fastest first (ggml's `ne`).
    pub dims: Vec<usize>,
    /// ggml type id.
    pub kind: u32,
    /// Offset from the start of the data section.
    pub offset: usize,
}

impl GgufTensor {
    /// The number of values; `None` when the dimensions' product overflows.
    pub fn values(&self) -> Option<usize> {
        self.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    /// Shared with the quantized weights read in place (`hf_tensors_keeping_blocks`).
    mmap: Arc<Mmap>,
    /// Metadata by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor headers in file order.
    pub tensors: Vec<GgufTensor>,
    data_start: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> ModelError {
        ModelError::CorruptWeights {
            path: self.path.to_path_buf(),
            message: format!("GGUF: {what} at byte {}", self.pos),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err("truncated file"))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        if n > self.bytes.len() {
            return Err(self.err("string length beyond the file"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, kind: u32) -> Result<MetaValue> {
        Ok(match kind {
            0 => MetaValue::Int(self.take(1)?[0] as i64),
            1 => MetaValue::Int(self.take(1)?[0] as i8 as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => MetaValue::Int(self.u32()? as i64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.take(4)?.try_into().expect("4")) as f64),
            7 => MetaValue::Bool(self.take(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.bytes.len() {
                    return Err(self.err("array length beyond the file"));
                }
                // Capacity from the file is a claim, not a fact: reserve a bounded amount.
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(inner)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Int(self.u64()? as i64),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            other => return Err(self.err(&format!("unknown metadata type {other}"))),
        })
    }
}

/// ggml type names for messages.
fn type_name(kind: u32) -> String {
    match kind {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        8 => "Q8_0".into(),
        9 => "Q8_1".into(),
        10 => "Q2_K".into(),
        11 => "Q3_K".into(),
        12 => "Q4_K".into(),
        13 => "Q5_K".into(),
        14 => "Q6_K".into(),
        15 => "Q8_K".into(),
        30 => "BF16".into(),
        other => format!("ggml type {other}"),
    }
}

/// (elements per block, bytes per block) of supported types.
fn block_layout(kind: u32) -> Option<(usize, usize)> {
    Some(match kind {
        0 => (1, 4),
        1 | 30 => (1, 2),
        other => QuantFormat::from_ggml(other).map(|f| (f.block_values(), f.block_bytes()))?,
    })
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes `n` values of ggml type `kind`.
pub fn dequantize(kind: u32, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    let floats = |width: usize, f: fn(&[u8]) -> f32| -> Option<Vec<f32>> {
        (bytes.len() >= n * width).then(|| bytes.chunks_exact(width).take(n).map(f).collect())
    };
    match kind {
        0 => floats(4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        1 => floats(2, f16),
        30 => floats(2, |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        other => ember_lora::quant::dequantize_blocks(QuantFormat::from_ggml(other)?, bytes, n),
    }
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only map of a file this process does not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut r = Reader {
            bytes: &mmap,
            pos: 0,
            path,
        };
        if r.take(4)? != b"GGUF" {
            return Err(r.err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(&format!("unsupported GGUF version {version} (2 and 3 are supported)")));
        }
        let n_tensors = r.u64()? as usize;
        let n_kv = r.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 8 {
                return Err(r.err(&format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let kind = r.u32()?;
            let offset = r.u64()? as usize;
            tensors.push(GgufTensor {
                name,
                dims,
                kind,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_f64)
            .unwrap_or(32.0);
        if !(1.0..=65536.0).contains(&alignment) {
            return Err(r.err(&format!("general.alignment {alignment} is not in 1..=65536")));
        }
        let alignment = alignment as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let file = Self {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            metadata,
            tensors,
            data_start,
        };
        for t in &file.tensors {
            if let Some((block, bytes)) = block_layout(t.kind) {
                let end = t
                    .values()
                    .and_then(|n| n.div_ceil(block).checked_mul(bytes))
                    .and_then(|len| len.checked_add(t.offset))
                    .and_then(|len| len.checked_add(file.data_start));
                if end.is_none_or(|end| end > file.mmap.len()) {
                    return Err(ModelError::CorruptWeights {
                        path: path.to_path_buf(),
                        message: format!("GGUF: tensor `{}` ends beyond the file (truncated?)", t.name),
                    });
                }
            }
        }
        Ok(file)
    }

    fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Storage types of the tensors with their counts, e.g. `Q4_1 ×210, F32 ×61, Q8_0 ×1`.
    pub fn type_summary(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for t in &self.tensors {
            *counts.entry(type_name(t.kind)).or_insert(0) += 1;
        }
        let mut v: Vec<(String, usize)> = counts.into_iter().collect();
        v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        v.iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The architecture (`general.architecture`).
    pub fn architecture(&self) -> &str {
        self.meta("general.architecture")
            .and_then(MetaValue::as_str)
            .unwrap_or("")
    }

    /// Dequantizes one tensor to f32, row-major with HF's shape (`dims` reversed).
    pub fn read(&self, t: &GgufTensor) -> Result<(Vec<f32>, Vec<usize>)> {
        let (bytes, n) = self.stored(t)?;
        let values = dequantize(t.kind, bytes, n).ok_or_else(|| ModelError::CorruptWeights {
            path: self.path.clone(),
            message: format!(
                "GGUF: tensor `{}` has {} values, not a whole number of blocks",
                t.name, n
            ),
        })?;
        Ok((values, t.dims.iter().rev().copied().collect()))
    }

    /// The stored bytes of one tensor and its number of values.
    fn stored(&self, t: &GgufTensor) -> Result<(&[u8], usize)> {
        let (range, n) = self.stored_range(t)?;
        Ok((&self.mmap[range], n))
    }

    /// Where one tensor's bytes lie in the file, and its number of values.
    fn stored_range(&self, t: &GgufTensor) -> Result<(std::ops::Range<usize>, usize)> {
        let n = t.values().ok_or_else(|| ModelError::CorruptWeights {
            path: self.path.clone(),
            message: format!(
                "GGUF: tensor `{}` has dimensions {:?} whose product overflows",
                t.name, t.dims
            ),
        })?;
        let (block, bytes_per) = block_layout(t.kind).ok_or_else(|| ModelError::UnsupportedDtype {
            key: t.name.clone(),
            path: self.path.clone(),
            dtype: format!(
                "{} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
                type_name(t.kind)
            ),
        })?;
        let start = self.data_start + t.offset;
        Ok((start..start + n.div_ceil(block) * bytes_per, n))
    }

    /// A HF `config.json` built from the metadata (architectures in [`GGUF_ARCHITECTURES`]).
    pub fn hf_config(&self) -> Result<Value> {
        let arch = self.architecture().to_string();
        let class = match arch.as_str() {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => {
                return Err(ModelError::UnsupportedModelType {
                    path: self.path.clone(),
                    model_type: format!("{arch} (GGUF general.architecture)"),
                    supported: format!("{} (GGUF); HF folders: see README", GGUF_ARCHITECTURES.join(", ")),
                })
            }
        };
        let need = |k: &str| -> Result<f64> {
            self.meta(&format!("{arch}.{k}"))
                .and_then(MetaValue::as_f64)
                .ok_or_else(|| ModelError::InvalidConfig {
                    path: self.path.clone(),
                    key: format!("{arch}.{k}"),
                    message: "missing from the GGUF metadata".into(),
                })
        };
        let opt = |k: &str| self.meta(&format!("{arch}.{k}")).and_then(MetaValue::as_f64);
        let heads = need("attention.head_count")? as usize;
        if heads == 0 {
            return Err(ModelError::InvalidConfig {
                path: self.path.clone(),
                key: format!("{arch}.attention.head_count"),
                message: "is 0".into(),
            });
        }
        let hidden = need("embedding_length")? as usize;
        let vocab = match self.meta("tokenizer.ggml.tokens") {
            Some(MetaValue::Array(a)) => a.len(),
            _ => need("vocab_size")? as usize,
        };
        let tied = !self.tensors.iter().any(|t| t.name == "output.weight");
        let head_dim = opt("attention.key_length").map_or(hidden / heads, |v| v as usize);
        let mut config = json!({
            "architectures": [class],
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")? as usize,
            "num_hidden_layers": need("block_count")? as usize,
            "num_attention_heads": heads,
            "num_key_value_heads": opt("attention.head_count_kv").map_or(heads, |v| v as usize),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": opt("context_length").map_or(4096, |v| v as usize),
            "rms_norm_eps": opt("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            "rope_theta": opt("rope.freq_base").unwrap_or(10000.0),
            "rope_scaling": Value::Null,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": tied,
            "torch_dtype": "float32",
        });
        if let Some(t) = self.tensors.iter().find(|t| t.name == ROPE_FREQS) {
            // Llama 3.1/3.2: llama.cpp's converter stores the llama3 scaling as per-frequency
            // divisors; transformers wants the parameters, recovered here.
            let (factors, _) = self.read(t)?;
            let rotary_dim = opt("rope.dimension_count").map_or(head_dim, |v| v as usize);
            let theta = opt("rope.freq_base").unwrap_or(10000.0);
            let old = opt("rope.scaling.original_context_length").unwrap_or(8192.0);
            config["rope_scaling"] =
                llama3_scaling_from_factors(&factors, theta, rotary_dim, old).map_err(|message| {
                    ModelError::InvalidConfig {
                        path: self.path.clone(),
                        key: ROPE_FREQS.into(),
                        message,
                    }
                })?;
        } else if let Some(factor) = opt("rope.scaling.factor") {
            let kind = self
                .meta(&format!("{arch}.rope.scaling.type"))
                .and_then(MetaValue::as_str)
                .unwrap_or("linear");
            if kind == "linear" {
                config["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
            }
        }
        for (key, meta) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(v) = self.meta(meta).and_then(MetaValue::as_f64) {
                config[key] = json!(v as u64);
            }
        }
        Ok(config)
    }

    /// Every tensor, dequantized, under its HF name, with llama.cpp's q/k permutation undone.
    pub fn hf_tensors(&self, config: &Value) -> Result<crate::weights::HostTensors> {
        Ok(self.hf_tensors_keeping_blocks(config, false)?.0)
    }

    /// [`GgufFile::hf_tensors`], with `keep_blocks` the quantized 2-d tensors (Q8_0, Q4_0, Q4_1,
    /// Q4_K, Q6_K) kept as their stored blocks (rows un-permuted as whole blocks) instead of
    /// dequantized: the float tensors, and the quantized ones by HF name.
    pub fn hf_tensors_keeping_blocks(
        &self,
        config: &Value,
        keep_blocks: bool,
    ) -> Result<(crate::weights::HostTensors, BTreeMap<String, QuantMatrix>)> {
        let heads = config["num_attention_heads"].as_u64().unwrap_or(1) as usize;
        let kv_heads = config["num_key_value_heads"].as_u64().unwrap_or(heads as u64) as usize;
        // llama.cpp's converter permutes q/k rows for the llama architecture only.
        let permuted = config["model_type"] == "llama";
        let mut out = BTreeMap::new();
        let mut blocks = BTreeMap::new();
        // `rope_freqs` is read into the config's rope_scaling (`hf_config`), not a weight.
        for t in self.tensors.iter().filter(|t| t.name != ROPE_FREQS) {
            let name = hf_name(&t.name).ok_or_else(|| ModelError::UnexpectedTensors {
                keys: format!("{} (no HF name for this llama.cpp tensor)", t.name),
                dir: self.path.clone(),
            })?;
            let heads = if !permuted {
                None
            } else if name.ends_with("self_attn.q_proj.weight") {
                Some(heads)
            } else if name.ends_with("self_attn.k_proj.weight") {
                Some(kv_heads)
            } else {
                None
            };
            let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
            match QuantFormat::from_ggml(t.kind).filter(|_| keep_blocks && shape.len() == 2) {
                Some(format) => {
                    let (range, _) = self.stored_range(t)?;
                    let shape = [shape[0], shape[1]];
                    // Blocks whose rows need no reordering are read in place from the mapped
                    // file: loading copies nothing, and the page cache holds the only copy.
                    let matrix = match heads {
                        Some(h) => {
                            QuantMatrix::from_blocks(format, shape, unpermute_rows(&self.mmap[range], shape[0], h))
                        }
                        None => {
                            let file: SharedBytes = self.mmap.clone();
                            QuantMatrix::from_shared_blocks(format, shape, file, range)
                        }
                    }
                    .map_err(|e| ModelError::CorruptWeights {
                        path: self.path.clone(),
                        message: format!("GGUF: tensor `{}`: {e}", t.name),
                    })?;
                    blocks.insert(name, matrix);
                }
                None => {
                    let (mut values, shape) = self.read(t)?;
                    if let Some(h) = heads {
                        values = unpermute(&values, &shape, h);
                    }
                    out.insert(name, (values, shape));
                }
            }
        }
        Ok((out, blocks))
    }

    /// Whether the file carries a tokenizer (`tokenizer.ggml.model`).
    pub fn has_tokenizer(&self) -> bool {
        self.meta("tokenizer.ggml.model").is_some()
    }

    /// The tokenizer from `tokenizer.ggml.*` (gpt2-style byte-level BPE) and the chat template.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let tok_err = |message: String| ModelError::Tokenizer {
            path: self.path.clone(),
            message,
        };
        let model = self
            .meta("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(tok_err(format!(
                "tokenizer.ggml.model `{model}` is not supported (only gpt2-style BPE); put the model's tokenizer.json beside the .gguf"
            )));
        }
        let strings = |key: &str| -> Vec<String> {
            match self.meta(key) {
                Some(MetaValue::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
                _ => Vec::new(),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens");
        let merges = strings("tokenizer.ggml.merges");
        let types: Vec<i64> = match self.meta("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(a)) => a
                .iter()
                .map(|v| if let MetaValue::Int(i) = v { *i } else { 1 })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        // Control (3) and user-defined (4) tokens are added tokens; control ones are special.
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
            .collect();
        let pre = self
            .meta("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre {
            // SmolLM/StarCoder-style: digits one by one, then GPT-2 byte-level splitting.
            "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "default" | "gpt2" | "gpt-2" => byte_level.clone(),
            other => {
                return Err(tok_err(format!(
                "GGUF pre-tokenizer `{other}` is not supported yet; put the model's tokenizer.json beside the .gguf"
            )))
            }
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let inner =
            tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| tok_err(e.to_string()))?;
        let token = |key: &str| {
            self.meta(key)
                .and_then(MetaValue::as_f64)
                .and_then(|i| tokens.get(i as usize).cloned())
        };
        let (bos, eos, pad) = (
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
            token("tokenizer.ggml.padding_token_id"),
        );
        let template = self
            .meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(|s| ChatTemplate::new(s, bos.clone().unwrap_or_default(), eos.clone().unwrap_or_default()));
        let mut tokenizer = Tokenizer::from_parts(inner, self.path.clone(), template);
        tokenizer.bos_token = bos;
        tokenizer.eos_token = eos;
        tokenizer.pad_token = pad;
        Ok(tokenizer)
    }
}

/// llama.cpp's tensor of per-frequency RoPE divisors (Llama 3.1/3.2's llama3 scaling).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The divisors llama.cpp's converter (`LlamaModel.generate_extra_tensors`) writes for
/// transformers' llama3 RoPE scaling: 1 above the high-frequency cut, `factor` below the
/// low-frequency one, `1 / ((1 - s)/factor + s)` between, `s` linear in `old / wavelength`.
pub fn llama3_rope_factors(theta: f64, rotary_dim: usize, factor: f64, low: f64, high: f64, old: f64) -> Vec<f64> {
    (0..rotary_dim / 2)
        .map(|i| {
            let wavelen = 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / rotary_dim as f64);
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// transformers' `rope_scaling` of type llama3 from llama.cpp's `rope_freqs` divisors:
/// `factor` is the largest divisor; the smoothing `s` of the divisors between 1 and `factor`
/// is linear in `old / wavelength` with slope `1/(high - low)` and intercept `-low/(high - low)`,
/// fitted by least squares (only the ratios of `old`, `low` and `high` matter, so `old` is
/// taken as given: the GGUF's `rope.scaling.original_context_length`, else Llama 3's 8192).
/// The recovered parameters are checked by recomputing every divisor, so a wrong guess is an
/// error, never a different RoPE.
pub fn llama3_scaling_from_factors(
    factors: &[f32],
    theta: f64,
    rotary_dim: usize,
    old: f64,
) -> std::result::Result<Value, String> {
    if factors.len() != rotary_dim / 2 {
        return Err(format!(
            "has {} values; {rotary_dim} rotated dimensions need {}",
            factors.len(),
            rotary_dim / 2
        ));
    }
    let factor = factors.iter().fold(1f64, |m, &f| m.max(f as f64));
    if factors.iter().all(|&f| (f as f64 - 1.0).abs() < 1e-6) {
        return Ok(Value::Null);
    }
    let points: Vec<(f64, f64)> = factors
        .iter()
        .enumerate()
        .filter(|(_, &f)| (f as f64) > 1.0 + 1e-4 && (f as f64) < factor * (1.0 - 1e-4))
        .map(|(i, &f)| {
            let wavelen = 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / rotary_dim as f64);
            let smooth = (1.0 / f as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            (old / wavelen, smooth)
        })
        .collect();
    // Values as a config would state them (the divisors are stored in f32).
    let round = |v: f64| (v * 1e4).round() / 1e4;
    let (low, high) = if points.len() >= 2 {
        let n = points.len() as f64;
        let (mx, my) = (
            points.iter().map(|p| p.0).sum::<f64>() / n,
            points.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let slope = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
            / points.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
        let intercept = my - slope * mx;
        if slope.is_nan() || slope <= 0.0 {
            return Err("does not look like a llama3 RoPE scaling (no smooth ramp between 1 and the factor)".into());
        }
        (round(-intercept / slope), round((1.0 - intercept) / slope))
    } else {
        // Too few divisors on the ramp to fit it: Llama 3's low_freq_factor of 1, and the
        // high one through the ramp's point (or Llama 3's 4); the check below decides.
        match points.first() {
            Some(&(x, s)) if s > 0.0 => (1.0, round(1.0 + (x - 1.0) / s)),
            _ => (1.0, 4.0),
        }
    };
    if low.is_nan() || high.is_nan() || low <= 0.0 || high <= low {
        return Err(format!(
            "does not look like a llama3 RoPE scaling (low_freq_factor {low}, high_freq_factor {high})"
        ));
    }
    let factor = round(factor);
    let again = llama3_rope_factors(theta, rotary_dim, factor, low, high, old);
    let mismatch = factors
        .iter()
        .zip(&again)
        .enumerate()
        .find(|&(_, (&f, &g))| (f as f64 - g).abs() > 1e-4 * g);
    if let Some((i, (f, g))) = mismatch {
        return Err(format!(
            "divisor {i} is {f}, the llama3 scaling (factor {factor}, low_freq_factor {low}, high_freq_factor {high}, \
             original_max_position_embeddings {old}) gives {g}"
        ));
    }
    Ok(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old as u64,
    }))
}

/// The GGUF `general.architecture`s Ember reads.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// llama.cpp tensor name → HF name (llama, qwen2, qwen3 architectures).
pub fn hf_name(name: &str) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's `permute`: rows were reordered from HF's rotate-half layout to
/// interleaved pairs per head (`reshape(h, 2, d/2, ...) .swapaxes(1, 2)`); this is the inverse.
///
/// # Shapes
/// - `values`: `[heads·head_dim, in]` row-major; output: same
pub fn unpermute(values: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
    unpermute_rows(values, shape[0], heads)
}

/// [`unpermute`] of `rows` equal rows of any element type (f32 values, or the bytes of a
/// quantized tensor's rows, which are whole blocks in GGUF).
pub fn unpermute_rows<T: Copy + Default>(values: &[T], rows: usize, heads: usize) -> Vec<T> {
    let cols = values.len() / rows.max(1);
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) holds HF row (h, j, i).
                let src = h * head_dim + i * 2 + j;
                let dst = h * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
