//! Golden tests: Ember's logits, hidden states and per-token loss against transformers 5.24.
//!
//! The references in `tests/fixtures/<arch>/` come from `../shared/fixtures/_generator`:
//! `PYTHONHASHSEED=0 python gen_fixtures.py OUT` (transformers 5.24.0, torch 2.15, CPU f32,
//! eager attention). Tolerance: 1e-4 absolute, compared only where attention_mask is 1.

mod common;

use burn::tensor::Tensor;
use common::*;
use ember_model::{CausalLm, DecoderConfig, Weights};

const TOL: f32 = 1e-4;

fn check_arch(arch: &str, config_file: &str) {
    let dir = fixtures().join(arch);
    let device = Default::default();
    let config = DecoderConfig::from_file(dir.join(config_file)).unwrap();
    assert_eq!(config.wrapper.is_some(), arch.ends_with("_wrapped"), "{arch}: wrapper");
    let weights = Weights::open_dir(&dir).unwrap();
    let model = CausalLm::<TestBackend>::load(config, &weights, &device).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    // GLM-5's sparse-attention indexers are parameters of transformers' model that Ember
    // leaves unloaded (they keep every key at the lengths Ember runs).
    let indexer_params: u64 = weights
        .keys()
        .filter(|k| k.contains(".self_attn.indexer."))
        .map(|k| weights.info(k).unwrap().0.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(
        model.base_param_count() as u64 + indexer_params,
        expected["num_params"].as_u64().unwrap(),
        "{arch}: parameter count"
    );
    let inputs = Inputs::read(arch);
    let out = model.forward_with_hidden(inputs.to_model_input(), true);

    let reference_file = dir.join("logits.safetensors");
    let (expected, shape) = reference(&reference_file, "logits");
    let dims: [usize; 3] = out.logits.dims();
    assert_eq!(dims.to_vec(), shape);
    let logits = out.logits.into_data().to_vec::<f32>().unwrap();
    let tag = format!("{arch} ({config_file})");
    assert_close(
        &format!("{tag} logits"),
        masked_max_diff(&logits, &expected, &shape, &inputs.attention_mask),
        TOL,
    );

    assert_eq!(out.hidden_states.len(), model.config().num_layers + 1);
    for (i, hidden) in out.hidden_states.into_iter().enumerate() {
        let (expected, shape) = reference(&reference_file, &format!("hidden_states.{i}"));
        let actual = hidden.into_data().to_vec::<f32>().unwrap();
        let diff = masked_max_diff(&actual, &expected, &shape, &inputs.attention_mask);
        assert_close(&format!("{tag} hidden_states.{i}"), diff, TOL);
    }

    let (expected_loss, loss_shape) = reference(&reference_file, "per_token_loss");
    let loss = per_token_loss(&logits, dims, &inputs.labels);
    let worst = loss
        .iter()
        .zip(&expected_loss)
        .map(|(a, e)| (a - e).abs())
        .enumerate()
        .fold((0.0f32, 0usize), |w, (i, d)| if d > w.0 { (d, i) } else { w });
    assert_eq!(loss_shape, vec![dims[0], dims[1] - 1]);
    assert_close(&format!("{tag} per_token_loss"), worst, TOL);
}

macro_rules! parity {
    ($($name:ident: $arch:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_arch($arch, "config.json");
                // The hub/transformers-4 style copies, where the generator wrote them
                // (`config.hub.json`: Gemma 4's `global_head_dim` instead of `per_layer_config`).
                for variant in ["config.v4.json", "config.hub.json"] {
                    if fixtures().join($arch).join(variant).exists() {
                        check_arch($arch, variant);
                    }
                }
            }
        )*
    };
}

