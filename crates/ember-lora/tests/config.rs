//! PEFT's target-matching rules and config handling, as a table.
//!
//! Rules from PEFT 0.21.2 `check_target_module_exists`, `get_pattern_key` and
//! `_maybe_include_all_linear_layers`.

use std::path::Path;

use ember_lora::config::layer_index;
use ember_lora::{LoraConfig, LoraError, TargetModules};
use serde_json::json;

fn list(items: &[&str]) -> TargetModules {
    TargetModules::List(items.iter().map(|s| s.to_string()).collect())
}

#[test]
fn target_matching_follows_peft() {
    let q = "model.layers.0.self_attn.q_proj";
    let down3 = "model.layers.3.mlp.down_proj";
    let head = "lm_head";
    let cases: Vec<(LoraConfig, &str, bool, bool)> = vec![
        // (config, path, is_output_head, expected)
        (
            LoraConfig {
                target_modules: list(&["q_proj"]),
                ..Default::default()
            },
            q,
            false,
            true,
        ),
        (
            LoraConfig {
                target_modules: list(&["proj"]),
                ..Default::default()
            },
            q,
            false,
            false,
        ),
        (
            LoraConfig {
                target_modules: list(&["self_attn.q_proj"]),
                ..Default::default()
            },
            q,
            false,
            true,
        ),
        (
            LoraConfig {
                target_modules: list(&[q]),
                ..Default::default()
            },
            q,
            false,
            true,
        ),
        (
            LoraConfig {
                target_modules: list(&["layers.0.self_attn.q_proj"]),
                ..Default::default()
            },
            q,
            false,
            true,
        ),
        (
            LoraConfig {
                target_modules: list(&["lm_head"]),
                ..Default::default()
            },
            head,
            true,
            true,
        ),
        // A string is a regex that must match the whole path.
        (
            LoraConfig {
                target_modules: TargetModules::Pattern(r".*\.(q|v)_proj".into()),
                ..Default::default()
            },
            q,
            false,
            true,
        ),
        (
            LoraConfig {
                target_modules: TargetModules::Pattern("q_proj".into()),
                ..Default::default()
            },
            q,
            false,
            false,
        ),
        (
            LoraConfig {
                target_modules: TargetModules::Pattern(r".*layers\.[12]\..*proj".into()),
                ..Default::default()
            },
            q,
            false,
            false,
        ),
        // all-linear: everything but the output head.
        (
            LoraConfig {
                target_modules: TargetModules::Pattern("all-linear".into()),
                ..Default::default()
            },
            down3,
            false,
            true,
        ),
        (
            LoraConfig {
                target_modules: TargetModules::Pattern("all-linear".into()),
                ..Default::default()
            },
            head,
            true,
            false,
        ),
        // exclude_modules: list (exact or suffix) and regex.
        (
            LoraConfig {
                target_modules: TargetModules::Pattern("all-linear".into()),
                exclude_modules: Some(list(&["down_proj"])),
                ..Default::default()
            },
            down3,
            false,
            false,
        ),
        (
            LoraConfig {
                target_modules: list(&["q_proj"]),
                exclude_modules: Some(TargetModules::Pattern(r".*layers\.0\..*".into())),
                ..Default::default()
            },
            q,
            false,
            false,
        ),
        // layers_to_transform applies to list targets matched by suffix.
        (
            LoraConfig {
                target_modules: list(&["down_proj"]),
                layers_to_transform: Some(vec![3]),
                ..Default::default()
            },
            down3,
            false,
            true,
        ),
        (
            LoraConfig {
                target_modules: list(&["q_proj"]),
                layers_to_transform: Some(vec![3]),
                ..Default::default()
            },
            q,
            false,
            false,
        ),
        // ...and to `all-linear`, which PEFT expands into a list of last names.
        (
            LoraConfig {
                target_modules: TargetModules::Pattern("all-linear".into()),
                layers_to_transform: Some(vec![3]),
                ..Default::default()
            },
            q,
            false,
            false,
        ),
        (
            LoraConfig {
                target_modules: TargetModules::Pattern("all-linear".into()),
                layers_to_transform: Some(vec![3]),
                ..Default::default()
            },
            down3,
            false,
            true,
        ),
        // ...but not to exact matches (PEFT checks `key in target_modules` first).
        (
            LoraConfig {
                target_modules: list(&[q]),
                layers_to_transform: Some(vec![3]),
                ..Default::default()
            },
            q,
            false,
            true,
        ),
    ];
    for (i, (config, path, head, expected)) in cases.iter().enumerate() {
        assert_eq!(
            config.targets(path, *head),
            *expected,
            "case {i}: {:?} on {path}",
            config.target_modules
        );
    }
}

#[test]
fn layer_index_is_the_first_numbered_segment() {
    assert_eq!(layer_index("model.layers.12.self_attn.q_proj"), Some(12));
    assert_eq!(layer_index("model.layers.1.mlp.experts.7.down_proj"), Some(1));
    assert_eq!(layer_index("lm_head"), None);
    assert_eq!(layer_index("model.norm"), None);
}

