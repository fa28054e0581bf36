//! Loading: sharded checkpoints and f16 storage load like the single f32 file; every broken
//! checkpoint gives an error that names the key, the shapes or the file, and nothing panics.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use ember_model::{CausalLm, DecoderConfig, ModelError, Weights};
use safetensors::tensor::{Dtype, TensorView};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// All tensors of `llama/model.safetensors` as (key, f32 values, shape).
fn llama_tensors() -> Vec<(String, Vec<f32>, Vec<usize>)> {
    let dir = fixtures().join("llama");
    let weights = Weights::open_dir(&dir).unwrap();
    let keys: Vec<String> = weights.keys().cloned().collect();
    keys.into_iter()
        .map(|k| {
            let (shape, _) = weights.info(&k).unwrap();
            let values = weights.read_f32(&k, &shape).unwrap();
            (k, values, shape)
        })
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<u8>, Vec<usize>, Dtype)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, bytes, shape, dtype)| (k.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A llama copy with `edit` applied to its tensor list.
fn llama_copy(name: &str, edit: impl FnOnce(&mut Vec<(String, Vec<f32>, Vec<usize>)>)) -> PathBuf {
    let dir = tempdir(name);
    std::fs::copy(fixtures().join("llama/config.json"), dir.join("config.json")).unwrap();
    let mut tensors = llama_tensors();
    edit(&mut tensors);
    let raw: Vec<_> = tensors
        .into_iter()
        .map(|(k, v, s)| (k, f32_bytes(&v), s, Dtype::F32))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &raw);
    dir
}

fn load(dir: &Path) -> Result<CausalLm<TestBackend>, ModelError> {
    CausalLm::<TestBackend>::from_dir(dir, &Default::default())
}

fn llama_logits_diff(dir: &Path) -> f32 {
    let model = load(dir).unwrap();
    let inputs = Inputs::read("llama");
    let logits = model
        .forward(inputs.to_model_input())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let (expected, shape) = reference(&fixtures().join("llama/logits.safetensors"), "logits");
    masked_max_diff(&logits, &expected, &shape, &inputs.attention_mask).0
}

