//! Greedy generation against transformers' `generate` on the llama fixture, with and without
//! the KV cache, alone and in a left-padded batch.
//!
//! Reference: `tests/fixtures/llama/expected.json` → `generation` (greedy, 10 new tokens from
//! [1, 36, 71, 67], base and `adapter_trained`), made by `../shared/fixtures/_generator/gen_fixtures.py`.

mod common;

use common::*;
use ember_lora::AdapterFiles;
use ember_model::generate::{generate, GenerationConfig};
use ember_model::CausalLm;

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("llama/expected.json")).unwrap()).unwrap()
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
    let e = expected();
    let g = &e["generation"];
    let prompt = ids(&g["prompt_ids"]);
    let device = Default::default();
    let base = CausalLm::<TestBackend>::from_dir(&fixtures().join("llama"), &device).unwrap();
    let mut adapted = CausalLm::<TestBackend>::from_dir(&fixtures().join("llama"), &device).unwrap();
    adapted
        .load_adapter(
            &AdapterFiles::read(&fixtures().join("llama/adapter_trained")).unwrap(),
            &device,
        )
        .unwrap();
    for use_cache in [true, false] {
        let config = GenerationConfig {
            max_new_tokens: 10,
            use_cache,
            eos_token_ids: vec![2],
            ..Default::default()
        };
        let out = generate(
            &base,
            std::slice::from_ref(&prompt),
            &config,
            0,
            |_, _| {},
            |_, _| false,
        );
        assert_eq!(out[0], ids(&g["base_new_tokens"]), "base, cache {use_cache}");
        let out = generate(
            &adapted,
            std::slice::from_ref(&prompt),
            &config,
            0,
            |_, _| {},
            |_, _| false,
        );
        assert_eq!(
            out[0],
            ids(&g["trained_adapter_new_tokens"]),
            "adapter, cache {use_cache}"
        );
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
