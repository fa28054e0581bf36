//! The `ember` binary end to end on the fixtures.

use std::process::Command;

mod common;
use common::{fixtures, masked_max_diff, read_f32};

fn ember(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ember")).args(args).output().unwrap()
}

/// `ember forward` reproduces transformers' logits (≤ 1e-4 where attention_mask is 1).
#[test]
fn forward_writes_reference_logits() {
    for arch in ["llama", "qwen3"] {
        let dir = fixtures().join(arch);
        let out = std::env::temp_dir().join(format!("ember-cli-{}-{arch}.safetensors", std::process::id()));
        let o = ember(&[
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--inputs",
            dir.join("inputs.json").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (logits, shape) = read_f32(&out, "logits");
        let (expected, eshape) = read_f32(&dir.join("logits.safetensors"), "logits");
        assert_eq!(shape, eshape);
        let worst = masked_max_diff(arch, &logits, &expected, &shape);
        assert!(worst <= 1e-4, "{arch}: max abs diff {worst:.3e}");
    }
}

#[test]
fn inspect_reports_the_architecture() {
    let o = ember(&["inspect", fixtures().join("llama_rope3").to_str().unwrap()]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "architecture:   llama",
        "layers:         2",
        "4 query, 2 key/value, head_dim 16",
        "vocab:          384",
        "tied embeddings: yes",
        "Llama3",
        "dtype:          f32",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = std::env::temp_dir().join(format!("ember-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inputs = dir.join("inputs.json");
    std::fs::write(&inputs, r#"{"input_ids": [[1, 2, 3], [4, 5]]}"#).unwrap();
    let model = fixtures().join("llama");
    let out = dir.join("out.safetensors");
    let o = ember(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("inputs.json") && err.contains("row 1"), "{err}");
    assert!(!out.exists());

    std::fs::write(&inputs, r#"{"input_ids": [[1, 2, 999]]}"#).unwrap();
    let o = ember(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("token id 999"), "{err}");
}

/// `ember merge` then `ember forward` on the merged folder gives PEFT's merged logits, and
/// `ember forward --adapter` gives PEFT's unmerged adapter logits.
#[test]
fn merge_and_forward_with_adapter() {
    let dir = fixtures().join("qwen3");
    let tmp = std::env::temp_dir().join(format!("ember-cli-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let merged = tmp.join("merged");
    let o = ember(&[
        "merge",
        "--base",
        dir.to_str().unwrap(),
        "--adapter",
        dir.join("adapter_trained").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inputs = dir.join("inputs.json");
    let run = |model: &std::path::Path, adapter: Option<&std::path::Path>, out: &std::path::Path| {
        let mut args = vec![
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let o = ember(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_f32(out, "logits").0
    };
    let check = |actual: &[f32], reference: &str| {
        let (expected, shape) = read_f32(&dir.join(reference), "logits");
        let worst = masked_max_diff("qwen3", actual, &expected, &shape);
        assert!(worst <= 1e-4, "{reference}: {worst:.3e}");
    };
    check(
        &run(&merged, None, &tmp.join("m.safetensors")),
        "merged_logits.safetensors",
    );
    check(
        &run(&dir, Some(&dir.join("adapter_trained")), &tmp.join("a.safetensors")),
        "trained_lora_logits.safetensors",
    );

    // A second merge into the same folder is refused and leaves it intact.
    let o = ember(&[
        "merge",
        "--base",
        dir.to_str().unwrap(),
        "--adapter",
        dir.join("adapter_trained").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(merged.join("model.safetensors").exists());

    let o = ember(&["inspect", dir.join("adapter_trained").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("rank r:         4") && text.contains("14 modules"),
        "{text}"
    );
}

/// `--dtype bfloat16` on the CPU runs on burn-flex with a bf16 base (logits move by bf16
/// rounding only); a backend missing from the build or an unknown dtype is a clear error.
#[test]
fn devices_and_dtypes_are_chosen_by_flags() {
    let dir = fixtures().join("llama");
    let out = std::env::temp_dir().join(format!("ember-cli-dtype-{}.safetensors", std::process::id()));
    let inputs = dir.join("inputs.json");
    let forward = |extra: &[&str]| {
        let mut args = vec![
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ember(&args)
    };
    let o = forward(&["--dtype", "bfloat16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (half, _) = read_f32(&out, "logits");
    let (full, _) = read_f32(&dir.join("logits.safetensors"), "logits");
    let worst = half.iter().zip(&full).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst > 0.0 && worst < 0.1, "bf16 vs f32 logits: {worst}");

    let o = forward(&["--dtype", "int8"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("int8") && err.contains("bfloat16"),
        "{err}"
    );
    let o = forward(&["--device", "tpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cpu, flex, cuda or wgpu"), "{err}");
    if !cfg!(feature = "cuda") {
        let o = forward(&["--device", "cuda"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--features cuda"), "{err}");
    }
    if !cfg!(feature = "wgpu") {
        let o = forward(&["--device", "wgpu"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--features wgpu"), "{err}");
    }
    let _ = std::fs::remove_file(&out);
}