#[test]
fn sharded_checkpoint_with_index_loads() {
    let dir = tempdir("sharded");
    std::fs::copy(fixtures().join("llama/config.json"), dir.join("config.json")).unwrap();
    let tensors = llama_tensors();
    let half = tensors.len() / 2;
    let mut weight_map = BTreeMap::new();
    for (i, chunk) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let raw: Vec<_> = chunk
            .iter()
            .map(|(k, v, s)| (k.clone(), f32_bytes(v), s.clone(), Dtype::F32))
            .collect();
        write_safetensors(&dir.join(&file), &raw);
        for (k, _, _) in chunk.iter() {
            weight_map.insert(k.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let diff = llama_logits_diff(&dir);
    assert!(diff <= 1e-4, "sharded logits differ by {diff}");
}

#[test]
fn f16_storage_is_converted_while_loading() {
    let dir = tempdir("f16");
    std::fs::copy(fixtures().join("llama/config.json"), dir.join("config.json")).unwrap();
    let raw: Vec<_> = llama_tensors()
        .into_iter()
        .map(|(k, v, s)| {
            let bytes = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
            (k, bytes, s, Dtype::F16)
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &raw);
    let model = load(&dir).unwrap();
    // Every weight equals its f16 rounding exactly.
    let (_, q_proj) = model
        .linear_layers()
        .into_iter()
        .find(|(path, _)| path == "model.layers.0.self_attn.q_proj")
        .unwrap();
    let w = q_proj.weight.dense().unwrap().into_data().to_vec::<f32>().unwrap();
    let reference = llama_tensors()
        .into_iter()
        .find(|(k, _, _)| k == "model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .1;
    for (a, r) in w.iter().zip(&reference) {
        assert_eq!(*a, half::f16::from_f32(*r).to_f32());
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = llama_copy("missing", |t| {
        t.retain(|(k, _, _)| k != "model.layers.1.mlp.up_proj.weight")
    });
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = llama_copy("unexpected", |t| {
        t.push(("model.layers.0.extra.weight".into(), vec![0.0; 4], vec![4]))
    });
    let err = load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("unexpected tensor(s)") && err.contains("model.layers.0.extra.weight"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let dir = llama_copy("shape", |t| {
        let entry = t
            .iter_mut()
            .find(|(k, _, _)| k == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        entry.2 = vec![64, 32];
    });
    let err = load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("[32, 64]") && err.contains("[64, 32]"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_a_clear_error() {
    let dir = llama_copy("truncated", |_| {});
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );

    std::fs::write(&path, b"\x05\x00").unwrap();
    let err = load(&dir).unwrap_err().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn unsupported_model_type_lists_supported_ones() {
    let dir = tempdir("model_type");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("llama/config.json")).unwrap()).unwrap();
    config["model_type"] = "mamba".into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("unsupported model_type `mamba`")
            && ember_model::family::FAMILIES.iter().all(|f| err.contains(f.model_type))
            && err.contains("mistral3"),
        "{err}"
    );
}

fn fixture_config(arch: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("config.json")).unwrap()).unwrap()
}

/// Each edit of `arch`'s config.json is refused with an error naming its key.
fn assert_config_errors(arch: &str, cases: &[(serde_json::Value, &str)]) {
    for (edit, key) in cases {
        let mut config = fixture_config(arch);
        for (k, v) in edit.as_object().unwrap() {
            config[k] = v.clone();
        }
        let err = normalise(&config).unwrap_err().to_string();
        assert!(err.contains(key), "{arch} {edit}: {err}");
    }
}

fn normalise(config: &serde_json::Value) -> ember_model::Result<DecoderConfig> {
    let hf: ember_model::HfConfig = serde_json::from_value(config.clone()).unwrap();
    DecoderConfig::from_hf(&hf, Path::new("config.json"))
}

#[test]
fn gemma2_and_gemma3_defaults_follow_transformers() {
    // Hub Gemma 2 configs carry no layer_types; absent soft-caps default to 50/30, null ones are off.
    let mut config = fixture_config("gemma2");
    let map = config.as_object_mut().unwrap();
    for key in [
        "layer_types",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
    ] {
        map.remove(key);
    }
    map.insert("num_hidden_layers".into(), 4.into());
    let c = normalise(&config).unwrap();
    assert_eq!(c.sliding_window, vec![Some(8), None, Some(8), None]);
    assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!(c.attn_scale, 1.0 / 16.0);
    config["attn_logit_softcapping"] = serde_json::Value::Null;
    config["final_logit_softcapping"] = serde_json::Value::Null;
    let c = normalise(&config).unwrap();
    assert_eq!((c.attn_softcap, c.final_softcap), (None, None));

    // Gemma 3 (transformers 4 style): every sliding_window_pattern-th layer is global and the
    // sliding layers use rope_local_base_freq without the global scaling.
    let mut config = fixture_config("gemma3");
    let map = config.as_object_mut().unwrap();
    map.remove("layer_types");
    map.remove("rope_parameters");
    map.remove("_sliding_window_pattern");
    map.insert("num_hidden_layers".into(), 6.into());
    map.insert("sliding_window_pattern".into(), 3.into());
    map.insert("rope_theta".into(), 1e6.into());
    map.insert("rope_local_base_freq".into(), 1e4.into());
    map.insert(
        "rope_scaling".into(),
        serde_json::json!({"rope_type": "linear", "factor": 8.0}),
    );
    let c = normalise(&config).unwrap();
    assert_eq!(c.sliding_window, vec![Some(8), Some(8), None, Some(8), Some(8), None]);
    assert_eq!(c.rope.theta, 1e6);
    assert_eq!(c.rope.scaling, ember_model::config::RopeScaling::Linear { factor: 8.0 });
    let local = c.local_rope.unwrap();
    assert_eq!(
        (local.theta, local.scaling),
        (1e4, ember_model::config::RopeScaling::Default)
    );
}

/// A `sliding_window` key slides attention only in the families whose transformers code uses it.
#[test]
fn sliding_window_key_applies_only_where_transformers_uses_it() {
    for (arch, slides) in [
        ("llama", false),
        ("gemma", false),
        ("olmo2", false),
        ("glm4", false),
        ("mistral", true),
        ("mixtral", true),
        ("phi3", true),
    ] {
        let mut config = fixture_config(arch);
        config["sliding_window"] = 4.into();
        let c = normalise(&config).unwrap();
        let want = if slides { Some(4) } else { None };
        assert_eq!(c.sliding_window, vec![want; 2], "{arch}");
    }
}

#[test]
fn unsupported_layouts_are_named() {
    // A multimodal wrapper Ember does not know is named as one.
    let wrapper = serde_json::json!({"model_type": "llava_next", "text_config": fixture_config("llama")});
    let err = DecoderConfig::from_value(wrapper, Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("llava_next (a multimodal wrapper") && err.contains("mistral3"),
        "{err}"
    );

    // Dynamic NTK scaling is not implemented: refused, not silently ignored; longrope factors
    // must cover the rotary dimensions.
    let mut config = fixture_config("phi3");
    config["rope_parameters"]["rope_type"] = "dynamic".into();
    let err = normalise(&config).unwrap_err().to_string();
    assert!(err.contains("unsupported rope_type `dynamic`"), "{err}");
    config["rope_parameters"] = serde_json::json!({
        "rope_type": "longrope", "original_max_position_embeddings": 8,
        "short_factor": [1.0, 1.0], "long_factor": [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    });
    let err = normalise(&config).unwrap_err().to_string();
    assert!(err.contains("short_factor") && err.contains("needs 8 numbers"), "{err}");

    // MoE routing needs its expert counts.
    let mut config = fixture_config("mixtral");
    config.as_object_mut().unwrap().remove("num_local_experts");
    let err = normalise(&config).unwrap_err().to_string();
    assert!(err.contains("num_local_experts"), "{err}");
}

#[test]
fn missing_folder_and_broken_config_are_named() {
    let dir = tempdir("no_weights");
    std::fs::copy(fixtures().join("llama/config.json"), dir.join("config.json")).unwrap();
    let err = load(&dir).unwrap_err().to_string();
    assert!(err.contains("no `model.safetensors`"), "{err}");

    std::fs::write(
        dir.join("config.json"),
        "{\"model_type\": \"llama\", \"vocab_size\": \"many\"}",
    )
    .unwrap();
    let err = load(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("line 1"), "{err}");
}

/// gpt-oss MXFP4 experts (`*_blocks` + `*_scales`) dequantise to what transformers 5.24's
/// `convert_moe_packed_tensors` gives (tests/fixtures/mxfp4/gen_mxfp4.py), already transposed
/// to the `[experts, hidden, 2·inter]` layout the model reads.
#[test]
fn mxfp4_experts_dequantise_like_transformers() {
    let dir = fixtures().join("mxfp4");
    let file = dir.join("mxfp4.safetensors");
    let weights = Weights::open_files(&dir, std::slice::from_ref(&file)).unwrap();
    assert!(weights.contains("experts.gate_up_proj"));
    let got = weights.read_f32("experts.gate_up_proj", &[2, 64, 6]).unwrap();
    let want = weights.read_f32("expected", &[2, 64, 6]).unwrap();
    assert_eq!(got, want, "MXFP4 values are exact in f32");
    weights.ensure_all_used().unwrap();
    // A shape that does not fit is named.
    let err = Weights::open_files(&dir, std::slice::from_ref(&file))
        .unwrap()
        .read_f32("experts.gate_up_proj", &[2, 6, 64])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gate_up_proj_blocks") && err.contains("[2, 64, 6]"),
        "{err}"
    );
}

/// A Gemma 3 multimodal config (4B and up) reads as its `gemma3_text` decoder: the wrapper's
/// `tie_word_embeddings` decides, a `text_config` without `model_type` takes the wrapper's
/// default, and `inspect` can name the wrapper.
#[test]
fn gemma3_wrapper_config_reads_its_text_decoder() {
    let mut text = fixture_config("gemma3");
    text.as_object_mut().unwrap().remove("model_type");
    text.as_object_mut().unwrap().remove("tie_word_embeddings");
    let wrapper = serde_json::json!({
        "model_type": "gemma3", "text_config": text, "vision_config": {"model_type": "siglip_vision_model"},
        "eos_token_id": [1, 106],
    });
    let c = DecoderConfig::from_value(wrapper, Path::new("config.json")).unwrap();
    let plain = normalise(&fixture_config("gemma3")).unwrap();
    assert_eq!(c.model_type, "gemma3_text");
    assert_eq!(c.wrapper.as_deref(), Some("gemma3"));
    assert!(c.tie_word_embeddings, "Gemma3Config ties by default");
    assert_eq!(c.eos_token_ids, plain.eos_token_ids, "text_config's eos wins");
    assert_eq!(
        DecoderConfig { wrapper: None, ..c },
        plain,
        "the same decoder as the text-only config"
    );
}

/// Every row of the family table has a fixture checked against transformers (the test lists
/// are the fixture folders), and every fixture's config names a row.
#[test]
fn every_family_has_a_fixture() {
    let mut covered = std::collections::BTreeSet::new();
    for arch in families() {
        let c = DecoderConfig::from_file(fixtures().join(&arch).join("config.json")).unwrap();
        covered.insert(c.family);
    }
    for spec in ember_model::family::FAMILIES {
        assert!(covered.contains(&spec.family), "no fixture for {}", spec.model_type);
    }
}

/// Keys transformers derives in `__post_init__` and writes into config.json are derived the same
/// way when a hub config leaves them out: SmolLM3's `no_rope_layers` and `layer_types` from
/// `no_rope_layer_interval`; Llama 4's `no_rope_layers`, `layer_types` (chunked RoPE layers) and
/// `moe_layers` from their intervals. The fixtures' config.json (written by transformers 5.24)
/// hold the derived values.
#[test]
fn derived_layer_keys_follow_transformers() {
    for (arch, drop, add) in [
        (
            "smollm3",
            &["no_rope_layers", "layer_types"][..],
            serde_json::json!({"no_rope_layer_interval": 2}),
        ),
        (
            "llama4",
            &["no_rope_layers", "layer_types", "moe_layers"][..],
            serde_json::json!({"no_rope_layer_interval": 2, "interleave_moe_layer_step": 2}),
        ),
    ] {
        let written = fixture_config(arch);
        let mut minimal = written.clone();
        for key in drop {
            assert!(minimal.as_object_mut().unwrap().remove(*key).is_some(), "{arch}: {key}");
        }
        for (k, v) in add.as_object().unwrap() {
            minimal[k] = v.clone();
        }
        let (a, b) = (normalise(&written).unwrap(), normalise(&minimal).unwrap());
        assert_eq!(a, b, "{arch}: derived keys differ");
        assert!(a.rope_layers.contains(&false), "{arch}: a RoPE-free layer");
    }
    // Llama 4 without a chunk size has no chunked layers; with `use_qk_norm: false`, no L2 norm.
    let mut config = fixture_config("llama4");
    for key in ["layer_types", "attention_chunk_size"] {
        config.as_object_mut().unwrap().remove(key);
    }
    config["use_qk_norm"] = false.into();
    let c = normalise(&config).unwrap();
    assert_eq!(c.attention_chunk, vec![None, None]);
    assert_eq!(c.qk_norm, ember_model::config::QkNorm::None);
    // Chunked layers need a positive chunk size.
    let mut config = fixture_config("llama4");
    config["attention_chunk_size"] = 0.into();
    let err = normalise(&config).unwrap_err().to_string();
    assert!(err.contains("attention_chunk_size"), "{err}");
}

/// OLMo 3 in transformers-4 style (`rope_theta` + `rope_scaling`): theta and scaling are the
/// global layers'; the sliding layers get Olmo3Config's default θ 5e5 unscaled, whatever
/// `rope_theta` says (its conversion pops `rope_theta` for the global layers first; checked in
/// transformers 5.24: `Olmo3Config(rope_theta=1e4, rope_scaling=yarn)` gives sliding θ 5e5).
#[test]
fn olmo3_v4_style_rope_applies_to_global_layers() {
    let mut config = fixture_config("olmo3");
    let full = config["rope_parameters"]["full_attention"].clone();
    config.as_object_mut().unwrap().remove("rope_parameters");
    config["rope_theta"] = 10000.0.into();
    let mut scaling = full.clone();
    scaling.as_object_mut().unwrap().remove("rope_theta");
    config["rope_scaling"] = scaling;
    let c = normalise(&config).unwrap();
    let plain = normalise(&fixture_config("olmo3")).unwrap();
    assert_eq!(c.rope.theta, 10000.0);
    assert_eq!(c.rope.scaling, plain.rope.scaling, "global layers keep the scaling");
    let local = c.local_rope.unwrap();
    assert_eq!(local.theta, 500000.0, "Olmo3Config's default theta");
    assert_eq!(local.scaling, ember_model::config::RopeScaling::Default);
}

/// Multi-token-prediction layers (`mtp.*`, speculative-decoding heads some 2025–26 checkpoints
/// carry) are skipped, not refused, and reported; any other unknown tensor is still refused.
#[test]
fn mtp_layers_are_ignored() {
    let dir = llama_copy("mtp", |t| {
        t.push(("mtp.layers.0.eh_proj.weight".into(), vec![0.5; 64 * 128], vec![64, 128]));
        t.push(("mtp.norm.weight".into(), vec![1.0; 64], vec![64]));
    });
    let model = load(&dir).unwrap();
    assert_eq!(model.ignored_components, vec![("mtp".to_string(), 2)]);
    assert!(llama_logits_diff(&dir) <= 1e-4);
    let dir = llama_copy("not_mtp", |t| {
        t.push(("model.extra.weight".into(), vec![0.5; 64], vec![64]));
    });
    let err = load(&dir).unwrap_err().to_string();
    assert!(err.contains("model.extra.weight"), "{err}");
}

/// Gemma 4 configs as the hub ships them leave out what transformers 5.24's `Gemma4TextConfig`
/// derives: layer types (every 6th layer full, the last one forced full), per-layer-type RoPE
/// (sliding θ 1e4; full proportional, a quarter of `global_head_dim` 512 rotated, θ 1e6) and
/// per-layer inputs 256 wide. Errors name the key.
#[test]
fn gemma4_defaults_and_errors_follow_transformers() {
    use ember_model::config::RopeScaling;
    let mut config = fixture_config("gemma4");
    for key in [
        "layer_types",
        "rope_parameters",
        "per_layer_config",
        "hidden_size_per_layer_input",
        "num_kv_shared_layers",
        "attention_k_eq_v",
    ] {
        config.as_object_mut().unwrap().remove(key);
    }
    config["num_hidden_layers"] = 7.into();
    let c = normalise(&config).unwrap();
    let full: Vec<usize> = (0..7).filter(|&i| c.sliding_window[i].is_none()).collect();
    assert_eq!(full, vec![5, 6], "every 6th layer full, and the last");
    assert_eq!(c.layer_shapes[5].head_dim, 512, "global_head_dim's default");
    assert_eq!(c.layer_shapes[0].head_dim, 16);
    assert_eq!(
        c.layer_shapes[5].num_kv_heads, 2,
        "global KV heads only with attention_k_eq_v"
    );
    assert!(c
        .layer_shapes
        .iter()
        .all(|s| !s.values_from_keys && s.kv_shared_from.is_none()));
    assert_eq!(c.rope.rotary_dim, 512);
    assert_eq!(
        c.rope.scaling,
        RopeScaling::Proportional {
            factor: 1.0,
            rope_angles: 64
        }
    );
    assert_eq!(c.rope.theta, 1e6);
    let local = c.local_rope.as_ref().unwrap();
    assert_eq!((local.theta, local.rotary_dim), (1e4, 16));
    assert_eq!(c.per_layer_inputs.unwrap().width, 256);
    assert_eq!(c.attn_scale, 1.0);
    assert!(!c.norm_unit_offset, "Gemma 4 norms scale by w");

    // The unified decoder has no per-layer inputs unless its config asks.
    let mut unified = fixture_config("gemma4_unified");
    unified.as_object_mut().unwrap().remove("rope_parameters");
    assert!(normalise(&unified).unwrap().per_layer_inputs.is_none());

    assert_config_errors(
        "gemma4",
        &[
            (
                serde_json::json!({"per_layer_config": {"1": {"sliding_window": 4}}}),
                "per_layer_config.1.sliding_window",
            ),
            (
                serde_json::json!({"per_layer_config": {"9": {"head_dim": 32}}}),
                "per_layer_config.9",
            ),
            (
                serde_json::json!({"layer_types": ["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
                                   "num_kv_shared_layers": 3, "per_layer_config": null}),
                "num_kv_shared_layers",
            ),
            (serde_json::json!({"num_kv_shared_layers": 4}), "num_kv_shared_layers"),
            (
                serde_json::json!({"use_bidirectional_attention": "all"}),
                "use_bidirectional_attention",
            ),
            (
                serde_json::json!({"enable_moe_block": true, "num_experts": 4, "moe_intermediate_size": 8}),
                "top_k_experts",
            ),
        ],
    );
}

/// GLM-4.5 checkpoints store their multi-token-prediction layer as one more decoder layer
/// (`model.layers.{n}.…`, which transformers ignores): skipped and reported, while any other
/// extra layer is still refused. DeepSeek routing settings that cannot route are named.
#[test]
fn glm4_moe_skips_trailing_mtp_layers_and_checks_routing() {
    let src = fixtures().join("glm4_moe");
    let dir = tempdir("glm4-mtp");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = Vec::new();
    let weights = Weights::open_dir(&src).unwrap();
    for key in weights.keys() {
        let (shape, _) = weights.info(key).unwrap();
        let values = weights.read_f32(key, &shape).unwrap();
        tensors.push((key.clone(), f32_bytes(&values), shape.clone(), Dtype::F32));
        if let Some(rest) = key.strip_prefix("model.layers.1.") {
            // The MTP layer is a copy of the last layer's shapes at index 2.
            tensors.push((format!("model.layers.2.{rest}"), f32_bytes(&values), shape, Dtype::F32));
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    let model = load(&dir).unwrap();
    assert_eq!(model.ignored_components.len(), 1);
    assert!(model.ignored_components[0]
        .0
        .contains("model.layers.2 (multi-token prediction)"));
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["num_nextn_predict_layers"] = 0.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = load(&dir).unwrap_err().to_string();
    assert!(err.contains("model.layers.2."), "{err}");
    let _ = std::fs::remove_dir_all(&dir);

    assert_config_errors(
        "glm4_moe",
        &[
            (serde_json::json!({"n_group": 3}), "n_group"),
            (serde_json::json!({"n_group": 8}), "n_group"),
            (serde_json::json!({"topk_group": 5}), "topk_group"),
            (
                serde_json::json!({"topk_group": 1, "num_experts_per_tok": 3}),
                "topk_group",
            ),
            (serde_json::json!({"mlp_layer_types": ["dense"]}), "mlp_layer_types"),
            (
                serde_json::json!({"mlp_layer_types": ["dense", "moe"]}),
                "mlp_layer_types",
            ),
        ],
    );
    // Without `use_qk_norm` (GLM-4.5's default) there is no q/k norm, and the partial rotary
    // factor defaults to 0.5.
    let mut config = fixture_config("glm4_moe");
    config.as_object_mut().unwrap().remove("use_qk_norm");
    config.as_object_mut().unwrap().remove("rope_parameters");
    let c = normalise(&config).unwrap();
    assert_eq!(c.qk_norm, ember_model::config::QkNorm::None);
    assert_eq!(c.rope.rotary_dim, 8);
}

/// GLM-5's sparse-attention indexers are skipped and reported; the sequence length up to which
/// they keep every key (`index_topk`) bounds what Ember runs, with an error naming it beyond.
#[test]
fn glm_moe_dsa_skips_indexers_and_refuses_longer_sequences() {
    let model = load(&fixtures().join("glm_moe_dsa")).unwrap();
    // Layer 0 runs an indexer (wq_b, wk, k_norm weight and bias, weights_proj); layer 1 shares it.
    assert_eq!(
        model.ignored_components,
        vec![(
            "sparse-attention indexers (every key kept up to 32 positions)".to_string(),
            5
        )]
    );
    let config = model.config();
    assert_eq!(config.max_exact_positions(), Some(32));
    config.check_sequence_length(32).unwrap();
    let err = config.check_sequence_length(33).unwrap_err().to_string();
    assert!(err.contains("33 positions") && err.contains("index_topk"), "{err}");
    assert_config_errors(
        "glm_moe_dsa",
        &[
            (serde_json::json!({"q_lora_rank": null}), "q_lora_rank"),
            (serde_json::json!({"index_topk": 0}), "index_topk"),
        ],
    );
    // transformers' default: 2048 keys.
    let mut config = fixture_config("glm_moe_dsa");
    config.as_object_mut().unwrap().remove("index_topk");
    assert_eq!(normalise(&config).unwrap().max_exact_positions(), Some(2048));
    // Other families run any length.
    assert_eq!(
        normalise(&fixture_config("deepseek_v3")).unwrap().max_exact_positions(),
        None
    );
}

/// Absent DeepSeek-style keys take each config class's own defaults (they differ between
/// DeepSeek-V3, GLM and Mistral 4), as do the latent attention sizes.
#[test]
fn deepseek_style_defaults_follow_each_config_class() {
    use ember_model::config::{GroupScores, QueryScale, Routing};
    let strip = |arch: &str, keys: &[&str]| {
        let mut config = fixture_config(arch);
        let object = config.as_object_mut().unwrap();
        for key in keys {
            object.remove(*key);
        }
        // Enough experts for DeepSeek-V3's 8 groups.
        object.insert("n_routed_experts".into(), 16.into());
        config
    };
    let routing_keys = [
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "first_k_dense_replace",
        "mlp_layer_types",
    ];
    let cases = [
        ("deepseek_v3", GroupScores::Sigmoid, 8, 4, 2.5, vec![false, false]),
        ("glm4_moe", GroupScores::Sigmoid, 1, 1, 1.0, vec![false, true]),
        ("glm4_moe_lite", GroupScores::Sigmoid, 1, 1, 1.8, vec![false, true]),
        ("glm_moe_dsa", GroupScores::Sigmoid, 1, 1, 2.5, vec![false, false]),
        ("mistral4", GroupScores::Softmax, 1, 1, 1.0, vec![true, true]),
    ];
    for (arch, scores, groups, top_groups, scaling, sparse) in cases {
        let moe = normalise(&strip(arch, &routing_keys)).unwrap().moe.unwrap();
        assert_eq!(
            moe.routing,
            Routing::GroupLimited {
                scores,
                groups,
                top_groups,
                renormalize: true,
                scaling
            },
            "{arch}"
        );
        assert_eq!(moe.sparse_layers, sparse, "{arch}");
    }
    let latent_keys = [
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    ];
    for (arch, q, kv, nope, rope, v) in [
        ("deepseek_v3", 1536, 512, 128, 64, 128),
        ("glm4_moe_lite", 768, 512, 192, 64, 256),
        ("glm_moe_dsa", 2048, 512, 192, 64, 256),
        ("mistral4", 1024, 256, 64, 64, 128),
    ] {
        let mla = normalise(&strip(arch, &latent_keys)).unwrap().latent_attention.unwrap();
        assert_eq!(
            (mla.q_lora_rank, mla.kv_lora_rank, mla.nope_dim, mla.rope_dim, mla.v_dim),
            (Some(q), kv, nope, rope, v),
            "{arch}"
        );
    }
    // Mistral 4 without rope_parameters: transformers' YaRN ×128 over 8192 positions with
    // the query scale β 0.1.
    let c = normalise(&strip("mistral4", &["rope_parameters"])).unwrap();
    assert_eq!(
        c.query_scale,
        Some(QueryScale::LogPosition {
            beta: 0.1,
            original: 8192.0
        })
    );
}
