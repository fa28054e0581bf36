//! A bf16/f16 frozen base trains like the f32 one, on the CPU (burn-flex's bf16 tensors, and
//! burn-ndarray's host bf16 blocks, multiplied on AMX tiles where the CPU has them); gradient
//! checkpointing gives the same trace as keeping every activation.
//!
//! From `adapter_random_b`, five full-batch AdamW steps (lr 1e-2) against PEFT 0.21.2's f32
//! trace (`expected.json` → `lora.train.losses_before_each_step`): the half-precision runs stay
//! within 2e-2 relative per step, the LoRA weights, their gradients and AdamW's moments stay f32.

mod common;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::DType;
use ember_lora::AdapterFiles;
use ember_model::{BaseDtype, CausalLm};
use ember_train::optim::AdamW;
use ember_train::Trainer;

use common::{fixture_batch, fixtures, reference_losses};

/// Five steps on backend `B` with the base in `dtype`; returns the losses.
fn trace<B: ember_lora::EmberAutodiffBackend>(arch: &str, dtype: BaseDtype) -> Vec<f64> {
    let device = Default::default();
    let mut model = CausalLm::<B>::from_path_as(&fixtures().join(arch), &device, dtype).unwrap();
    let files = AdapterFiles::read(&fixtures().join(arch).join("adapter_random_b")).unwrap();
    model.load_adapter(&files, &device).unwrap();
    let mut t = Trainer::new(model, AdamW::new((0.9, 0.999), 1e-8, 0.0), None, 0, device);
    let batch = fixture_batch(arch);
    let grads = t.gradients(&batch);
    for (name, g) in &grads {
        assert_eq!(g.dtype(), DType::F32, "{arch} {dtype}: gradient of {name}");
    }
    let losses: Vec<f64> = (0..5)
        .map(|_| t.train_step(std::slice::from_ref(&batch), 0.01).unwrap().loss)
        .collect();
    for (path, layer) in t.model.linear_layers() {
        // MoE routers stay f32 whatever the base dtype (top-k choices must not flip).
        let router = path.ends_with(".gate") || path.contains("router");
        // burn-ndarray has no bf16 tensors: a bf16 base is held there as host bf16 blocks, its
        // stacked experts in f32.
        let host_bf16 = dtype == BaseDtype::Bfloat16 && B::bf16_base_on_host(&Default::default());
        let want = if router || (host_bf16 && path.contains(".experts.")) {
            "float32".to_string()
        } else if host_bf16 {
            "BF16".to_string()
        } else {
            dtype.to_string()
        };
        assert_eq!(layer.weight.storage(), want, "{path}");
        if let Some(adapter) = &layer.adapter {
            assert_eq!(adapter.lora_a.val().dtype(), DType::F32, "{path}");
            assert_eq!(adapter.lora_b.val().dtype(), DType::F32, "{path}");
        }
    }
    assert_eq!(
        grads.len(),
        2 * files.tensors.len(),
        "{arch}: one gradient per LoRA matrix"
    );
    losses
}

fn assert_trace(what: &str, got: &[f64], want: &[f64], tol: f64) {
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        println!("{what} step {step}: {g:.6} vs {w:.6} (rel {rel:.2e})");
        assert!(
            rel <= tol,
            "{what} step {step}: {g} vs {w}, relative {rel:.2e} > {tol:.0e}"
        );
    }
}

/// A dense model with an untied head, a tied one with biases (qwen2) and a MoE (mixtral).
#[test]
fn half_precision_bases_train_within_2e_2_of_the_f32_trace() {
    for arch in ["llama", "qwen2", "mixtral"] {
        let want = reference_losses(arch);
        assert_trace(
            &format!("{arch} flex f32"),
            &trace::<Autodiff<Flex>>(arch, BaseDtype::Float32),
            &want,
            1e-4,
        );
        for dtype in [BaseDtype::Bfloat16, BaseDtype::Float16] {
            let got = trace::<Autodiff<Flex>>(arch, dtype);
            assert!(
                got.iter().zip(&want).any(|(g, w)| g != w),
                "{arch} {dtype}: no rounding at all?"
            );
            assert_trace(&format!("{arch} {dtype}"), &got, &want, 2e-2);
        }
        let got = trace::<Autodiff<NdArray<f32>>>(arch, BaseDtype::Bfloat16);
        assert!(
            got.iter().zip(&want).any(|(g, w)| g != w),
            "{arch} ndarray bf16: no rounding at all?"
        );
        let amx = ember_lora::amx::available();
        assert_trace(&format!("{arch} ndarray bf16 (AMX: {amx})"), &got, &want, 2e-2);
    }
}

/// burn's balanced checkpointing (recompute in the backward pass) reproduces PEFT's trace
/// within the golden tolerance on both CPU backends and with a bf16 base.
#[test]
fn gradient_checkpointing_gives_the_same_trace() {
    let want = reference_losses("llama");
    let ndarray = trace::<Autodiff<NdArray<f32>, BalancedCheckpointing>>("llama", BaseDtype::Float32);
    assert_trace("llama ndarray checkpointed", &ndarray, &want, 1e-4);
    let plain = trace::<Autodiff<Flex>>("llama", BaseDtype::Bfloat16);
    let checkpointed = trace::<Autodiff<Flex, BalancedCheckpointing>>("llama", BaseDtype::Bfloat16);
    assert_trace("llama bf16 checkpointed", &checkpointed, &plain, 1e-6);
}
