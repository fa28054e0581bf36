//! `ember forward|train|eval|generate --device wgpu|cuda` reproduce the CPU results on the fixtures.
//!
//! Built only with `--features wgpu` or `--features cuda`; CI runs it on Mesa's software Vulkan
//! driver (lavapipe), which compiles the same cubecl kernels CUDA runs through another compiler,
//! so an op that is missing or wrong on GPU backends fails here without a GPU:
//!
//! ```sh
//! VK_DRIVER_FILES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json cargo test -p ember-cli --features wgpu --test devices
//! cargo test --release -p ember-cli --features cuda --test devices   # on an NVIDIA GPU
//! ```
//! With both features, `EMBER_TEST_GPU=cuda|wgpu` picks the device (wgpu otherwise).
//! Tolerances: logits 1e-4 absolute against transformers, the 5-step training trace 1e-4
//! relative against the CPU run, greedy tokens equal; a bf16 base (CUDA only: lavapipe has no
//! bf16) within transformers' own bf16 rounding of the same model.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{fixtures, masked_max_diff, model_folder, read_f32, CHATML};

/// The GPU device under test: `EMBER_TEST_GPU` where set, else the one feature built in
/// (wgpu where both are).
fn gpu() -> &'static str {
    match std::env::var("EMBER_TEST_GPU").as_deref() {
        Ok("cuda") => "cuda",
        Ok("wgpu") => "wgpu",
        Ok(other) => panic!("EMBER_TEST_GPU={other}: expected cuda or wgpu"),
        Err(_) if cfg!(feature = "wgpu") => "wgpu",
        Err(_) => "cuda",
    }
}

/// Every fixture family with PEFT adapters (the folders holding `adapter_random_b/`).
fn families() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("adapter_random_b").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    assert!(out.len() >= 13, "fixture families: {out:?}");
    out
}

