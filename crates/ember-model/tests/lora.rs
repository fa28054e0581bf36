//! LoRA against PEFT 0.21.2: adapters loaded into Ember give PEFT's logits, merging gives
//! PEFT's merged weights, and the LoRA invariants hold.
//!
//! References in `tests/fixtures/<arch>/` come from `../shared/fixtures/_generator/gen_fixtures.py`
//! (`adapter_random_b` → `lora_logits`, `adapter_trained` → `trained_lora_logits`,
//! `merge_and_unload()` → `merged/`, `merged_logits`). Tolerances: logits 1e-4, merged weights 1e-6.

mod common;

use common::*;
use ember_lora::merge::MergeDtype;
use ember_lora::{AdapterFiles, LoraConfig, TargetModules};
use ember_model::lora::merge_checkpoint;
use ember_model::{CausalLm, Weights};

fn model(arch: &str) -> CausalLm<TestBackend> {
    CausalLm::from_dir(&fixtures().join(arch), &Default::default()).unwrap()
}

fn logits(model: &CausalLm<TestBackend>, inputs: &Inputs) -> Vec<f32> {
    model
        .forward(inputs.to_model_input())
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn compare(arch: &str, what: &str, actual: &[f32], reference_file: &str, inputs: &Inputs) {
    let (expected, shape) = reference(&fixtures().join(arch).join(reference_file), "logits");
    assert_close(
        &format!("{arch} {what}"),
        masked_max_diff(actual, &expected, &shape, &inputs.attention_mask),
        1e-4,
    );
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn peft_adapters_give_peft_logits() {
    let device = Default::default();
    for arch in families() {
        let arch = arch.as_str();
        let inputs = Inputs::read(arch);
        for (adapter, reference_file) in [
            ("adapter_random_b", "lora_logits.safetensors"),
            ("adapter_trained", "trained_lora_logits.safetensors"),
        ] {
            let mut m = model(arch);
            let files = AdapterFiles::read(&fixtures().join(arch).join(adapter)).unwrap();
            let report = m.load_adapter(&files, &device).unwrap();
            assert!(!files.tensors.is_empty());
            // Every tensor attached: written back, the adapter has the same keys (a stacked expert
            // parameter is reported once, by its parameter path, and filed under its module).
            let written = m.adapter_files(&files.config, None);
            assert_eq!(
                written.tensors.keys().collect::<Vec<_>>(),
                files.tensors.keys().collect::<Vec<_>>(),
                "{arch}: every adapter tensor attached"
            );
            assert_eq!(
                written.config.target_parameters, files.config.target_parameters,
                "{arch}"
            );
            assert!(
                report.targets.len() <= files.tensors.len(),
                "{arch}: {:?}",
                report.targets
            );
            compare(arch, adapter, &logits(&m, &inputs), reference_file, &inputs);

            if adapter == "adapter_trained" {
                // In-memory merge gives PEFT's merged logits; unmerge restores the unmerged ones.
                m.merge_adapters().unwrap();
                compare(
                    arch,
                    "merged in memory",
                    &logits(&m, &inputs),
                    "merged_logits.safetensors",
                    &inputs,
                );
                m.unmerge_adapters();
                compare(arch, "unmerged again", &logits(&m, &inputs), reference_file, &inputs);
            }
        }
    }
}

/// PEFT's `all-linear` on GLM-5 adapts the sparse-attention indexers (`wq_b`, `wk`,
/// `weights_proj`), which Ember does not run: at these lengths the indexer keeps every key, so
/// those pairs cannot change the logits (the generator measured 0.0 with them zeroed, and PEFT
/// gives them no gradient). They load, are reported, and are written back bit for bit.
#[test]
fn glm5_all_linear_adapter_keeps_indexer_pairs_unchanged() {
    let arch = "glm_moe_dsa";
    let inputs = Inputs::read(arch);
    let mut m = model(arch);
    let files = AdapterFiles::read(&fixtures().join(arch).join("adapter_all_linear")).unwrap();
    let report = m.load_adapter(&files, &Default::default()).unwrap();
    let indexer_paths: Vec<&String> = files.tensors.keys().filter(|p| p.contains(".indexer.")).collect();
    assert_eq!(indexer_paths.len(), 3, "the fixture adapts wq_b, wk and weights_proj");
    let (why, kept) = report.kept_unchanged.clone().expect("indexer pairs reported");
    assert_eq!(kept.iter().collect::<Vec<_>>(), indexer_paths);
    assert!(why.contains("every key kept up to 32 positions"), "{why}");
    assert!(
        report
            .to_string()
            .contains("3 adapted modules on sparse-attention indexers"),
        "{report}"
    );
    compare(
        arch,
        "all-linear adapter",
        &logits(&m, &inputs),
        "all_linear_lora_logits.safetensors",
        &inputs,
    );
    let written = m.adapter_files(&files.config, None);
    assert_eq!(
        written.tensors.keys().collect::<Vec<_>>(),
        files.tensors.keys().collect::<Vec<_>>()
    );
    for path in indexer_paths {
        assert_eq!(
            written.tensors[path], files.tensors[path],
            "{path} written back unchanged"
        );
    }
    // `ember merge` folds them into the indexer weights as PEFT's merge_and_unload does.
    let out = tempdir("merged-glm5-all-linear");
    merge_checkpoint(&fixtures().join(arch), &files, &out, MergeDtype::Same).unwrap();
    let ours = Weights::open_dir(&out).unwrap();
    let reference_file = fixtures().join(arch).join("all_linear_merged_indexers.safetensors");
    let theirs = Weights::open_files(reference_file.parent().unwrap(), std::slice::from_ref(&reference_file)).unwrap();
    assert_eq!(theirs.keys().count(), 3);
    for key in theirs.keys() {
        let (shape, _) = theirs.info(key).unwrap();
        let (a, b) = (
            ours.read_f32(key, &shape).unwrap(),
            theirs.read_f32(key, &shape).unwrap(),
        );
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "merged {key} differs from PEFT's by {worst:.3e}");
    }
    let merged = CausalLm::<TestBackend>::from_dir(&out, &Default::default()).unwrap();
    compare(
        arch,
        "all-linear merged checkpoint",
        &logits(&merged, &inputs),
        "all_linear_lora_logits.safetensors",
        &inputs,
    );
    std::fs::remove_dir_all(&out).unwrap();
    // Removing the adapters drops them.
    m.remove_adapters();
    assert!(m.indexer_adapters.is_empty() && m.adapter_files(&files.config, None).tensors.is_empty());
}

#[test]
fn streaming_merge_reproduces_peft_merged_checkpoint() {
    for arch in families() {
        let arch = arch.as_str();
        let dir = fixtures().join(arch);
        let files = AdapterFiles::read(&dir.join("adapter_trained")).unwrap();
        let out = tempdir(&format!("merged-{arch}"));
        let report = merge_checkpoint(&dir, &files, &out, MergeDtype::Same).unwrap();
        // Exactly the weights PEFT's merge changed (a stacked expert adapter changes one
        // tensor per expert and projection in the hub layout, or the stacked tensor).
        let mut merged = report.merged.clone();
        merged.sort();
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let changed: Vec<String> = expected["merge"]["changed_tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        assert_eq!(merged, changed, "{arch}: merged tensors");
        let ours = Weights::open_dir(&out).unwrap();
        let theirs = Weights::open_dir(&dir.join("merged")).unwrap();
        let our_keys: Vec<&String> = ours.keys().collect();
        let their_keys: Vec<&String> = theirs.keys().collect();
        assert_eq!(our_keys, their_keys, "{arch}: merged key sets differ");
        let mut worst = (0.0f32, String::new());
        for key in theirs.keys() {
            let (shape, _) = theirs.info(key).unwrap();
            let a = ours.read_f32(key, &shape).unwrap();
            let b = theirs.read_f32(key, &shape).unwrap();
            for (x, y) in a.iter().zip(&b) {
                if (x - y).abs() > worst.0 {
                    worst = ((x - y).abs(), key.clone());
                }
            }
        }
        println!("{arch}: merged weights max abs diff {:.3e} in {}", worst.0, worst.1);
        assert!(
            worst.0 <= 1e-6,
            "{arch}: merged weight {} differs by {:.3e}",
            worst.1,
            worst.0
        );
        for f in ["config.json", "generation_config.json"] {
            assert!(out.join(f).exists(), "{arch}: {f} not copied");
        }
        let inputs = Inputs::read(arch);
        let merged = CausalLm::<TestBackend>::from_dir(&out, &Default::default()).unwrap();
        compare(
            arch,
            "merged checkpoint",
            &logits(&merged, &inputs),
            "merged_logits.safetensors",
            &inputs,
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn merge_refuses_misfits_and_existing_output() {
    let dir = fixtures().join("llama");
    let mut files = AdapterFiles::read(&dir.join("adapter_trained")).unwrap();
    let out = tempdir("misfit");
    // An adapter for another model: qwen3's head_dim is 32, so its k_proj delta is [64, 64]
    // where llama's k_proj is [32, 64].
    let qwen3 = AdapterFiles::read(&fixtures().join("qwen3/adapter_trained")).unwrap();
    let err = merge_checkpoint(&dir, &qwen3, &out, MergeDtype::Same)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("k_proj.weight") && err.contains("[32, 64]") && err.contains("[64, 64]"),
        "{err}"
    );
    assert!(!out.exists(), "a refused merge must not create the output");
    // NaN in the adapter is refused, and nothing is left behind.
    files.tensors.values_mut().next().unwrap().lora_b[0] = f32::NAN;
    let err = merge_checkpoint(&dir, &files, &out, MergeDtype::Same)
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".ember-lora-{}-misfit.tmp", std::process::id()))
        })
        .collect();
    assert!(leftovers.is_empty(), "staging folder left behind");
    // An existing output folder is never overwritten.
    std::fs::create_dir_all(&out).unwrap();
    let good = AdapterFiles::read(&dir.join("adapter_trained")).unwrap();
    let err = merge_checkpoint(&dir, &good, &out, MergeDtype::Same)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exists"), "{err}");
}

