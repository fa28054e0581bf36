//! The YAML run config: defaults, errors with file:line and the nearest key, overrides.

mod common;

use common::*;
use ember_train::RunConfig;

const MINIMAL: &str = "base_model: m\noutput_dir: out\ndata:\n  train: t.jsonl\n  format: completion\n";

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = RunConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.lora.config.r, 8);
    assert_eq!(c.train.micro_batch_size, 4);
    assert_eq!(c.train.betas, [0.9, 0.999]);
    assert_eq!(c.train.max_grad_norm, Some(1.0));
    assert!(!c.data.train_on_inputs);
    assert!(c.data.shuffle);
}

#[test]
fn unknown_key_names_file_line_and_nearest_key() {
    let dir = tempdir("config-unknown");
    let path = dir.join("run.yaml");
    write(&path, &format!("{MINIMAL}train:\n  lerning_rate: 1e-4\n"));
    let err = RunConfig::load(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("run.yaml:7") && err.contains("lerning_rate") && err.contains("did you mean `learning_rate`"),
        "{err}"
    );

    write(&path, &format!("{MINIMAL}lora:\n  r: 8\n  lora_alhpa: 16\n"));
    let err = RunConfig::load(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("lora_alhpa") && err.contains("did you mean `lora_alpha`"),
        "{err}"
    );
}

#[test]
fn wrong_type_names_line() {
    let dir = tempdir("config-type");
    let path = dir.join("run.yaml");
    write(&path, &format!("{MINIMAL}train:\n  micro_batch_size: four\n"));
    let err = RunConfig::load(&path, &[]).unwrap_err().to_string();
    assert!(err.contains("run.yaml:7") && err.contains("micro_batch_size"), "{err}");
}

#[test]
fn invalid_values_are_named() {
    let err = RunConfig::from_yaml(&format!("{MINIMAL}lora:\n  r: 0\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`r`") && err.contains("at least 1"), "{err}");
    let err = RunConfig::from_yaml(&format!("{MINIMAL}train:\n  warmup_steps: 3\n  warmup_ratio: 0.1\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("warmup"), "{err}");
}

#[test]
fn overrides_apply_and_unknown_override_keys_are_refused() {
    let dir = tempdir("config-set");
    let path = dir.join("run.yaml");
    write(&path, MINIMAL);
    let c = RunConfig::load(
        &path,
        &[
            "train.learning_rate=3e-4".into(),
            "lora.r=16".into(),
            "data.packing=true".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.train.learning_rate, 3e-4);
    assert_eq!(c.lora.config.r, 16);
    assert!(c.data.packing);
    let err = RunConfig::load(&path, &["train.lr=1".into()]).unwrap_err().to_string();
    assert!(err.contains("unknown key `lr`"), "{err}");
    let err = RunConfig::load(&path, &["train.epochs".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("key.path=value"), "{err}");
}

#[test]
fn resolved_config_round_trips() {
    let dir = tempdir("config-save");
    let c = RunConfig::from_yaml(&format!("{MINIMAL}lora:\n  r: 4\n  target_modules: all-linear\n")).unwrap();
    c.save(&dir.join("resolved.yaml")).unwrap();
    let back = RunConfig::load(&dir.join("resolved.yaml"), &[]).unwrap();
    assert_eq!(back, c);
}

/// NaN (`.nan` in YAML) and zero sizes fail validation with the key named, instead of running
/// with a NaN optimizer or a zero-row evaluation batch.
#[test]
fn nan_and_zero_values_are_refused() {
    for (train, key) in [
        ("  eps: .nan\n", "train.eps"),
        ("  weight_decay: .nan\n", "train.eps"),
        ("  max_grad_norm: .nan\n", "train.max_grad_norm"),
        ("  learning_rate: .nan\n", "train.learning_rate"),
        ("  epochs: .nan\n", "train.epochs"),
        ("  epochs: .inf\n", "train.epochs"),
        ("  warmup_ratio: .nan\n", "train.warmup_ratio"),
        ("  eval_batch_size: 0\n", "train.eval_batch_size"),
    ] {
        let err = RunConfig::from_yaml(&format!("{MINIMAL}train:\n{train}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{train}: {err}");
    }
    let err = RunConfig::from_yaml(&format!("{MINIMAL}lora:\n  lora_dropout: .nan\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lora_dropout"), "{err}");
}

#[test]
fn device_and_dtype_parse_and_bad_ones_are_named() {
    use ember_model::BaseDtype;
    use ember_train::config::DeviceKind;
    let c = RunConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!((c.device, c.dtype), (DeviceKind::Cpu, BaseDtype::Float32));
    let c = RunConfig::from_yaml(&format!("{MINIMAL}device: wgpu\ndtype: bf16\n")).unwrap();
    assert_eq!((c.device, c.dtype), (DeviceKind::Wgpu, BaseDtype::Bfloat16));
    let dir = tempdir("config-device");
    let path = dir.join("run.yaml");
    write(&path, &format!("{MINIMAL}dtype: int8\n"));
    let err = RunConfig::load(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("run.yaml") && err.contains("int8") && err.contains("bfloat16"),
        "{err}"
    );
    write(&path, MINIMAL);
    let err = RunConfig::load(&path, &["device=tpu".into()]).unwrap_err().to_string();
    assert!(err.contains("tpu") && err.contains("wgpu"), "{err}");
    let c = RunConfig::load(&path, &["dtype=float16".into(), "device=flex".into()]).unwrap();
    assert_eq!((c.device, c.dtype), (DeviceKind::Flex, BaseDtype::Float16));
}
