//! Where a base model comes from: a HuggingFace folder or a GGUF file. Every entry point
//! (`base_model:`, `--model`) goes through here.

use std::path::Path;

use crate::config::{DecoderConfig, HfConfig};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

/// Whether `path` names a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) && path.is_file()
}

/// The normalised config of a folder (`config.json`) or GGUF file (its metadata).
pub fn read_config(path: &Path) -> Result<DecoderConfig> {
    if is_gguf(path) {
        let file = GgufFile::open(path)?;
        let value = file.hf_config()?;
        let hf: HfConfig = serde_json::from_value(value).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        DecoderConfig::from_hf(&hf, path)
    } else {
        DecoderConfig::from_file(path.join("config.json"))
    }
}

/// The tokenizer of a folder, or of a GGUF file (a `tokenizer.json` beside the file wins;
/// otherwise the GGUF vocabulary).
pub fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    if is_gguf(path) {
        let dir = path.parent().unwrap_or(Path::new("."));
        if dir.join("tokenizer.json").exists() {
            let mut t = Tokenizer::from_dir(dir)?;
            if t.chat_template.is_none() {
                let file = GgufFile::open(path)?;
                if file.has_tokenizer() {
                    t.chat_template = file.tokenizer()?.chat_template;
                }
            }
            return Ok(t);
        }
        GgufFile::open(path)?.tokenizer()
    } else {
        Tokenizer::from_dir(path)
    }
}

/// Config and dequantized weights (HF names) of a GGUF file.
pub fn gguf_weights(path: &Path) -> Result<(DecoderConfig, Weights)> {
    gguf_weights_keeping_blocks(path, false)
}

/// [`gguf_weights`]; with `keep_blocks` the quantized tensors stay as their stored blocks
/// (`base_dtype: gguf`) instead of being dequantized to f32.
pub fn gguf_weights_keeping_blocks(path: &Path, keep_blocks: bool) -> Result<(DecoderConfig, Weights)> {
    let file = GgufFile::open(path)?;
    let value = file.hf_config()?;
    let hf: HfConfig = serde_json::from_value(value.clone()).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let config = DecoderConfig::from_hf(&hf, path)?;
    let (tensors, blocks) = file.hf_tensors_keeping_blocks(&value, keep_blocks)?;
    Ok((config, Weights::from_memory_with_blocks(path, tensors, blocks)))
}

/// Writes a GGUF model as a HuggingFace folder transformers loads: `config.json`,
/// `model.safetensors` (f32, dequantized), `tokenizer.json`, `tokenizer_config.json` (with the
/// chat template; a `tokenizer.json` beside the file wins, as in [`read_tokenizer`]) and
/// `generation_config.json`; a GGUF without either gets no tokenizer files. The folder is written under a temporary name and renamed at the
/// end; an existing `out` is refused.
pub fn convert_gguf(path: &Path, out: &Path) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    use serde_json::json;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ModelError::Io { path: p, source }
    };
    if out.exists() {
        return Err(ModelError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output folder exists; choose a new one",
            ),
        });
    }
    let file = GgufFile::open(path)?;
    let config = file.hf_config()?;
    let beside = path.parent().is_some_and(|dir| dir.join("tokenizer.json").exists());
    let tokenizer = if beside || file.has_tokenizer() {
        Some(read_tokenizer(path)?)
    } else {
        None
    };
    let tensors = file.hf_tensors(&config)?;
    let staging_guard = ember_lora::atomic::Staging::new(out)?;
    let staging = staging_guard.path().to_path_buf();
    let json_text = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    std::fs::write(staging.join("config.json"), json_text(&config)).map_err(io(&staging))?;
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(k, (v, s))| (k, ember_lora::adapter::f32_to_bytes(&v), s))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| ModelError::CorruptWeights {
                    path: path.to_path_buf(),
                    message: format!("{k}: {e:?}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let weights_path = staging.join("model.safetensors");
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, metadata, &weights_path).map_err(|e| ModelError::CorruptWeights {
        path: weights_path.clone(),
        message: format!("cannot write: {e:?}"),
    })?;
    if let Some(tokenizer) = &tokenizer {
        let tokenizer_json = tokenizer.inner().to_string(true).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        std::fs::write(staging.join("tokenizer.json"), tokenizer_json).map_err(io(&staging))?;
        let tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template.as_ref().map(|t| t.source().to_string()),
            "model_max_length": config["max_position_embeddings"],
            "add_bos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        std::fs::write(staging.join("tokenizer_config.json"), json_text(&tokenizer_config)).map_err(io(&staging))?;
    }
    let generation = json!({
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
    });
    std::fs::write(staging.join("generation_config.json"), json_text(&generation)).map_err(io(&staging))?;
    staging_guard.commit_new(out)?;
    Ok(())
}
