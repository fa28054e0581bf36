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
    let dir = tempdir(name);
    let llama = fixtures().join("llama");
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(llama.join(f), dir.join(f)).unwrap();
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