#[test]
fn merge_to_bf16_rounds_once_from_f32() {
    let dir = fixtures().join("llama");
    let files = AdapterFiles::read(&dir.join("adapter_trained")).unwrap();
    let out = tempdir("bf16");
    merge_checkpoint(&dir, &files, &out, MergeDtype::Bf16).unwrap();
    let ours = Weights::open_dir(&out).unwrap();
    let theirs = Weights::open_dir(&dir.join("merged")).unwrap();
    for key in theirs.keys() {
        let (shape, dtype) = ours.info(key).unwrap();
        assert_eq!(dtype, safetensors::Dtype::BF16);
        let a = ours.read_f32(key, &shape).unwrap();
        let b = theirs.read_f32(key, &shape).unwrap();
        for (x, y) in a.iter().zip(&b) {
            // f32 merge result rounded to bf16 (PEFT's f32 merge may differ by 1 ulp of f32).
            assert!(
                (x - half::bf16::from_f32(*y).to_f32()).abs() <= y.abs() * 4e-3 + 1e-6,
                "{key}: {x} vs {y}"
            );
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
}

/// A bf16 base merged without a dtype change takes the in-place path: the output is the base
/// file byte for byte (header included) except the adapted weights, which are
/// `bf16(f32(W) + s·B·A)`, here against a naive triple loop (one bf16 rounding apart at most).
#[test]
fn merge_into_bf16_base_keeps_the_file_and_rewrites_only_adapted_weights() {
    let dir = fixtures().join("llama");
    let base = dir.join("bf16");
    let files = AdapterFiles::read(&dir.join("adapter_trained")).unwrap();
    let out = tempdir("bf16-in-place");
    // The base folder holds the weights; the adapter fits any llama fixture precision.
    merge_checkpoint(&base, &files, &out, MergeDtype::Same).unwrap();
    let before = std::fs::read(base.join("model.safetensors")).unwrap();
    let after = std::fs::read(out.join("model.safetensors")).unwrap();
    assert_eq!(before.len(), after.len());
    let header = 8 + u64::from_le_bytes(before[..8].try_into().unwrap()) as usize;
    assert_eq!(before[..header], after[..header], "the header is the base's");

    let ours = safetensors::SafeTensors::deserialize(&after).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&before).unwrap();
    let mut merged = 0;
    for (key, view) in theirs.tensors() {
        let new = ours.tensor(&key).unwrap();
        let module = key.strip_suffix(".weight").unwrap_or("");
        let Some(t) = files.tensors.get(module) else {
            assert_eq!(view.data(), new.data(), "{key} is not adapted and must be unchanged");
            continue;
        };
        merged += 1;
        assert_eq!(new.dtype(), safetensors::Dtype::BF16);
        let scaling = files.config.module_lora(module).scaling as f32;
        let [r, inp] = t.a_shape;
        let bf16 = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        let (w, got) = (bf16(view.data()), bf16(new.data()));
        for (i, (w, got)) in w.iter().zip(&got).enumerate() {
            let (o, c) = (i / inp, i % inp);
            let delta: f32 = (0..r).map(|k| t.lora_b[o * r + k] * t.lora_a[k * inp + c]).sum();
            let expected = half::bf16::from_f32(w + scaling * delta).to_f32();
            assert!(
                (got - expected).abs() <= expected.abs() / 128.0 + 1e-6,
                "{key}[{i}]: {got} vs {expected}"
            );
        }
    }
    assert_eq!(merged, files.tensors.len());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn fresh_adapter_is_the_identity_and_counts_parameters() {
    let device = Default::default();
    let inputs = Inputs::read("llama");
    let base = model("llama");
    let base_logits = logits(&base, &inputs);
    let mut m = model("llama");
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..Default::default()
    };
    let report = m.attach_lora(&config, &device).unwrap();
    // all-linear: 7 per layer, never the output head.
    assert_eq!(report.targets.len(), 14);
    assert!(!report.targets.iter().any(|t| t == "lm_head"));
    let c = m.config().clone();
    let (h, q, kv, i) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let per_layer = 4 * ((h + q) + (h + kv) + (h + kv) + (q + h)) + 4 * ((h + i) + (h + i) + (i + h));
    assert_eq!(report.trainable_params, c.num_layers * per_layer);
    assert_eq!(
        logits(&m, &inputs),
        base_logits,
        "B = 0 must leave the output unchanged"
    );
    // adapter_init (PEFT's own B = 0 adapter) also leaves it unchanged.
    let mut m2 = model("llama");
    m2.load_adapter(
        &AdapterFiles::read(&fixtures().join("llama/adapter_init")).unwrap(),
        &device,
    )
    .unwrap();
    assert_eq!(logits(&m2, &inputs), base_logits);
}

#[test]
fn merged_equals_unmerged_with_nonzero_b_and_alpha_not_r() {
    let device = Default::default();
    let inputs = Inputs::read("qwen2");
    let mut m = model("qwen2");
    let config = LoraConfig {
        r: 3,
        lora_alpha: 7.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        init_lora_weights: ember_lora::InitLoraWeights::Bool(false),
        ..Default::default()
    };
    m.attach_lora(&config, &device).unwrap();
    let unmerged = logits(&m, &inputs);
    let base = logits(&model("qwen2"), &inputs);
    let moved = unmerged
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-2, "non-zero B must change the output (moved {moved})");
    m.merge_adapters().unwrap();
    let merged = logits(&m, &inputs);
    let d = masked_max_diff(&merged, &unmerged, &[2, 16, 384], &inputs.attention_mask);
    assert_close("merged vs unmerged", d, 1e-4);
}