parity! {
    llama: "llama",
    llama_rope3: "llama_rope3",
    mistral: "mistral",
    qwen2: "qwen2",
    qwen3: "qwen3",
    gemma: "gemma",
    gemma2: "gemma2",
    gemma3: "gemma3",
    phi3: "phi3",
    olmo2: "olmo2",
    glm4: "glm4",
    mixtral: "mixtral",
    qwen3_moe: "qwen3_moe",
    gpt_oss: "gpt_oss",
    olmo3: "olmo3",
    smollm3: "smollm3",
    ministral3: "ministral3",
    ministral3_wrapped: "ministral3_wrapped",
    llama4: "llama4",
    gemma3_wrapped: "gemma3_wrapped",
    gemma4: "gemma4",
    gemma4_wrapped: "gemma4_wrapped",
    gemma4_moe: "gemma4_moe",
    gemma4_unified: "gemma4_unified",
    gemma4_unified_wrapped: "gemma4_unified_wrapped",
    glm4_moe: "glm4_moe",
    deepseek_v3: "deepseek_v3",
    glm4_moe_lite: "glm4_moe_lite",
    glm_moe_dsa: "glm_moe_dsa",
    mistral4: "mistral4",
    mistral4_wrapped: "mistral4_wrapped",
    qwen3_5: "qwen3_5",
    qwen3_5_moe: "qwen3_5_moe",
    qwen3_5_wrapped: "qwen3_5_wrapped",
    qwen3_5_moe_wrapped: "qwen3_5_moe_wrapped",
    qwen3_next: "qwen3_next",
    qwen3_moe_experts: "qwen3_moe_experts",
    mixtral_experts: "mixtral_experts",
    glm4_moe_experts: "glm4_moe_experts",
    gpt_oss_experts: "gpt_oss_experts",
    llama4_experts: "llama4_experts",
}

/// Under `--features wgpu` the golden tests really run on burn-wgpu (and on burn-ndarray
/// without it).
#[test]
fn golden_tests_run_on_the_configured_backend() {
    use burn::tensor::backend::Backend;
    let name = <TestBackend as Backend>::name(&Default::default());
    println!("golden tests on {name}");
    assert_eq!(name.contains("wgpu"), cfg!(feature = "wgpu"), "{name}");
}

/// bf16 weights upcast to f32 and computed in f32 match transformers'
/// `logits_bf16_weights_f32_compute` (a fresh reload of `llama/bf16/` with `dtype=torch.float32`).
#[test]
fn llama_bf16_weights_f32_compute() {
    let dir = fixtures().join("llama");
    let device = Default::default();
    let model = CausalLm::<TestBackend>::from_dir(&dir.join("bf16"), &device).unwrap();
    let inputs = Inputs::read("llama");
    let logits: Tensor<TestBackend, 3> = model.forward(inputs.to_model_input());
    let (expected, shape) = reference(&dir.join("logits_bf16.safetensors"), "logits_bf16_weights_f32_compute");
    let actual = logits.into_data().to_vec::<f32>().unwrap();
    assert_close(
        "llama bf16 weights, f32 compute",
        masked_max_diff(&actual, &expected, &shape, &inputs.attention_mask),
        TOL,
    );
}

