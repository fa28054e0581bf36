//! Helpers shared by the `ember` binary's tests: fixture paths, model folders with a tokenizer,
//! reading logits files, masked comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `tests/fixtures/` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A plain ChatML template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The `arch` fixture in folder `model` with the fixtures' tokenizer (the same 384-token
/// vocabulary) and `template` as chat template.
pub fn model_folder(arch: &str, model: &Path, template: &str) -> PathBuf {
    std::fs::create_dir_all(model).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        let from = fixtures().join(arch).join(f);
        if from.exists() {
            std::fs::copy(from, model.join(f)).unwrap();
        }
    }
    std::fs::copy(
        fixtures().join("tokenizer/hf/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
    });
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    model.to_path_buf()
}

/// One f32 tensor of a safetensors file, with its shape.
pub fn read_f32(path: &Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v, t.shape().to_vec())
}

/// Max |a − e| over `[batch, seq, vocab]` logits where the `arch` fixture's attention_mask is 1
/// (infinite when a compared value is NaN).
pub fn masked_max_diff(arch: &str, actual: &[f32], expected: &[f32], shape: &[usize]) -> f32 {
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("inputs.json")).unwrap()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(inputs["attention_mask"].clone()).unwrap();
    assert_eq!(actual.len(), expected.len());
    let mut worst = 0.0f32;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let pos = i / shape[2];
        if mask[pos / shape[1]][pos % shape[1]] == 1 {
            let d = (a - e).abs();
            worst = if d.is_nan() { f32::INFINITY } else { worst.max(d) };
        }
    }
    worst
}