#[test]
fn rank_and_alpha_patterns_and_rslora() {
    let mut config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        ..Default::default()
    };
    config.rank_pattern.insert("q_proj".into(), json!(4));
    config.rank_pattern.insert(r"layers\.1\.mlp\..*".into(), json!(2));
    config.alpha_pattern.insert("down_proj".into(), json!(3));
    let q = config.module_lora("model.layers.0.self_attn.q_proj");
    assert_eq!((q.r, q.alpha, q.scaling), (4, 16.0, 4.0));
    let down = config.module_lora("model.layers.1.mlp.down_proj");
    assert_eq!((down.r, down.alpha), (2, 3.0));
    assert_eq!(down.scaling, 1.5);
    let v = config.module_lora("model.layers.0.self_attn.v_proj");
    assert_eq!((v.r, v.scaling), (8, 2.0));
    // "proj" is not a suffix match of "q_proj" segment-wise: `(.*\.)?(proj)$` needs a dot before.
    let mut c2 = LoraConfig::default();
    c2.rank_pattern.insert("proj".into(), json!(2));
    assert_eq!(c2.module_lora("model.layers.0.self_attn.q_proj").r, 8);
    let rs = LoraConfig {
        r: 16,
        lora_alpha: 8.0,
        use_rslora: true,
        ..Default::default()
    };
    assert_eq!(rs.module_lora("x.q_proj").scaling, 2.0);
}

#[test]
fn invalid_values_name_the_key() {
    let err = LoraConfig {
        r: 0,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("`r`") && err.contains("at least 1"), "{err}");
    let err = LoraConfig {
        lora_dropout: 1.5,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("lora_dropout"), "{err}");
    let err = LoraConfig {
        bias: "all".into(),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("bias"), "{err}");
    let err = LoraConfig {
        target_modules: TargetModules::Pattern("(".into()),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("target_modules") && err.contains("regex"), "{err}");
    let unknown: Result<LoraConfig, _> = serde_json::from_value(json!({"r": 4, "lora_alhpa": 8}));
    assert!(unknown.unwrap_err().to_string().contains("lora_alhpa"));
}

#[test]
fn unsupported_peft_features_are_refused() {
    let base = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
    let path = Path::new("adapter_config.json");
    assert!(LoraConfig::from_peft_json(&base, path).is_ok());
    for (key, value, needle) in [
        ("use_dora", json!(true), "DoRA"),
        ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
        ("peft_type", json!("IA3"), "IA3"),
        ("layer_replication", json!([[0, 1]]), "layer_replication"),
        ("fan_in_fan_out", json!(true), "fan_in_fan_out"),
    ] {
        let mut v = base.clone();
        v[key] = value;
        let err = LoraConfig::from_peft_json(&v, path).unwrap_err();
        assert!(matches!(err, LoraError::Unsupported { .. }), "{key}: {err}");
        assert!(err.to_string().contains(needle), "{key}: {err}");
    }
    let mut v = base.clone();
    v["r"] = json!(0);
    let err = LoraConfig::from_peft_json(&v, path).unwrap_err().to_string();
    assert!(err.contains("`r`") && err.contains("adapter_config.json"), "{err}");
}

