//! Property tests on what users hand the trainer: run configs (YAML, with `--set`) and data
//! files of every format, mutated and truncated. Each must give an error naming the file (and
//! the line or row where there is one) or a valid result, never a panic.

mod common;

use common::*;
use ember_train::config::{BadRows, DataFormat, FieldMap};
use ember_train::data::read_records_for_vocab;
use ember_train::RunConfig;
use proptest::prelude::*;

const CONFIG: &str =
    "base_model: m\noutput_dir: o\nseed: 3\nlora:\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\n\
data:\n  train: t.jsonl\n  format: completion\n  max_seq_len: 32\n  packing: true\n  group_by_length: true\n\
train:\n  max_steps: 6\n  micro_batch_size: 2\n  learning_rate: 0.01\n  warmup_ratio: 0.1\n";

/// Every `--set` key path the resolved config has must be accepted by `--set`: the list of
/// keys is not kept by hand apart from the structs (it once lacked `group_by_length`).
#[test]
fn every_config_key_can_be_set() {
    let config = RunConfig::from_yaml(CONFIG).unwrap();
    let value: serde_yaml::Value = serde_yaml::to_value(&config).unwrap();
    fn paths(prefix: &str, v: &serde_yaml::Value, out: &mut Vec<(String, serde_yaml::Value)>) {
        if let serde_yaml::Value::Mapping(m) = v {
            for (k, v) in m {
                let key = format!("{prefix}{}", k.as_str().unwrap());
                if matches!(v, serde_yaml::Value::Mapping(m) if !m.is_empty()) {
                    paths(&format!("{key}."), v, out);
                } else {
                    out.push((key, v.clone()));
                }
            }
        }
    }
    let mut all = Vec::new();
    paths("", &value, &mut all);
    let dir = tempdir("keys");
    let path = dir.join("run.yaml");
    write(&path, CONFIG);
    for (key, v) in all {
        if v.is_null() || v.is_sequence() || v.is_mapping() {
            continue;
        }
        let text = serde_yaml::to_string(&v).unwrap();
        let assignment = format!("{key}={}", text.trim());
        let loaded = RunConfig::load(&path, std::slice::from_ref(&assignment));
        assert!(loaded.is_ok(), "--set {assignment}: {}", loaded.unwrap_err());
    }
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

    /// Bytes of a valid config replaced or cut: an error with the file name, or a config that
    /// passed validation.
    #[test]
    fn run_config_survives_mutations(
        edits in prop::collection::vec((any::<usize>(), prop::sample::select(vec![b' ', b':', b'-', b'\n', b'[', b'{', b'"', b'0', b'9', b'x', b'.', b'e', b'!', b'&', b'*', 0xFF])), 1..6),
        keep in prop::option::of(any::<usize>()),
    ) {
        let mut bytes = CONFIG.as_bytes().to_vec();
        for (pos, b) in edits {
            let n = bytes.len();
            bytes[pos % n] = b;
        }
        if let Some(k) = keep {
            bytes.truncate(k % (bytes.len() + 1));
        }
        let dir = tempdir("cfg");
        let path = dir.join("run.yaml");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = RunConfig::load(&path, &[]) {
            prop_assert!(e.to_string().contains("run.yaml"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `--set key=value` with any key path and odd values: an error naming the key, or a
    /// validated config.
    #[test]
    fn overrides_survive_odd_values(
        key in prop::sample::select(vec!["train.learning_rate", "train.micro_batch_size", "data.max_seq_len", "lora.r",
            "lora.target_modules", "train.betas", "seed", "data.format", "train", "lora.lora_alpha", "data.val_split",
            "train.warmup_ratio", "train.max_grad_norm", "lora.rank_pattern", "nope", "train.nope", ""]),
        value in prop::sample::select(vec!["0", "-1", "1e309", "nan", ".inf", "[]", "{}", "~", "'", "[1, 2]", "x", "18446744073709551616"]),
    ) {
        let dir = tempdir("set");
        let path = dir.join("run.yaml");
        write(&path, CONFIG);
        if let Err(e) = RunConfig::load(&path, &[format!("{key}={value}")]) {
            let msg = e.to_string();
            prop_assert!(msg.contains("run.yaml") || msg.contains("--set"), "{msg}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Data files of every extension and format, their bytes mutated: an error naming the
    /// file, or records.
    #[test]
    fn data_readers_survive_mutations(
        which in 0usize..4,
        format in prop::sample::select(vec![DataFormat::Completion, DataFormat::Alpaca, DataFormat::Chat, DataFormat::Tokens]),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        keep in prop::option::of(any::<usize>()),
        skip in any::<bool>(),
    ) {
        let spam = fixtures().join("../../datasets/spam");
        let (source, ext) = [
            (spam.join("test.chat.jsonl"), "jsonl"),
            (spam.join("test.alpaca.jsonl"), "json"),
            (spam.join("test.csv"), "csv"),
            (spam.join("test.parquet"), "parquet"),
        ][which].clone();
        let good = std::fs::read(&source).unwrap();
        // The first rows are enough and keep each case fast.
        let mut bytes = good[..good.len().min(20_000)].to_vec();
        if ext == "parquet" {
            bytes = good.clone();
        }
        for (pos, b) in edits {
            let n = bytes.len();
            bytes[pos % n] = b;
        }
        if let Some(k) = keep {
            bytes.truncate(k % (bytes.len() + 1));
        }
        let dir = tempdir("data");
        let path = dir.join(format!("rows.{ext}"));
        std::fs::write(&path, &bytes).unwrap();
        let bad_rows = if skip { BadRows::Skip } else { BadRows::Error };
        if let Err(e) = read_records_for_vocab(&path, format, &FieldMap::default(), bad_rows, Some(384)) {
            prop_assert!(e.to_string().contains("rows."), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
