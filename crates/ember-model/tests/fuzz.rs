//! Property tests on what Ember reads from files it did not write: GGUF files, safetensors
//! headers and config.json. Mutated and truncated copies of real fixtures must give an error
//! naming the file, never a panic, a hang or an allocation the size of a header field.

mod common;

use std::path::{Path, PathBuf};

use ember_model::gguf::GgufFile;
use ember_model::{CausalLm, DecoderConfig, Weights};
use proptest::prelude::*;

fn scratch(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ember-fuzz-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `bytes` with `edits` applied (position modulo the length of the region they aim at) and
/// cut to `keep` bytes when given.
fn mutate(bytes: &[u8], edits: &[(usize, u8)], head: usize, keep: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(pos, value) in edits {
        let region = if pos % 2 == 0 { head.min(out.len()) } else { out.len() };
        if region > 0 {
            out[(pos / 2) % region] = value;
        }
    }
    if let Some(keep) = keep {
        out.truncate(keep % (bytes.len() + 1));
    }
    out
}

/// Everything a user command does with a GGUF: header, config, tokenizer, every tensor.
fn read_gguf(path: &Path) -> Result<(), String> {
    let file = GgufFile::open(path).map_err(|e| e.to_string())?;
    let _ = file.type_summary();
    if let Ok(config) = file.hf_config() {
        let _ = file.hf_tensors(&config);
    }
    let _ = file.tokenizer();
    for t in &file.tensors {
        let _ = file.read(t);
    }
    Ok(())
}

/// Header bytes of a safetensors file: the 8-byte length and the JSON.
fn safetensors_header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Cases per property: `default` in `cargo test`, more with `EMBER_FUZZ_CASES=N` (a longer
/// hunt by hand).
fn cases(default: u32) -> u32 {
    std::env::var("EMBER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(96), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gguf_parser_survives_mutations(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..12),
        keep in prop::option::of(any::<usize>()),
    ) {
        let good = std::fs::read(common::fixtures().join("gguf_arch/qwen2.gguf")).unwrap();
        let dir = scratch("gguf");
        let path = dir.join("model.gguf");
        std::fs::write(&path, mutate(&good, &edits, 4096, keep)).unwrap();
        if let Err(message) = read_gguf(&path) {
            prop_assert!(message.contains("model.gguf"), "{message}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn safetensors_reader_survives_mutations(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        keep in prop::option::of(any::<usize>()),
    ) {
        let good = std::fs::read(common::fixtures().join("llama/model.safetensors")).unwrap();
        let head = safetensors_header_len(&good);
        let dir = scratch("st");
        let path = dir.join("model.safetensors");
        std::fs::write(&path, mutate(&good, &edits, head, keep)).unwrap();
        match Weights::open_files(&dir, std::slice::from_ref(&path)) {
            Err(e) => prop_assert!(e.to_string().contains("model.safetensors"), "{e}"),
            Ok(weights) => {
                let keys: Vec<String> = weights.keys().cloned().collect();
                for key in keys {
                    let (shape, _) = weights.info(&key).unwrap();
                    let _ = weights.read_f32(&key, &shape);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Any key of config.json (of a Llama, a Llama 4, a SmolLM3, a Gemma 4 MoE, or a Mistral 3
    /// or Gemma 4 wrapper, at its top level or in its `text_config`) set to any small JSON value:
    /// an error naming the file or a config the model can be built from.
    #[test]
    fn config_json_survives_odd_values(
        arch in prop_oneof![
            Just("llama"),
            Just("llama4"),
            Just("smollm3"),
            Just("ministral3_wrapped"),
            Just("gemma4_moe"),
            Just("gemma4_wrapped"),
        ],
        nested in any::<bool>(),
        changes in prop::collection::vec((0usize..64, prop_oneof![
            Just(serde_json::json!(0)),
            Just(serde_json::json!(-1)),
            Just(serde_json::json!(1)),
            Just(serde_json::json!(3)),
            Just(serde_json::json!(1e300)),
            Just(serde_json::json!(18446744073709551615u64)),
            Just(serde_json::json!(0.5)),
            Just(serde_json::json!(null)),
            Just(serde_json::json!("x")),
            Just(serde_json::json!([])),
            Just(serde_json::json!({})),
            Just(serde_json::json!({"rope_type": "yarn", "factor": 0})),
        ]), 1..4),
    ) {
        let text = std::fs::read_to_string(common::fixtures().join(arch).join("config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        {
            let target = if nested && config.get("text_config").is_some() {
                &mut config["text_config"]
            } else {
                &mut config
            };
            let keys: Vec<String> = target.as_object().unwrap().keys().cloned().collect();
            for (k, value) in changes {
                target[&keys[k % keys.len()]] = value;
            }
        }
        let dir = scratch("config");
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        match DecoderConfig::from_file(&path) {
            Err(e) => prop_assert!(e.to_string().contains("config.json"), "{e}"),
            Ok(_) => {
                // Building the model from it checks every weight against the config.
                let _ = std::fs::copy(common::fixtures().join(arch).join("model.safetensors"), dir.join("model.safetensors"));
                let _ = std::fs::copy(common::fixtures().join("llama/tokenizer.json"), dir.join("tokenizer.json"));
                let _ = CausalLm::<common::TestBackend>::from_path(&dir, &Default::default());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A case the fuzzer found (2026-12-06): an expert width of 2⁶⁴ − 1 overflowed `2·inter` while
/// loading the experts. MoE and linear-attention sizes are now bounded like the others.
#[test]
fn huge_expert_sizes_are_refused_by_key() {
    for (arch, key) in [
        ("gemma4_moe", "moe_intermediate_size"),
        ("qwen3_moe", "num_experts"),
        ("glm4_moe", "n_routed_experts"),
    ] {
        let text = std::fs::read_to_string(common::fixtures().join(arch).join("config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        config[key] = serde_json::json!(u64::MAX);
        let dir = scratch("huge");
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let e = DecoderConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains(key) && e.contains("beyond"),
            "{arch}: {e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