/// Left padding with `position_ids` = cumsum(mask) − 1 (what `generate` passes) gives each
/// row the logits it has alone; so does right padding with default positions.
#[test]
fn padded_rows_match_unpadded_rows() {
    use burn::tensor::{Int, TensorData};
    use ember_model::ModelInput;
    for arch in ["llama", "mistral", "qwen2", "qwen3"] {
        let dir = fixtures().join(arch);
        let device = Default::default();
        let model = CausalLm::<TestBackend>::from_dir(&dir, &device).unwrap();
        let ids: Vec<i64> = Inputs::read(arch).input_ids[1][..12].to_vec();
        let vocab = model.config().vocab_size;
        let alone = model
            .forward(ModelInput::new(Tensor::<TestBackend, 2, Int>::from_data(
                TensorData::new(ids.clone(), [1, 12]),
                &device,
            )))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let pad = 5;
        let mut left = vec![0i64; pad];
        left.extend(&ids);
        let mut right = ids.clone();
        right.extend(vec![0i64; pad]);
        let mask_left: Vec<i64> = (0..12 + pad).map(|i| (i >= pad) as i64).collect();
        let mask_right: Vec<i64> = (0..12 + pad).map(|i| (i < 12) as i64).collect();
        let pos_left: Vec<i64> = (0..12 + pad)
            .map(|i| if i >= pad { (i - pad) as i64 } else { 1 })
            .collect();
        let t = |v: Vec<i64>| Tensor::<TestBackend, 2, Int>::from_data(TensorData::new(v, [1, 12 + pad]), &device);
        let batch = |ids: Vec<i64>, mask: Vec<i64>, pos: Option<Vec<i64>>| ModelInput {
            input_ids: Tensor::cat(vec![t(ids.clone()), t(ids)], 0),
            attention_mask: Some(Tensor::cat(vec![t(mask.clone()), t(mask)], 0)),
            position_ids: pos.map(|p| Tensor::cat(vec![t(p.clone()), t(p)], 0)),
            segment_ids: None,
        };
        let left_out = model
            .forward(batch(left, mask_left, Some(pos_left)))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let right_out = model
            .forward(batch(right, mask_right, None))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let row = (12 + pad) * vocab;
        for b in 0..2 {
            let l = &left_out[b * row + pad * vocab..b * row + (pad + 12) * vocab];
            let r = &right_out[b * row..b * row + 12 * vocab];
            let dl = l.iter().zip(&alone).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
            let dr = r.iter().zip(&alone).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
            assert!(
                dl <= 1e-5 && dr <= 1e-5,
                "{arch} row {b}: left {dl:.2e}, right {dr:.2e}"
            );
            assert!(l.iter().chain(r).all(|x| x.is_finite()));
        }
        assert!(
            left_out.iter().all(|x| x.is_finite()),
            "{arch}: NaN at fully masked pad rows"
        );
    }
}

/// RoPE variants outside the shared fixtures, against transformers 5.24 on the same weights
/// (`tests/fixtures/rope_variants/gen_rope_variants.py`): Phi-3.5-style longrope with partial
/// rotary (short factors on a 6-token input, long factors once positions pass the original 8),
/// Qwen2.5-style YaRN, and Gemma 4's proportional RoPE.
#[test]
fn rope_variants_match_transformers() {
    let device = Default::default();
    for (variant, arch) in [
        ("phi3_longrope", "phi3"),
        ("qwen2_yarn", "qwen2"),
        ("llama_proportional", "llama"),
    ] {
        let dir = fixtures().join("rope_variants").join(variant);
        let config = DecoderConfig::from_file(dir.join("config.json")).unwrap();
        let weights = Weights::open_dir(&fixtures().join(arch)).unwrap();
        let model = CausalLm::<TestBackend>::load(config, &weights, &device).unwrap();
        let inputs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
        for case in ["short", "long"] {
            let rows: Vec<Vec<i64>> = serde_json::from_value(inputs[case].clone()).unwrap();
            let dims = [rows.len(), rows[0].len()];
            let ids = Tensor::<TestBackend, 1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(rows.concat(), [dims[0] * dims[1]]),
                &device,
            )
            .reshape(dims);
            let logits = model.forward(ember_model::ModelInput::new(ids));
            let actual = logits.into_data().to_vec::<f32>().unwrap();
            let (expected, _) = reference(&dir.join("logits.safetensors"), &format!("logits_{case}"));
            assert_eq!(actual.len(), expected.len());
            let diff = actual
                .iter()
                .zip(&expected)
                .enumerate()
                .fold(
                    (0.0f32, 0),
                    |w, (i, (a, b))| if (a - b).abs() > w.0 { ((a - b).abs(), i) } else { w },
                );
            assert_close(&format!("{variant} {case}"), diff, TOL);
        }
    }
}