fn ember(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_ember")).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ember {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-devices-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `arch` fixture with the fixtures' tokenizer, in `dir`.
fn with_tokenizer(arch: &str, dir: &Path) -> PathBuf {
    model_folder(arch, &dir.join(format!("{arch}-model")), CHATML)
}

/// Base logits and PEFT LoRA logits of every family on the GPU, against transformers.
#[test]
fn forward_on_the_gpu_matches_transformers_on_every_family() {
    let out = tmp("forward");
    for arch in families() {
        let arch = arch.as_str();
        let dir = fixtures().join(arch);
        for (adapter, reference) in [
            (None, "logits.safetensors"),
            (Some("adapter_random_b"), "lora_logits.safetensors"),
        ] {
            let file = out.join(format!("{arch}.safetensors"));
            let mut args = vec![
                "forward".to_string(),
                "--device".into(),
                gpu().into(),
                "--model".into(),
                dir.display().to_string(),
                "--inputs".into(),
                dir.join("inputs.json").display().to_string(),
                "--out".into(),
                file.display().to_string(),
            ];
            if let Some(a) = adapter {
                args.extend(["--adapter".into(), dir.join(a).display().to_string()]);
            }
            ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let (logits, shape) = read_f32(&file, "logits");
            let (expected, expected_shape) = read_f32(&dir.join(reference), "logits");
            assert_eq!(shape, expected_shape, "{arch}");
            let diff = masked_max_diff(arch, &logits, &expected, &shape);
            println!("{arch} {reference} on {}: {diff:.3e}", gpu());
            assert!(diff <= 1e-4, "{arch} {reference} on {}: max abs diff {diff:.3e}", gpu());
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The losses `ember train` logs in metrics.jsonl.
fn losses(output_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

/// Five AdamW steps from the same YAML and the same starting adapter (a fresh one would be
/// drawn from each backend's own RNG) on cpu and the GPU (a dense model, a tied one with biases,
/// a MoE), checkpointed on the GPU: the same per-step losses within 1e-4 relative and
/// adapters that give the same logits; `eval` reports the same loss and accuracy.
#[test]
fn train_and_eval_on_the_gpu_reproduce_the_cpu_run() {
    let work = tmp("train");
    let data = work.join("train.jsonl");
    let rows: String = (0..8)
        .map(|i| {
            let answer = if i % 2 == 0 { "spam" } else { "ham" };
            serde_json::json!({"messages": [{"role": "user", "content": format!("mail {i}")}, {"role": "assistant", "content": answer}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    for arch in ["llama", "qwen2", "mixtral"] {
        let model = with_tokenizer(arch, &work);
        let mut runs = Vec::new();
        for (device, checkpointing) in [("cpu", false), (gpu(), true)] {
            let output_dir = work.join(format!("{arch}-{device}"));
            let config = work.join(format!("{arch}-{device}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "base_model: {}\noutput_dir: {}\ndevice: {device}\nlora:\n  init_from: {}\n\
                     data:\n  train: {}\n  format: chat\n  max_seq_len: 128\n\
                     train:\n  max_steps: 5\n  micro_batch_size: 4\n  learning_rate: 0.01\n  warmup_steps: 0\n  log_every: 1\n  gradient_checkpointing: {checkpointing}\n",
                    model.display(),
                    output_dir.display(),
                    fixtures().join(arch).join("adapter_random_b").display(),
                    data.display()
                ),
            )
            .unwrap();
            ember(&["train", config.to_str().unwrap()]);
            let eval = ember(&[
                "eval",
                "--device",
                device,
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                output_dir.join("adapter").to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--format",
                "chat",
                "--out",
                output_dir.to_str().unwrap(),
            ]);
            assert!(!eval.is_empty());
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(output_dir.join("eval_report.json")).unwrap()).unwrap();
            runs.push((losses(&output_dir), report, output_dir));
        }
        let (cpu, on_gpu) = (&runs[0], &runs[1]);
        assert_eq!(cpu.0.len(), 5, "{arch}: five logged steps");
        for (step, (c, g)) in cpu.0.iter().zip(&on_gpu.0).enumerate() {
            let rel = (c - g).abs() / c.abs();
            println!("{arch} step {step}: cpu {c:.6} {} {g:.6} (rel {rel:.2e})", gpu());
            assert!(rel <= 1e-4, "{arch} step {step}: cpu {c} vs {} {g}", gpu());
        }
        for (c, g) in cpu.1["models"]
            .as_array()
            .unwrap()
            .iter()
            .zip(on_gpu.1["models"].as_array().unwrap())
        {
            let (lc, lg) = (c["loss"]["loss"].as_f64().unwrap(), g["loss"]["loss"].as_f64().unwrap());
            assert!(
                (lc - lg).abs() / lc <= 1e-4,
                "{arch} eval loss: cpu {lc} vs {} {lg}",
                gpu()
            );
            assert_eq!(
                c["classification"]["accuracy"], g["classification"]["accuracy"],
                "{arch} eval accuracy"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Greedy generation on the GPU gives transformers' tokens (llama, base and adapter_trained).
#[test]
fn greedy_generation_on_the_gpu_matches_transformers() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("llama/expected.json")).unwrap()).unwrap();
    let g = &expected["generation"];
    let prompt: Vec<String> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let work = tmp("generate");
    let model = with_tokenizer("llama", &work);
    let dir = fixtures().join("llama");
    for (adapter, key) in [
        (None, "base_new_tokens"),
        (Some("adapter_trained"), "trained_adapter_new_tokens"),
    ] {
        let mut args = vec![
            "generate".to_string(),
            "--device".into(),
            gpu().into(),
            "--model".into(),
            model.display().to_string(),
            "--input-ids".into(),
            prompt.join(","),
            "--max-new-tokens".into(),
            "10".into(),
            "--json".into(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".into(), dir.join(a).display().to_string()]);
        }
        let out = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(json["generated_ids"], g[key], "{key}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// A quantized frozen base on the GPU (codes on the device, dequantized per call by Ember's op):
/// `forward` of `llama_q.gguf` with its blocks kept and of the HF llama fixture quantized on
/// load (q4_0, nf4) give the CPU's logits, and three `train` steps give the CPU's losses (the
/// backward pass runs the input-gradient op), 1e-4 relative.
#[test]
fn quantized_bases_on_the_gpu_reproduce_the_cpu() {
    let work = tmp("quantized");
    let gguf = work.join("llama_q.gguf");
    std::fs::copy(fixtures().join("gguf_arch/llama_q.gguf"), &gguf).unwrap();
    model_folder("gguf_arch", &work, CHATML); // the tokenizer beside the .gguf
    let hf = fixtures().join("llama");
    let inputs = hf.join("inputs.json");
    let forward = |model: &Path, dtype: &str, device: &str| {
        let file = work.join(format!("{dtype}-{device}.safetensors"));
        ember(&[
            "forward",
            "--device",
            device,
            "--base-dtype",
            dtype,
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ]);
        read_f32(&file, "logits")
    };
    for (model, dtype) in [(&gguf, "gguf"), (&hf, "q4_0"), (&hf, "nf4")] {
        let (cpu, shape) = forward(model, dtype, "cpu");
        let (on_gpu, _) = forward(model, dtype, gpu());
        let diff = masked_max_diff("llama", &on_gpu, &cpu, &shape);
        println!("{dtype} logits, {} vs cpu: {diff:.3e}", gpu());
        assert!(diff <= 1e-4, "{dtype} logits, {} vs cpu: {diff:.3e}", gpu());
    }
    let data = work.join("train.jsonl");
    let rows: String = (0..4)
        .map(|i| {
            serde_json::json!({"messages": [{"role": "user", "content": format!("mail {i}")}, {"role": "assistant", "content": "spam"}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let mut traces = Vec::new();
    for device in ["cpu", gpu()] {
        let output_dir = work.join(format!("run-{device}"));
        let config = work.join(format!("{device}.yaml"));
        std::fs::write(
            &config,
            format!(
                "base_model: {}\nbase_dtype: gguf\ndevice: {device}\noutput_dir: {}\nlora:\n  init_from: {}\n\
                 data:\n  train: {}\n  format: chat\n  max_seq_len: 64\n\
                 train:\n  max_steps: 3\n  micro_batch_size: 4\n  learning_rate: 0.01\n  warmup_steps: 0\n  log_every: 1\n",
                gguf.display(),
                output_dir.display(),
                hf.join("adapter_random_b").display(),
                data.display()
            ),
        )
        .unwrap();
        ember(&["train", config.to_str().unwrap()]);
        traces.push(losses(&output_dir));
    }
    assert_eq!(traces[0].len(), 3, "three logged steps");
    for (step, (c, g)) in traces[0].iter().zip(&traces[1]).enumerate() {
        let rel = (c - g).abs() / c.abs();
        println!("gguf step {step}: cpu {c:.6} {} {g:.6} (rel {rel:.2e})", gpu());
        assert!(rel <= 1e-4, "gguf step {step}: cpu {c} vs {} {g}", gpu());
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// A bf16 frozen base on CUDA (cubecl does not promote mixed dtypes: an f32 op reading a bf16
/// operand would read garbage, so every cast is Ember's own): `forward` of the `llama/bf16`
/// fixture, base and with PEFT's adapter, sits within transformers' own bf16 rounding of the
/// f32-compute logits (the bound `tests/dtype.rs` holds burn-flex to on the CPU); five training
/// steps on the bf16 base give the CPU's bf16 losses (burn-flex) within 1e-3 relative.
#[cfg(feature = "cuda")]
#[test]
fn bf16_bases_on_cuda_stay_within_transformers_bf16_rounding() {
    let work = tmp("bf16");
    let dir = fixtures().join("llama");
    let reference_file = dir.join("logits_bf16.safetensors");
    let (f32_compute, shape) = read_f32(&reference_file, "logits_bf16_weights_f32_compute");
    let (bf16_compute, _) = read_f32(&reference_file, "logits_bf16_compute");
    let bound = masked_max_diff("llama", &bf16_compute, &f32_compute, &shape);
    assert!(bound > 1e-3, "the reference should show bf16 rounding");
    let (lora_expected, _) = read_f32(&dir.join("lora_logits.safetensors"), "logits");
    for (adapter, expected) in [(None, &f32_compute), (Some("adapter_random_b"), &lora_expected)] {
        let file = work.join("bf16.safetensors");
        let model = dir.join("bf16");
        let inputs = dir.join("inputs.json");
        let mut args = vec![
            "forward",
            "--device",
            "cuda",
            "--base-dtype",
            "bfloat16",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ];
        let adapter_dir = adapter.map(|a| dir.join(a));
        if let Some(a) = &adapter_dir {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        ember(&args);
        let (logits, got_shape) = read_f32(&file, "logits");
        assert_eq!(got_shape, shape);
        let diff = masked_max_diff("llama", &logits, expected, &shape);
        println!("bf16 base on cuda, adapter {adapter:?}: {diff:.3e} (transformers' bf16 rounding {bound:.3e})");
        assert!(diff > 0.0, "the bf16 matmuls should round");
        assert!(diff <= bound, "adapter {adapter:?}: {diff:.3e} > {bound:.3e}");
    }
    let model = with_tokenizer("llama", &work);
    let data = work.join("train.jsonl");
    let rows: String = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [{"role": "user", "content": format!("mail {i}")}, {"role": "assistant", "content": "ham"}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let mut traces = Vec::new();
    for device in ["cpu", "cuda"] {
        let output_dir = work.join(format!("run-{device}"));
        let config = work.join(format!("{device}.yaml"));
        std::fs::write(
            &config,
            format!(
                "base_model: {}\nbase_dtype: bfloat16\ndevice: {device}\noutput_dir: {}\nlora:\n  init_from: {}\n\
                 data:\n  train: {}\n  format: chat\n  max_seq_len: 128\n\
                 train:\n  max_steps: 5\n  micro_batch_size: 4\n  learning_rate: 0.01\n  warmup_steps: 0\n  log_every: 1\n",
                model.display(),
                output_dir.display(),
                dir.join("adapter_random_b").display(),
                data.display()
            ),
        )
        .unwrap();
        ember(&["train", config.to_str().unwrap()]);
        traces.push(losses(&output_dir));
    }
    assert_eq!(traces[0].len(), 5, "five logged steps");
    for (step, (c, g)) in traces[0].iter().zip(&traces[1]).enumerate() {
        let rel = (c - g).abs() / c.abs();
        println!("bf16 step {step}: cpu {c:.6} cuda {g:.6} (rel {rel:.2e})");
        assert!(rel <= 1e-3, "bf16 step {step}: cpu {c} vs cuda {g}");
    }
    let _ = std::fs::remove_dir_all(&work);
}