#[test]
fn save_load_round_trip_is_exact() {
    let device = Default::default();
    let inputs = Inputs::read("mistral");
    let mut m = model("mistral");
    let config = LoraConfig {
        r: 2,
        lora_alpha: 5.0,
        target_modules: TargetModules::List(vec!["q_proj".into(), "down_proj".into()]),
        init_lora_weights: ember_lora::InitLoraWeights::Bool(false),
        ..Default::default()
    };
    m.attach_lora(&config, &device).unwrap();
    let files = m.adapter_files(&config, Some("tests/fixtures/mistral".into()));
    let dir = tempdir("roundtrip");
    files.write(&dir).unwrap();
    let back = AdapterFiles::read(&dir).unwrap();
    assert_eq!(back.tensors, files.tensors);
    assert_eq!(back.config, config);
    assert_eq!(back.base_model_name_or_path.as_deref(), Some("tests/fixtures/mistral"));
    let mut m2 = model("mistral");
    m2.load_adapter(&back, &device).unwrap();
    assert_eq!(logits(&m2, &inputs), logits(&m, &inputs));
    // PEFT's key layout and shapes.
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    let b = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        .unwrap();
    assert_eq!((a.shape(), b.shape()), (&[2usize, 64][..], &[64usize, 2][..]));
    let down_b = st
        .tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(down_b.shape(), &[64, 2]);
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    let device = Default::default();
    let inputs = Inputs::read("llama");
    let dir = fixtures().join("llama/adapter_random_b");
    let mut rs = AdapterFiles::read(&dir).unwrap();
    rs.config.use_rslora = true;
    let mut plain = AdapterFiles::read(&dir).unwrap();
    // r = 4: alpha/√r = alpha·√r/r, so rsLoRA with alpha equals plain LoRA with 2·alpha.
    assert_eq!(plain.config.r, 4);
    plain.config.lora_alpha *= 2.0;
    let mut a = model("llama");
    a.load_adapter(&rs, &device).unwrap();
    let mut b = model("llama");
    b.load_adapter(&plain, &device).unwrap();
    let d = masked_max_diff(
        &logits(&a, &inputs),
        &logits(&b, &inputs),
        &[2, 16, 384],
        &inputs.attention_mask,
    );
    assert_close("rsLoRA vs 2·alpha", d, 1e-5);
    let mut c = model("llama");
    c.load_adapter(&AdapterFiles::read(&dir).unwrap(), &device).unwrap();
    let moved = masked_max_diff(
        &logits(&a, &inputs),
        &logits(&c, &inputs),
        &[2, 16, 384],
        &inputs.attention_mask,
    )
    .0;
    assert!(moved > 1e-3, "rsLoRA must change the scale");
}

