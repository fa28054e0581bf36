//! The `ember` binary end to end on the fixtures.

use std::process::Command;

mod common;
use common::{fixtures, masked_max_diff, read_f32};

fn ember(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ember")).args(args).output().unwrap()
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// `ember merge --base BASE --adapter ADAPTER --out OUT`.
fn merge(base: &std::path::Path, adapter: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    ember(&[
        "merge",
        "--base",
        path(base),
        "--adapter",
        path(adapter),
        "--out",
        path(out),
    ])
}

/// `ember forward --model MODEL --inputs INPUTS --out OUT [--adapter ADAPTER]`.
fn forward(
    model: &std::path::Path,
    inputs: &std::path::Path,
    out: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> std::process::Output {
    let mut args = vec![
        "forward",
        "--model",
        path(model),
        "--inputs",
        path(inputs),
        "--out",
        path(out),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", path(a)]);
    }
    ember(&args)
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
    let o = merge(&dir, &dir.join("adapter_trained"), &merged);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inputs = dir.join("inputs.json");
    let run = |model: &std::path::Path, adapter: Option<&std::path::Path>, out: &std::path::Path| {
        let o = forward(model, &inputs, out, adapter);
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
    let o = merge(&dir, &dir.join("adapter_trained"), &merged);
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

/// QLoRA end to end on `llama_q.gguf` (the llama fixture as a Q8_0/Q4_0 GGUF): `forward`,
/// `train` (YAML `base_dtype`) and `eval` with the blocks kept (`gguf`) match the same file
/// dequantized (`float32`); `merge --base x.gguf` folds the adapter into the dequantized base,
/// giving the adapted model's logits. On the HF fixture, `--base-dtype q8_0|q4_0|nf4` quantize
/// on load: the logits move, least with 8 bits.
#[test]
fn quantized_bases_forward_train_and_merge() {
    let tmp = std::env::temp_dir().join(format!("ember-cli-qlora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let gguf = tmp.join("llama_q.gguf");
    std::fs::copy(fixtures().join("gguf_arch/llama_q.gguf"), &gguf).unwrap();
    // The fixtures' tokenizer beside the .gguf (which carries none), as a user would put it.
    common::model_folder("gguf_arch", &tmp, common::CHATML);
    let inputs = fixtures().join("llama/inputs.json");
    let forward = |model: &std::path::Path, extra: &[&str], name: &str| {
        let out = tmp.join(format!("{name}.safetensors"));
        let mut args = vec![
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = ember(&args);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        read_f32(&out, "logits")
    };
    let (dense, shape) = forward(&gguf, &["--base-dtype", "float32"], "dense");
    let (blocks, _) = forward(&gguf, &["--base-dtype", "gguf"], "blocks");
    let worst = masked_max_diff("llama", &blocks, &dense, &shape);
    assert!(worst <= 1e-4, "gguf vs float32 logits: {worst:.3e}");

    // Quantized on load from the HF folder.
    let hf = fixtures().join("llama");
    let (reference, _) = read_f32(&hf.join("logits.safetensors"), "logits");
    let moved = |dtype: &str| {
        let (q, _) = forward(&hf, &["--base-dtype", dtype], dtype);
        masked_max_diff("llama", &q, &reference, &shape)
    };
    let (q8, q4, nf4) = (moved("q8_0"), moved("q4_0"), moved("nf4"));
    println!("logits moved by q8_0 {q8:.3e}, q4_0 {q4:.3e}, nf4 {nf4:.3e}");
    assert!(q8 > 0.0 && q8 < q4 && q8 < nf4, "q8_0 {q8}, q4_0 {q4}, nf4 {nf4}");
    let o = ember(&[
        "forward",
        "--model",
        hf.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        tmp.join("x.safetensors").to_str().unwrap(),
        "--base-dtype",
        "gguf",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("q4_0"), "{err}");

    // Five steps from the same adapter, blocks kept vs dequantized.
    let data = tmp.join("train.jsonl");
    let rows: String = (0..8)
        .map(|i| {
            let answer = if i % 2 == 0 { "spam" } else { "ham" };
            serde_json::json!({"messages": [{"role": "user", "content": format!("mail {i}")}, {"role": "assistant", "content": answer}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let mut traces = Vec::new();
    for dtype in ["gguf", "float32"] {
        let output_dir = tmp.join(format!("run-{dtype}"));
        let config = tmp.join(format!("{dtype}.yaml"));
        std::fs::write(
            &config,
            format!(
                "base_model: {}\nbase_dtype: {dtype}\noutput_dir: {}\nlora:\n  init_from: {}\n\
                 data:\n  train: {}\n  format: chat\n  max_seq_len: 128\n\
                 train:\n  max_steps: 5\n  micro_batch_size: 4\n  learning_rate: 0.01\n  warmup_steps: 0\n  log_every: 1\n",
                gguf.display(),
                output_dir.display(),
                hf.join("adapter_random_b").display(),
                data.display()
            ),
        )
        .unwrap();
        let o = ember(&["train", config.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "train {dtype}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let losses: Vec<f64> = std::fs::read_to_string(output_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
            .collect();
        assert_eq!(losses.len(), 5, "{dtype}: five logged steps");
        traces.push(losses);
    }
    for (step, (q, d)) in traces[0].iter().zip(&traces[1]).enumerate() {
        let rel = (q - d).abs() / d.abs();
        assert!(rel <= 1e-4, "step {step}: gguf {q} vs float32 {d} (rel {rel:.2e})");
    }

    // The trained adapter merged into the dequantized GGUF base gives the adapted logits.
    let adapter = tmp.join("run-gguf/adapter");
    let merged = tmp.join("merged");
    let o = ember(&[
        "merge",
        "--base",
        gguf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(merged.join("config.json").exists() && merged.join("tokenizer.json").exists());
    assert!(
        !tmp.join(".merged.base-from-gguf").exists(),
        "the dequantized copy is removed"
    );
    let (adapted, _) = forward(
        &gguf,
        &["--base-dtype", "gguf", "--adapter", adapter.to_str().unwrap()],
        "adapted",
    );
    let (merged_logits, _) = forward(&merged, &[], "merged");
    assert!(
        masked_max_diff("llama", &adapted, &blocks, &shape) > 1e-3,
        "the adapter changes the logits"
    );
    let worst = masked_max_diff("llama", &merged_logits, &adapted, &shape);
    assert!(worst <= 1e-4, "merged vs adapter logits: {worst:.3e}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `ember inspect` describes each 2026 family by its row of the family table, and a multimodal
/// wrapper by what it loads and what it leaves out.
#[test]
fn inspect_describes_new_families_and_wrappers() {
    let inspect = |arch: &str| {
        let o = ember(&["inspect", fixtures().join(arch).to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for (arch, needles) in [
        (
            "olmo3",
            &["architecture:   olmo3 (OLMo 2", "1× window 8, 1× global"][..],
        ),
        ("smollm3", &["architecture:   smollm3", "no rope:        layers 1"][..]),
        (
            "ministral3",
            &["architecture:   ministral3", "query scale:    LogPosition"][..],
        ),
        (
            "llama4",
            &[
                "architecture:   llama4_text",
                "chunk 8",
                "no rope:        layers 1",
                "Temperature",
                "experts:",
                "expert LoRA:    target_parameters `feed_forward.experts.gate_up_proj`",
                "router `feed_forward.router.weight`",
            ][..],
        ),
        (
            "ministral3_wrapped",
            &[
                "architecture:   ministral3",
                "wrapper:        mistral3 (multimodal); text decoder under `language_model.model`",
                "ignored:      vision_tower (",
                "ignored:      multi_modal_projector (",
            ][..],
        ),
        (
            "gemma3_wrapped",
            &[
                "architecture:   gemma3_text",
                "wrapper:        gemma3",
                "ignored:      vision_tower (",
            ][..],
        ),
        (
            "gemma4_wrapped",
            &[
                "architecture:   gemma4_text",
                "wrapper:        gemma4 (multimodal); text decoder under `model.language_model`",
                "ignored:      model.vision_tower (",
                "ignored:      model.embed_vision (",
                "per layer:      1× as above, 1× head_dim 32, 1 key/value, keys as values, \
                 1× keys/values of layer 0, intermediate 256, 1× head_dim 32, 1 key/value, keys/values of layer 1, \
                 intermediate 256",
                "value norm:",
                "per-layer inputs: 8 per layer",
            ][..],
        ),
        (
            "deepseek_v3",
            &[
                "architecture:   deepseek_v3",
                "latent attention: query rank 32, key/value latent 16 (cached), per head 16 + 8 RoPE",
                "GroupLimited { scores: Sigmoid",
            ][..],
        ),
        (
            "mistral4",
            &[
                "architecture:   mistral4",
                "GroupLimited { scores: Softmax, groups: 4, top_groups: 2",
            ][..],
        ),
        (
            "qwen3_5",
            &[
                "architecture:   qwen3_5_text",
                "per layer:      3× linear attention, 1× as above",
                "linear attention: Gated DeltaNet on 3 of 4 layers: 2 query/key heads of 8, 4 value heads of 12, \
                 4-tap causal convolution",
                "output gate:",
            ][..],
        ),
        (
            "glm_moe_dsa",
            &[
                "architecture:   glm_moe_dsa",
                "ignored:      sparse-attention indexers (every key kept up to 32 positions) (5 tensors",
                "max positions (exact): 32",
            ][..],
        ),
        (
            "glm4_moe",
            &[
                "architecture:   glm4_moe",
                "GroupLimited { scores: Sigmoid, groups: 4, top_groups: 2",
                "(1 of 2 layers sparse",
            ][..],
        ),
        (
            "gemma4_moe",
            &["architecture:   gemma4_text", "top 2", "beside the dense MLP"][..],
        ),
        (
            "gemma4_unified_wrapped",
            &[
                "architecture:   gemma4_unified_text",
                "wrapper:        gemma4_unified",
                "ignored:      model.vision_embedder (",
            ][..],
        ),
    ] {
        let text = inspect(arch);
        for needle in needles {
            assert!(text.contains(needle), "{arch}: missing {needle:?} in\n{text}");
        }
    }
}

/// A wrapper checkpoint (older `language_model.model.*` layout) merges a PEFT adapter (named
/// `model.language_model.*`) into the same layout, and the merged folder gives PEFT's merged
/// logits (left-padded inputs with explicit positions); LoRA on the vision tower is refused.
#[test]
fn wrapper_merge_and_vision_lora_refusal() {
    let arch = "ministral3_wrapped";
    let dir = fixtures().join(arch);
    let inputs = dir.join("inputs.json");
    let tmp = std::env::temp_dir().join(format!("ember-cli-wrapper-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let merged = tmp.join("merged");
    let o = merge(&dir, &dir.join("adapter_trained"), &merged);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.join("logits.safetensors");
    let o = forward(&merged, &inputs, &out, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (logits, shape) = read_f32(&out, "logits");
    let (expected, _) = read_f32(&dir.join("merged_logits.safetensors"), "logits");
    let worst = masked_max_diff(arch, &logits, &expected, &shape);
    assert!(worst <= 1e-4, "merged wrapper: {worst:.3e}");

    // The same adapter with one module moved onto the vision tower.
    let vision = tmp.join("vision_adapter");
    std::fs::create_dir_all(&vision).unwrap();
    std::fs::copy(
        dir.join("adapter_trained/adapter_config.json"),
        vision.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(dir.join("adapter_trained/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let k = k.replace(
                "model.language_model.layers.0.self_attn.q_proj",
                "model.vision_tower.transformer.layers.0.attention.q_proj",
            );
            (k, v)
        })
        .collect();
    safetensors::serialize_to_file(renamed, None, &vision.join("adapter_model.safetensors")).unwrap();
    let target = tmp.join("refused");
    for o in [
        merge(&dir, &vision, &target),
        forward(&dir, &inputs, &target, Some(&vision)),
    ] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a vision-tower adapter was accepted");
        assert!(
            err.contains("model.vision_tower.transformer.layers.0.attention.q_proj") && err.contains("text decoder"),
            "{err}"
        );
        assert!(!target.exists(), "nothing is written");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
