//! Greedy generation against transformers' `generate`, with and without the KV cache, alone
//! and in a left-padded batch.
//!
//! References: `expected.json` → `generation` (greedy, 10 new tokens, base and
//! `adapter_trained`) of the llama fixture (`../shared/fixtures/_generator/gen_fixtures.py`)
//! and of every 2026 family (`tests/fixtures/gen_families_2026.py`, eos disabled, each checked
//! there against a cache-free argmax loop).

mod common;

use common::*;
use ember_lora::AdapterFiles;
use ember_model::generate::{generate, GenerationConfig};
use ember_model::CausalLm;

fn expected(arch: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_cache() {
    let with_reference: Vec<String> = families()
        .into_iter()
        .filter(|arch| expected(arch).get("generation").is_some())
        .collect();
    assert!(with_reference.len() >= 5, "{with_reference:?}");
    for arch in &with_reference {
        let e = expected(arch);
        let g = &e["generation"];
        let prompt = ids(&g["prompt_ids"]);
        let device = Default::default();
        let base = CausalLm::<TestBackend>::from_dir(&fixtures().join(arch), &device).unwrap();
        let mut adapted = CausalLm::<TestBackend>::from_dir(&fixtures().join(arch), &device).unwrap();
        adapted
            .load_adapter(
                &AdapterFiles::read(&fixtures().join(arch).join("adapter_trained")).unwrap(),
                &device,
            )
            .unwrap();
        for use_cache in [true, false] {
            // eos is never generated in the llama reference and disabled in the others.
            let config = GenerationConfig {
                max_new_tokens: 10,
                use_cache,
                eos_token_ids: vec![],
                ..Default::default()
            };
            let run = |model: &CausalLm<TestBackend>| {
                generate(
                    model,
                    std::slice::from_ref(&prompt),
                    &config,
                    0,
                    |_, _| {},
                    |_, _| false,
                )
                .remove(0)
            };
            assert_eq!(run(&base), ids(&g["base_new_tokens"]), "{arch} base, cache {use_cache}");
            assert_eq!(
                run(&adapted),
                ids(&g["trained_adapter_new_tokens"]),
                "{arch} adapter, cache {use_cache}"
            );
        }
    }
}

#[test]
fn left_padded_batch_gives_each_prompt_its_own_tokens() {
    let device = Default::default();
    let model = CausalLm::<TestBackend>::from_dir(&fixtures().join("qwen2"), &device).unwrap();
    let prompts = vec![
        vec![1, 36, 71, 67, 332, 383, 321],
        vec![1, 52],
        vec![1, 52, 295, 324, 268],
    ];
    let config = GenerationConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let batched = generate(&model, &prompts, &config, 0, |_, _| {}, |_, _| false);
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(p), &config, 0, |_, _| {}, |_, _| false);
        assert_eq!(batched[i], alone[0], "prompt {i}");
    }
}

#[test]
fn sampling_is_seeded_and_stops_at_eos() {
    let device = Default::default();
    let model = CausalLm::<TestBackend>::from_dir(&fixtures().join("llama"), &device).unwrap();
    let prompt = vec![1, 36, 71, 67];
    let config = GenerationConfig {
        max_new_tokens: 12,
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
        seed: 7,
        ..Default::default()
    };
    let a = generate(
        &model,
        std::slice::from_ref(&prompt),
        &config,
        0,
        |_, _| {},
        |_, _| false,
    );
    let b = generate(
        &model,
        std::slice::from_ref(&prompt),
        &config,
        0,
        |_, _| {},
        |_, _| false,
    );
    assert_eq!(a, b, "same seed, same tokens");
    assert_eq!(a[0].len(), 12);
    let first = a[0][0];
    let stop = GenerationConfig {
        eos_token_ids: vec![first],
        ..config
    };
    let c = generate(&model, std::slice::from_ref(&prompt), &stop, 0, |_, _| {}, |_, _| false);
    assert_eq!(c[0], vec![first], "stops right after an eos token");
}

/// Every family's KV-cache path (sliding windows, per-layer RoPE, soft-caps, sinks, MoE routing,
/// fused projections) gives the tokens of full forwards, past the fixtures' 8-token window, and
/// a left-padded batch gives each prompt its own tokens.
#[test]
fn cached_generation_equals_full_forwards_for_every_family() {
    let device = Default::default();
    let prompts = vec![vec![1, 36, 71, 67, 332, 383, 321], vec![1, 52]];
    for arch in families() {
        let arch = arch.as_str();
        let model = CausalLm::<TestBackend>::from_dir(&fixtures().join(arch), &device).unwrap();
        let config = |use_cache| GenerationConfig {
            max_new_tokens: 12,
            use_cache,
            ..Default::default()
        };
        let cached = generate(&model, &prompts[..1], &config(true), 0, |_, _| {}, |_, _| false);
        let full = generate(&model, &prompts[..1], &config(false), 0, |_, _| {}, |_, _| false);
        assert_eq!(cached, full, "{arch}: cache vs full forwards");
        assert_eq!(cached[0].len(), 12, "{arch}");
        let batched = generate(&model, &prompts, &config(true), 0, |_, _| {}, |_, _| false);
        assert_eq!(batched[0], cached[0], "{arch}: long prompt in a batch");
        let alone = generate(&model, &prompts[1..], &config(true), 0, |_, _| {}, |_, _| false);
        assert_eq!(batched[1], alone[0], "{arch}: left-padded prompt in a batch");
    }
}
