//! Property tests on adapters made elsewhere: `adapter_config.json` with odd values and
//! `adapter_model.safetensors` with mutated bytes give an error naming the file, or an
//! adapter whose tensors fit its config; never a panic.

use std::path::{Path, PathBuf};

use ember_lora::{AdapterFiles, LoraConfig};
use proptest::prelude::*;

fn adapter_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama/adapter_trained")
}

fn scratch(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ember-lora-fuzz-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn odd_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::json!(0)),
        Just(serde_json::json!(-4)),
        Just(serde_json::json!(1e300)),
        Just(serde_json::json!(0.5)),
        Just(serde_json::json!(null)),
        Just(serde_json::json!(true)),
        Just(serde_json::json!("(")),
        Just(serde_json::json!("all-linear")),
        Just(serde_json::json!([])),
        Just(serde_json::json!(["q_proj", 3])),
        Just(serde_json::json!({"q_proj": 0})),
        Just(serde_json::json!({"(": 2})),
        Just(serde_json::json!({"q_proj": "x"})),
    ]
}

fn check(dir: &Path) -> Result<(), TestCaseError> {
    match AdapterFiles::read(dir) {
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(
                msg.contains("adapter_config.json") || msg.contains("adapter_model.safetensors"),
                "{msg}"
            );
        }
        Ok(files) => {
            for (module, t) in &files.tensors {
                prop_assert_eq!(t.rank(), files.config.module_lora(module).r);
                prop_assert_eq!(t.lora_a.len(), t.a_shape[0] * t.a_shape[1]);
                prop_assert_eq!(t.lora_b.len(), t.b_shape[0] * t.b_shape[1]);
            }
        }
    }
    Ok(())
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
    #![proptest_config(ProptestConfig { cases: cases(128), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn adapter_config_survives_odd_values(
        changes in prop::collection::vec((prop::sample::select(vec!["r", "lora_alpha", "lora_dropout", "target_modules",
            "exclude_modules", "layers_to_transform", "rank_pattern", "alpha_pattern", "use_rslora", "bias",
            "init_lora_weights", "peft_type", "use_dora", "modules_to_save"]), odd_value()), 1..4),
    ) {
        let text = std::fs::read_to_string(adapter_fixture().join("adapter_config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (key, value) in changes {
            config[key] = value;
        }
        let dir = scratch("config");
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        if let Err(e) = LoraConfig::from_peft_file(&path) {
            prop_assert!(e.to_string().contains("adapter_config.json") || e.to_string().contains("LoRA config"), "{e}");
        }
        std::fs::copy(adapter_fixture().join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
        check(&dir)?;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn adapter_weights_survive_mutations(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        keep in prop::option::of(any::<usize>()),
    ) {
        let good = std::fs::read(adapter_fixture().join("adapter_model.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut bytes = good.clone();
        for (pos, b) in edits {
            // Mostly the header, where the structure is.
            let region = if pos % 4 == 0 { bytes.len() } else { header };
            bytes[(pos / 4) % region] = b;
        }
        if let Some(k) = keep {
            bytes.truncate(k % (bytes.len() + 1));
        }
        let dir = scratch("weights");
        std::fs::copy(adapter_fixture().join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), &bytes).unwrap();
        check(&dir)?;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