#[test]
fn adapter_misfits_are_refused_before_anything_is_attached() {
    let device = Default::default();
    let mut m = model("llama");
    let mut files = AdapterFiles::read(&fixtures().join("llama/adapter_trained")).unwrap();
    let t = files.tensors.remove("model.layers.1.mlp.up_proj").unwrap();
    files.tensors.insert("model.layers.7.mlp.up_proj".into(), t);
    let err = m.load_adapter(&files, &device).unwrap_err().to_string();
    assert!(err.contains("model.layers.7.mlp.up_proj"), "{err}");
    assert!(
        m.linear_layers().iter().all(|(_, l)| l.adapter.is_none()),
        "half-loaded adapter"
    );

    let qwen3 = AdapterFiles::read(&fixtures().join("qwen3/adapter_trained")).unwrap();
    let err = m.load_adapter(&qwen3, &device).unwrap_err().to_string();
    assert!(err.contains("k_proj") && err.contains("[32, 64]"), "{err}");
    assert!(m.linear_layers().iter().all(|(_, l)| l.adapter.is_none()));

    let config = LoraConfig {
        target_modules: TargetModules::List(vec!["query".into()]),
        ..Default::default()
    };
    let err = m.attach_lora(&config, &device).unwrap_err().to_string();
    assert!(
        err.contains("matched no linear layer") && err.contains("model.layers.0.self_attn.q_proj"),
        "{err}"
    );
}

