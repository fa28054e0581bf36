//! GGUF (v2/v3) base models: metadata, tensors dequantized to f32 (F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1, Q4_K, Q6_K), llama/qwen2/qwen3 tensor names mapped to HF names (llama.cpp's q/k row
//! permutation of llama undone), a HF `config.json` built from the metadata, and the tokenizer built from
//! the GGUF vocabulary and merges (gpt2-style byte-level BPE) with the chat template.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{json, Value};

use ember_lora::{QuantFormat, QuantMatrix};

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
    mmap: Mmap,
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
            mmap,
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
        Ok((&self.mmap[start..start + n.div_ceil(block) * bytes_per], n))
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
        if let Some(factor) = opt("rope.scaling.factor") {
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
        for t in &self.tensors {
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
                    let (bytes, _) = self.stored(t)?;
                    let bytes = match heads {
                        Some(h) => unpermute_rows(bytes, shape[0], h),
                        None => bytes.to_vec(),
                    };
                    let matrix = QuantMatrix::from_blocks(format, [shape[0], shape[1]], bytes).map_err(|e| {
                        ModelError::CorruptWeights {
                            path: self.path.clone(),
                            message: format!("GGUF: tensor `{}`: {e}", t.name),
                        }
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
