//! Shared helpers: a tiny model folder with a tokenizer, data files, temp dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh folder, unique per call: tests run in parallel threads of one process.
pub fn tempdir(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ember-train-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// SmolLM2's ChatML template (as in its GGUF).
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The llama fixture with the fixtures' tokenizer (and a ChatML template) in one folder.
pub fn model_dir(name: &str) -> PathBuf {
    model_dir_of(name, "llama")
}

/// [`model_dir`] with the weights and config of fixture `arch`.
pub fn model_dir_of(name: &str, arch: &str) -> PathBuf {
    let dir = tempdir(name);
    let source = fixtures().join(arch);
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(source.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("tokenizer/hf/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

/// The fixture's `inputs.json` as one training batch, with its `position_ids` when given (the
/// left-padded 2026 fixtures), else the arange positions transformers used (right padding).
pub fn fixture_batch(arch: &str) -> ember_train::data::Batch {
    #[derive(serde::Deserialize)]
    struct Inputs {
        input_ids: Vec<Vec<i64>>,
        attention_mask: Vec<Vec<i64>>,
        labels: Vec<Vec<i64>>,
        #[serde(default, deserialize_with = "positions_or_note")]
        position_ids: Option<Vec<Vec<i64>>>,
    }
    let i: Inputs =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("inputs.json")).unwrap()).unwrap();
    let dims = [i.input_ids.len(), i.input_ids[0].len()];
    let target_tokens = i
        .labels
        .iter()
        .map(|r| r[1..].iter().filter(|&&l| l != -100).count())
        .sum();
    ember_train::data::Batch {
        input_ids: i.input_ids.concat(),
        labels: i.labels.concat(),
        attention_mask: i.attention_mask.concat(),
        position_ids: match &i.position_ids {
            Some(p) => p.concat(),
            None => (0..dims[0]).flat_map(|_| 0..dims[1] as i64).collect(),
        },
        segment_ids: None,
        dims,
        target_tokens,
    }
}

/// The fixture's `expected.json`.
pub fn expected(arch: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("expected.json")).unwrap()).unwrap()
}

/// PEFT's five losses from `adapter_random_b` (`lora.train.losses_before_each_step`).
pub fn reference_losses(arch: &str) -> Vec<f64> {
    expected(arch)["lora"]["train"]["losses_before_each_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A small completion data file of Zen-of-Python lines.
pub fn completion_data(dir: &Path) -> PathBuf {
    let lines = [
        "Beautiful is better than ugly.",
        "Explicit is better than implicit.",
        "Simple is better than complex.",
        "Complex is better than complicated.",
        "Flat is better than nested.",
        "Sparse is better than dense.",
        "Readability counts.",
        "Errors should never pass silently.",
        "In the face of ambiguity, refuse the temptation to guess.",
        "Now is better than never.",
    ];
    let path = dir.join("train.jsonl");
    let text: String = lines
        .iter()
        .map(|l| serde_json::json!({"text": l}).to_string() + "\n")
        .collect();
    write(&path, &text);
    path
}

/// `position_ids` of an inputs.json: explicit positions, or (the 2025 fixtures) a note saying
/// transformers used `0..seq`.
pub fn positions_or_note<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Vec<i64>>>, D::Error> {
    use serde::Deserialize;
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(rows) => {
            Some(serde_json::from_value(serde_json::Value::Array(rows)).map_err(serde::de::Error::custom)?)
        }
        _ => None,
    })
}