#[test]
fn unsupported_adapter_files_are_refused() {
    let src = fixtures().join("llama/adapter_random_b");
    let dir = tempdir("dora");
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    config["use_dora"] = true.into();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let err = AdapterFiles::read(&dir).unwrap_err().to_string();
    assert!(err.contains("DoRA"), "{err}");

    // Embedding LoRA tensors in the weights file.
    config["use_dora"] = false.into();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let data = vec![0u8; 4 * 4 * 384];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 384], &data).unwrap();
    safetensors::serialize_to_file(
        vec![("base_model.model.model.embed_tokens.lora_embedding_A", view)],
        None,
        &dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let err = AdapterFiles::read(&dir).unwrap_err().to_string();
    assert!(err.contains("embeddings"), "{err}");
}

/// Dropout is active only under autodiff: inference with dropout > 0 is deterministic.
#[test]
fn dropout_is_off_at_inference() {
    let device = Default::default();
    let inputs = Inputs::read("llama");
    let mut files = AdapterFiles::read(&fixtures().join("llama/adapter_random_b")).unwrap();
    files.config.lora_dropout = 0.5;
    let mut m = model("llama");
    m.load_adapter(&files, &device).unwrap();
    compare(
        "llama",
        "dropout 0.5 at inference",
        &logits(&m, &inputs),
        "lora_logits.safetensors",
        &inputs,
    );
}

