//! A quantized frozen base (QLoRA) trains as the same weights dequantized to f32.
//!
//! `tests/fixtures/gguf_arch/llama_q.gguf` is the llama fixture written as llama.cpp writes a
//! llama GGUF (q/k rows permuted) with its 2-d weights quantized by gguf-py (Q8_0: embedding,
//! head, attention; Q4_0: MLP). Loaded with `base_dtype: gguf` its blocks stay as stored and
//! every product runs through Ember's fused dequantize-and-multiply op; loaded as `float32`
//! the same file is dequantized on load. Same weights, different summation order: the first
//! step's loss within 1e-4 relative (issue 14), and so does the rest of a five-step AdamW trace
//! from `adapter_random_b`, with the LoRA gradients of the first step within 1e-4 of their
//! largest magnitude.

mod common;

use std::collections::BTreeMap;

use burn::backend::{Autodiff, NdArray};
use ember_lora::{AdapterFiles, QuantFormat};
use ember_model::{BaseDtype, CausalLm};
use ember_train::optim::AdamW;
use ember_train::Trainer;

use common::{fixture_batch, fixtures};

type B = Autodiff<NdArray<f32>>;

struct Run {
    losses: Vec<f64>,
    grads: BTreeMap<String, Vec<f32>>,
}

fn train(dtype: BaseDtype) -> Run {
    let device = Default::default();
    let path = fixtures().join("gguf_arch/llama_q.gguf");
    let mut model = CausalLm::<B>::from_path_as(&path, &device, dtype).unwrap();
    let files = AdapterFiles::read(&fixtures().join("llama/adapter_random_b")).unwrap();
    model.load_adapter(&files, &device).unwrap();
    if dtype == BaseDtype::Gguf {
        for (path, layer) in model.linear_layers() {
            let q = layer
                .weight
                .quantized()
                .unwrap_or_else(|| panic!("{path}: kept quantized"));
            let want = if path.contains(".mlp.") {
                QuantFormat::Q4_0
            } else {
                QuantFormat::Q8_0
            };
            assert_eq!(q.format(), want, "{path}");
            // q/k rows are reordered (llama.cpp's permutation undone), so they own their
            // blocks; every other weight is read in place from the mapped file.
            let permuted = path.ends_with("q_proj") || path.ends_with("k_proj");
            assert_eq!(q.is_shared(), !permuted, "{path}: read in place");
        }
    } else {
        for (path, layer) in model.linear_layers() {
            assert!(layer.weight.dense().is_some(), "{path}: dequantized on load");
        }
    }
    let mut t = Trainer::new(model, AdamW::new((0.9, 0.999), 1e-8, 0.0), None, 0, device);
    let batch = fixture_batch("llama");
    let grads = t
        .gradients(&batch)
        .into_iter()
        .map(|(name, g)| (name, g.into_data().to_vec::<f32>().unwrap()))
        .collect();
    let losses = (0..5)
        .map(|_| t.train_step(std::slice::from_ref(&batch), 0.01).unwrap().loss)
        .collect();
    Run { losses, grads }
}

#[test]
fn a_gguf_base_kept_quantized_trains_as_its_f32_dequantization() {
    let quantized = train(BaseDtype::Gguf);
    let dense = train(BaseDtype::Float32);
    for (step, (q, d)) in quantized.losses.iter().zip(&dense.losses).enumerate() {
        let rel = (q - d).abs() / d.abs();
        println!("step {step}: gguf {q:.7} vs float32 {d:.7} (rel {rel:.2e})");
        assert!(rel <= 1e-4, "step {step}: {q} vs {d}, relative {rel:.2e} > 1e-4");
    }
    assert_eq!(quantized.grads.len(), dense.grads.len());
    for (name, d) in &dense.grads {
        let q = &quantized.grads[name];
        let scale = d.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = q.iter().zip(d).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0, "{name}: a zero gradient tests nothing");
        assert!(
            diff <= 1e-4 * scale,
            "{name}: gradient differs by {diff:.2e} of {scale:.2e}"
        );
    }
}