#[test]
fn peft_json_round_trip() {
    let mut config = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        target_modules: list(&["q_proj", "v_proj"]),
        layers_to_transform: Some(vec![0, 2]),
        use_rslora: true,
        ..Default::default()
    };
    config.rank_pattern.insert("v_proj".into(), json!(8));
    let json = config.to_peft_json(Some("HuggingFaceTB/SmolLM2-135M-Instruct"), &[]);
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["lora_alpha"], json!(32));
    assert_eq!(json["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    let back = LoraConfig::from_peft_json(&json, Path::new("x")).unwrap();
    assert_eq!(back, config);
}

#[test]
fn all_linear_is_saved_resolved() {
    let config = LoraConfig {
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..Default::default()
    };
    let json = config.to_peft_json(
        None,
        &[
            "model.layers.0.self_attn.q_proj".into(),
            "model.layers.0.mlp.up_proj".into(),
            "model.layers.1.self_attn.q_proj".into(),
        ],
    );
    assert_eq!(
        json["target_modules"],
        json!([
            "model.layers.0.mlp.up_proj",
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj"
        ])
    );
}

/// PEFT 0.21.2's rewrite of targets on a MoE model whose experts transformers 5 fuses (values
/// from `get_peft_model` on the qwen3_moe and glm4_moe fixtures).
#[test]
fn fused_moe_targets_follow_peft() {
    use ember_lora::{FusedMoeTargets, MoeTargetPaths};
    const QWEN: FusedMoeTargets = FusedMoeTargets {
        renames: &[
            ("gate", "gate.weight"),
            ("gate_proj", "gate_up_proj"),
            ("up_proj", "gate_up_proj"),
            ("down_proj", "down_proj"),
        ],
        fused: &[("gate_up_proj", &["gate_proj", "up_proj"])],
        renamed_modules: &[],
    };
    let mut paths = MoeTargetPaths::default();
    for layer in 0..2 {
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            paths.linear.push(format!("model.layers.{layer}.self_attn.{m}"));
        }
    }
    // glm4_moe: a dense layer 0 and shared experts, linear layers that the rewrite drops.
    for m in ["gate_proj", "up_proj", "down_proj"] {
        paths.linear.push(format!("model.layers.0.mlp.{m}"));
        paths.linear.push(format!("model.layers.1.mlp.shared_experts.{m}"));
    }
    paths.other = vec!["model.layers.1.mlp.gate".into(), "model.layers.1.mlp.experts".into()];
    paths.expert_containers = vec!["model.layers.1.mlp.experts".into()];
    let base = LoraConfig {
        r: 2,
        lora_alpha: 3.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..Default::default()
    };
    let all = base.with_fused_moe_targets(&QWEN, &paths).unwrap();
    assert_eq!(all.target_modules, list(&["q_proj", "k_proj", "v_proj", "o_proj"]));
    assert_eq!(all.target_parameters, vec!["gate_up_proj", "down_proj", "gate.weight"]);
    assert_eq!(all.rank_pattern[r".*\.gate_up_proj"], 4);
    assert_eq!(all.alpha_pattern[r".*\.gate_up_proj"], 6);
    assert!(all.targets_parameter("model.layers.1.mlp.gate.weight"));
    assert!(all.targets_parameter("model.layers.1.mlp.experts.gate_up_proj"));
    assert!(
        !all.targets("model.layers.0.mlp.down_proj", false),
        "the dense MLP loses its LoRA"
    );
    assert_eq!(all.module_lora("model.layers.1.mlp.experts.gate_up_proj").r, 4);
    // Applying it again changes nothing (a saved adapter's config is already rewritten).
    assert_eq!(all.with_fused_moe_targets(&QWEN, &paths).unwrap(), all);

    // A list: the v4 expert names become parameters, the router only when named.
    let listed = LoraConfig {
        target_modules: list(&["q_proj", "gate_proj", "up_proj", "down_proj"]),
        ..base.clone()
    };
    let listed = listed.with_fused_moe_targets(&QWEN, &paths).unwrap();
    assert_eq!(listed.target_modules, list(&["q_proj"]));
    assert_eq!(listed.target_parameters, vec!["gate_up_proj", "down_proj"]);

    // A regex naming the experts' v4 modules is probed inside the expert container.
    let regex = LoraConfig {
        target_modules: TargetModules::Pattern(r".*\.(q_proj|gate_proj|up_proj)".into()),
        ..base.clone()
    };
    let regex = regex.with_fused_moe_targets(&QWEN, &paths).unwrap();
    assert_eq!(regex.target_parameters, vec!["gate_up_proj"]);
    assert_eq!(regex.target_modules, list(&["q_proj"]));

    // Half of a fused pair is refused, naming both halves.
    let half = LoraConfig {
        target_modules: list(&["gate_proj"]),
        ..base
    };
    let err = half.with_fused_moe_targets(&QWEN, &paths).unwrap_err().to_string();
    assert!(err.contains("gate_proj") && err.contains("up_proj"), "{err}");
}

/// PEFT's flat expert layout and Ember's per-expert one convert both ways, for every storage:
/// plain, gpt-oss's interleaved gate/up, Llama 4's swapped roles.
#[test]
fn flat_expert_lora_round_trips() {
    use ember_lora::expert::{join_flat, split_flat};
    use ember_lora::{AdapterTensors, ExpertLoraLayout};
    let (experts, r, out, inp) = (3, 2, 4, 5);
    for swap_roles in [false, true] {
        for interleaved_gate_up in [false, true] {
            let layout = ExpertLoraLayout {
                swap_roles,
                interleaved_gate_up,
            };
            let (a_shape, b_shape) = layout.flat_shapes(experts, r, out, inp);
            let flat = AdapterTensors {
                lora_a: (0..a_shape[0] * a_shape[1]).map(|i| i as f32).collect(),
                a_shape,
                lora_b: (0..b_shape[0] * b_shape[1]).map(|i| -(i as f32)).collect(),
                b_shape,
            };
            let per = split_flat(&flat, experts, layout, "test").unwrap();
            assert_eq!(per.len(), experts);
            assert_eq!((per[0].a_shape, per[0].b_shape), ([r, inp], [out, r]));
            assert_eq!(join_flat(&per, layout), flat, "{layout:?}");
        }
    }
    // Expert e's rows of A are e·r..(e+1)·r; its columns of B are j·E + e (PEFT's reshapes).
    let layout = ExpertLoraLayout::default();
    let (a_shape, b_shape) = layout.flat_shapes(experts, r, out, inp);
    let flat = AdapterTensors {
        lora_a: (0..a_shape[0] * a_shape[1]).map(|i| i as f32).collect(),
        a_shape,
        lora_b: (0..b_shape[0] * b_shape[1]).map(|i| i as f32).collect(),
        b_shape,
    };
    let per = split_flat(&flat, experts, layout, "test").unwrap();
    assert_eq!(per[1].lora_a[0], (r * inp) as f32);
    assert_eq!(per[1].lora_b[..2], [1.0, (1 + experts) as f32]);
}