/// Removing adapters (also after an in-memory merge) gives the base model's logits back, so one
/// loaded base can serve several adapters in turn (as `ember eval` does).
#[test]
fn removed_adapters_leave_the_base() {
    let device = Default::default();
    let inputs = Inputs::read("qwen3");
    let mut m = model("qwen3");
    let files = AdapterFiles::read(&fixtures().join("qwen3/adapter_trained")).unwrap();
    m.load_adapter(&files, &device).unwrap();
    m.merge_adapters().unwrap();
    m.remove_adapters();
    assert!(m.linear_layers().iter().all(|(_, l)| l.adapter.is_none()));
    compare(
        "qwen3",
        "after remove_adapters",
        &logits(&m, &inputs),
        "logits.safetensors",
        &inputs,
    );
    m.load_adapter(&files, &device).unwrap();
    compare(
        "qwen3",
        "adapter loaded again",
        &logits(&m, &inputs),
        "trained_lora_logits.safetensors",
        &inputs,
    );
}

/// An adapter of a multimodal wrapper names its modules by full path in adapter_config.json,
/// so that PEFT adapts the language model only (by short names it would also wrap Gemma 4's
/// vision tower, whose clippable linears it cannot adapt); Ember reads it back to the same
/// modules.
#[test]
fn wrapper_adapters_name_full_paths() {
    let device = Default::default();
    let mut m = model("gemma4_wrapped");
    let config = LoraConfig {
        target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
        ..LoraConfig::default()
    };
    let report = m.attach_lora(&config, &device).unwrap();
    let dir = tempdir("wrapper-targets");
    m.adapter_files(&config, None).write(&dir).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let mut expected = report.targets.clone();
    expected.sort();
    assert_eq!(written["target_modules"], serde_json::json!(expected));
    assert!(expected.iter().all(|t| t.starts_with("model.language_model.layers.")));
    // Full-attention layers have no v_proj (keys are the values) and KV-shared layers neither.
    assert_eq!(expected.len(), 4 + 1);
    let mut again = model("gemma4_wrapped");
    let back = again.load_adapter(&AdapterFiles::read(&dir).unwrap(), &device).unwrap();
    assert_eq!(back.targets, report.targets);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh adapter attached by Ember from the fixture's own settings has PEFT's layout:
/// `all-linear` on the families transformers 5 fuses becomes attention + router + stacked
/// experts (rank and alpha doubled on `gate_up_proj`, PEFT's rewrite), gpt-oss and Llama 4
/// name their expert parameters; the written keys, shapes and settings are PEFT's `adapter_init`.
#[test]
fn expert_lora_attaches_as_peft_does() {
    let device = Default::default();
    for arch in families().into_iter().filter(|a| a.ends_with("_experts")) {
        let dir = fixtures().join(&arch);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let targets = &expected["lora"]["target_modules"];
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: serde_json::from_value(targets["target_modules"].clone()).unwrap(),
            target_parameters: targets
                .get("target_parameters")
                .map(|t| serde_json::from_value(t.clone()).unwrap())
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut m = model(&arch);
        let report = m.attach_lora(&config, &device).unwrap();
        let peft = AdapterFiles::read(&dir.join("adapter_init")).unwrap();
        let ours = m.adapter_files(&config, None);
        assert_eq!(
            ours.tensors.keys().collect::<Vec<_>>(),
            peft.tensors.keys().collect::<Vec<_>>(),
            "{arch}: adapted modules"
        );
        for (key, t) in &peft.tensors {
            let mine = &ours.tensors[key];
            assert_eq!((mine.a_shape, mine.b_shape), (t.a_shape, t.b_shape), "{arch} {key}");
            // Initialised as PEFT does: B = 0, A within Kaiming's bound of PEFT's `in`.
            assert!(mine.lora_b.iter().all(|&x| x == 0.0), "{arch} {key}: B starts at zero");
            let bound = 1.0 / (t.a_shape[1] as f32).sqrt();
            assert!(
                mine.lora_a.iter().all(|x| x.abs() <= bound),
                "{arch} {key}: A in ±1/√in"
            );
        }
        let mut ours_params = ours.config.target_parameters.clone();
        let mut peft_params = peft.config.target_parameters.clone();
        ours_params.sort();
        peft_params.sort();
        assert_eq!(ours_params, peft_params, "{arch}: target_parameters");
        assert_eq!(
            ours.config.rank_pattern, peft.config.rank_pattern,
            "{arch}: rank_pattern"
        );
        assert_eq!(
            ours.config.alpha_pattern, peft.config.alpha_pattern,
            "{arch}: alpha_pattern"
        );
        let trainable = expected["lora"]["num_trainable_params"].as_u64().unwrap() as usize;
        assert_eq!(report.trainable_params, trainable, "{arch}: trainable parameters");
    }
}

/// PEFT refuses to split fused experts: naming `gate_proj` without `up_proj` on a family whose
/// experts transformers 5 fuses is an error that says why; and parameter LoRA has no dropout.
#[test]
fn expert_lora_refuses_half_a_fused_projection_and_dropout() {
    let device = Default::default();
    let mut m = model("qwen3_moe_experts");
    let half = LoraConfig {
        target_modules: TargetModules::List(vec!["q_proj".into(), "gate_proj".into()]),
        ..Default::default()
    };
    let err = m.attach_lora(&half, &device).unwrap_err().to_string();
    assert!(
        err.contains("gate_proj") && err.contains("up_proj") && err.contains("gate_up_proj"),
        "{err}"
    );
    let dropout = LoraConfig {
        target_modules: TargetModules::Pattern("all-linear".into()),
        lora_dropout: 0.1,
        ..Default::default()
    };
    let err = m.attach_lora(&dropout, &device).unwrap_err().to_string();
    assert!(
        err.contains("lora_dropout") && err.contains("target_parameters"),
        "{err}"
    );
    assert!(
        m.linear_layers().iter().all(|(_, l)| l.adapter.is_none()),
        "nothing attached"
    );
}

/// Adapters saved for transformers 4's per-expert MoE modules (`experts.{e}.gate_proj`,
/// Mixtral's `block_sparse_moe.experts.{e}.w1` and router `block_sparse_moe.gate`) load as PEFT
/// 0.21.2 converts them: PEFT's logits, PEFT's converted files when written back, PEFT's
/// merged outputs; and a regex naming the v4 expert modules resolves as in `get_peft_model`.
/// References: `tests/fixtures/gen_v4_expert_lora.py`.
#[test]
fn v4_expert_adapters_and_regex_targets_convert_as_peft_does() {
    let device = Default::default();
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("v4_expert_lora.json")).unwrap()).unwrap();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let target_names = |c: &LoraConfig| match &c.target_modules {
        TargetModules::List(l) => sorted(l.clone()),
        TargetModules::Pattern(p) => vec![p.clone()],
    };
    for arch in ["mixtral", "qwen3_moe"] {
        let dir = fixtures().join(arch);
        let inputs = Inputs::read(arch);
        let v4 = AdapterFiles::read(&dir.join("adapter_v4")).unwrap();
        assert!(
            v4.tensors.keys().any(|k| k.contains(".experts.3.")),
            "{arch}: the fixture holds per-expert keys"
        );
        let mut m = model(arch);
        let report = m.load_adapter(&v4, &device).unwrap();
        compare(
            arch,
            "v4 adapter",
            &logits(&m, &inputs),
            "v4_lora_logits.safetensors",
            &inputs,
        );
        assert!(
            report.targets.iter().any(|t| t.ends_with("experts.gate_up_proj")),
            "{report:?}"
        );

        // Written back, it is what PEFT saves after converting: same keys, tensors, settings.
        let peft = AdapterFiles::read(&dir.join("adapter_v4_peft")).unwrap();
        let ours = m.adapter_files(&v4.config, None);
        assert_eq!(
            ours.tensors.keys().collect::<Vec<_>>(),
            peft.tensors.keys().collect::<Vec<_>>(),
            "{arch}: converted keys"
        );
        for (key, t) in &peft.tensors {
            assert_eq!(
                &ours.tensors[key], t,
                "{arch} {key}: converted tensors (pure data movement)"
            );
        }
        assert_eq!(target_names(&ours.config), target_names(&peft.config), "{arch}");
        assert_eq!(
            sorted(ours.config.target_parameters.clone()),
            sorted(peft.config.target_parameters.clone()),
            "{arch}"
        );
        assert_eq!(ours.config.rank_pattern, peft.config.rank_pattern, "{arch}");
        assert_eq!(ours.config.alpha_pattern, peft.config.alpha_pattern, "{arch}");

        // `ember merge` of the v4 adapter: the merged checkpoint gives PEFT's adapted logits.
        let out = tempdir(&format!("merged-v4-{arch}"));
        merge_checkpoint(&dir, &v4, &out, MergeDtype::Same).unwrap();
        let merged = CausalLm::<TestBackend>::from_dir(&out, &Default::default()).unwrap();
        compare(
            arch,
            "merged v4 adapter",
            &logits(&merged, &inputs),
            "v4_lora_logits.safetensors",
            &inputs,
        );
        std::fs::remove_dir_all(&out).unwrap();

        // A missing expert is refused by key, before anything is attached.
        let mut partial = v4.clone();
        let missing = partial
            .tensors
            .keys()
            .find(|k| k.contains(".experts.3.") && (k.ends_with(".w3") || k.ends_with(".up_proj")))
            .unwrap()
            .clone();
        partial.tensors.remove(&missing);
        let mut fresh = model(arch);
        let err = fresh.load_adapter(&partial, &device).unwrap_err().to_string();
        let renamed = missing.replace(".block_sparse_moe.", ".mlp.");
        assert!(
            err.contains(&format!("base_model.model.{renamed}.lora_A.weight")),
            "{err}"
        );
        assert!(fresh.adapter_files(&v4.config, None).tensors.is_empty());

        // A regex naming the v4 expert modules: PEFT's adapted modules and settings.
        let regex = record[arch]["regex"].as_str().unwrap();
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::Pattern(regex.into()),
            ..Default::default()
        };
        let peft = AdapterFiles::read(&dir.join("adapter_regex")).unwrap();
        let mut attached = model(arch);
        attached.attach_lora(&config, &device).unwrap();
        let ours = attached.adapter_files(&config, None);
        assert_eq!(
            ours.tensors.keys().collect::<Vec<_>>(),
            peft.tensors.keys().collect::<Vec<_>>(),
            "{arch}: modules the regex adapts"
        );
        for (key, t) in &peft.tensors {
            let mine = &ours.tensors[key];
            assert_eq!((mine.a_shape, mine.b_shape), (t.a_shape, t.b_shape), "{arch} {key}");
        }
        assert_eq!(target_names(&ours.config), target_names(&peft.config), "{arch} regex");
        assert_eq!(
            sorted(ours.config.target_parameters.clone()),
            sorted(peft.config.target_parameters.clone()),
            "{arch} regex"
        );
        assert_eq!(ours.config.rank_pattern, peft.config.rank_pattern, "{arch} regex");
        assert_eq!(ours.config.alpha_pattern, peft.config.alpha_pattern, "{arch} regex");
        let mut loaded = model(arch);
        loaded.load_adapter(&peft, &device).unwrap();
        compare(
            arch,
            "regex adapter",
            &logits(&loaded, &inputs),
            "regex_lora_logits.safetensors",
            &inputs,
        );
    }
}
