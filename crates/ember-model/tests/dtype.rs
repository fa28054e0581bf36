//! Half-precision frozen bases on the CPU (burn-flex: stored in bf16/f16, multiplied in that
//! dtype with f32 activations; burn-ndarray: bf16 host blocks, multiplied on AMX tiles with the
//! activations rounded to bf16 where the CPU has them), against transformers 5.24's references
//! for `llama/bf16/`.
//!
//! `logits_bf16_weights_f32_compute` is transformers with the bf16 weights upcast to f32;
//! `logits_bf16_compute` is transformers computing wholly in bf16 (autocast-free `dtype=bf16`).
//! Ember keeps the residual stream, norms and softmax in f32 and rounds only the matmul
//! operands, so its bf16 logits must sit at least as close to the f32-compute reference as
//! transformers' own bf16 logits do.

mod common;

use burn::backend::{Flex, NdArray};
use burn::tensor::{DType, Tensor};
use common::*;
use ember_model::{BaseDtype, CausalLm};

type Cpu = Flex;

fn logits(model: &CausalLm<Cpu>, arch: &str) -> Vec<f32> {
    let inputs = Inputs::read(arch);
    let logits: Tensor<Cpu, 3> = model.forward(inputs.model_input(&Default::default()));
    logits.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// llama's bf16 references: transformers' f32-compute logits, their shape, and the distance
/// of transformers' own bf16 compute from them (over attended positions): the bf16 bound.
fn bf16_reference() -> (Vec<f32>, Vec<usize>, f32) {
    let reference_file = fixtures().join("llama").join("logits_bf16.safetensors");
    let (f32_compute, shape) = reference(&reference_file, "logits_bf16_weights_f32_compute");
    let (bf16_compute, _) = reference(&reference_file, "logits_bf16_compute");
    let mask = Inputs::read("llama").attention_mask;
    let (bound, _) = masked_max_diff(&bf16_compute, &f32_compute, &shape, &mask);
    (f32_compute, shape, bound)
}

/// burn-flex in f32 is a golden backend too: every family's logits within 1e-4.
#[test]
fn flex_f32_matches_transformers_on_every_family() {
    for arch in families() {
        let arch = arch.as_str();
        let dir = fixtures().join(arch);
        let model = CausalLm::<Cpu>::from_path_as(&dir, &Default::default(), BaseDtype::Float32).unwrap();
        let (expected, shape) = reference(&dir.join("logits.safetensors"), "logits");
        let inputs = Inputs::read(arch);
        let diff = masked_max_diff(&logits(&model, arch), &expected, &shape, &inputs.attention_mask);
        assert_close(&format!("{arch} on burn-flex f32"), diff, 1e-4);
    }
}

#[test]
fn half_precision_bases_are_stored_half_and_as_close_as_transformers_bf16() {
    let dir = fixtures().join("llama");
    let (f32_compute, shape, transformers_bf16) = bf16_reference();
    let mask = Inputs::read("llama").attention_mask;
    println!("transformers bf16 compute vs f32 compute: {transformers_bf16:.3e}");
    assert!(transformers_bf16 > 1e-3, "the reference should show bf16 rounding");

    for (dtype, stored) in [(BaseDtype::Bfloat16, DType::BF16), (BaseDtype::Float16, DType::F16)] {
        let model = CausalLm::<Cpu>::from_path_as(&dir.join("bf16"), &Default::default(), dtype).unwrap();
        for (path, layer) in model.linear_layers() {
            assert_eq!(layer.weight.dense().unwrap().dtype(), stored, "{path} under {dtype}");
            if let Some(bias) = &layer.bias {
                assert_eq!(bias.val().dtype(), DType::F32, "{path} bias under {dtype}");
            }
        }
        assert_eq!(model.model.embed_tokens.weight.dense().unwrap().dtype(), stored);
        assert_eq!(model.model.norm.weight.val().dtype(), DType::F32, "norms stay f32");

        let actual = logits(&model, "llama");
        let (diff, at) = masked_max_diff(&actual, &f32_compute, &shape, &mask);
        println!("Ember {dtype} vs f32 compute: {diff:.3e} at {at}");
        assert!(diff > 0.0, "{dtype}: the matmuls should round");
        assert!(
            diff <= transformers_bf16,
            "{dtype}: {diff:.3e} from f32 compute, transformers' bf16 is {transformers_bf16:.3e}"
        );
    }
}

/// An adapter on a bf16 base: the adapter branch stays f32, and the output moves by the
/// adapter's contribution as it does on the f32 base (PEFT LoRA logits within the bf16 bound).
#[test]
fn adapters_on_a_bf16_base_match_the_f32_base() {
    let dir = fixtures().join("llama");
    let files = ember_lora::AdapterFiles::read(&dir.join("adapter_random_b")).unwrap();
    let device = Default::default();
    let mut half = CausalLm::<Cpu>::from_path_as(&dir, &device, BaseDtype::Bfloat16).unwrap();
    half.load_adapter(&files, &device).unwrap();
    let (expected, shape) = reference(&dir.join("lora_logits.safetensors"), "logits");
    let mask = Inputs::read("llama").attention_mask;
    let (diff, at) = masked_max_diff(&logits(&half, "llama"), &expected, &shape, &mask);
    // The same bound as the base: transformers' own bf16 rounding of this model.
    let (_, _, bound) = bf16_reference();
    println!("bf16 base + adapter vs PEFT f32: {diff:.3e} at {at} (bound {bound:.3e})");
    let mut adapted = 0;
    for (path, layer) in half.linear_layers() {
        if let Some(adapter) = &layer.adapter {
            assert_eq!(adapter.lora_a.val().dtype(), DType::F32, "{path} lora_A");
            assert_eq!(adapter.lora_b.val().dtype(), DType::F32, "{path} lora_B");
            adapted += 1;
        }
    }
    assert_eq!(adapted, files.tensors.len());
    assert!(diff <= bound, "{diff:.3e} > {bound:.3e}");
}

/// burn-ndarray has no bf16 tensors: a bf16 base is held as host bf16 blocks (half the bytes of
/// f32), multiplied on AMX tiles where the CPU has them (else as f32 values); its logits, with
/// and without an adapter, sit as close to the f32-compute reference as transformers' bf16.
#[test]
fn a_bf16_base_on_burn_ndarray_is_host_blocks_as_close_as_transformers_bf16() {
    type Host = NdArray<f32>;
    let dir = fixtures().join("llama");
    let (f32_compute, shape, bound) = bf16_reference();
    let mask = Inputs::read("llama").attention_mask;
    let (lora_expected, _) = reference(&dir.join("lora_logits.safetensors"), "logits");
    let files = ember_lora::AdapterFiles::read(&dir.join("adapter_random_b")).unwrap();
    let device = Default::default();
    let amx = ember_lora::amx::available();
    for adapter in [false, true] {
        let mut model = CausalLm::<Host>::from_path_as(&dir.join("bf16"), &device, BaseDtype::Bfloat16).unwrap();
        for (path, layer) in model.linear_layers() {
            let blocks = layer
                .weight
                .quantized()
                .unwrap_or_else(|| panic!("{path}: not host blocks"));
            assert_eq!(blocks.format(), ember_lora::QuantFormat::Bf16, "{path}");
            let [out, inp] = blocks.shape();
            assert_eq!(layer.weight.bytes(), 2 * out * inp, "{path}: two bytes a value");
        }
        assert_eq!(model.model.embed_tokens.weight.storage(), "BF16");
        assert_eq!(model.model.norm.weight.val().dtype(), DType::F32, "norms stay f32");
        let expected = if adapter {
            model.load_adapter(&files, &device).unwrap();
            &lora_expected
        } else {
            &f32_compute
        };
        let inputs = Inputs::read("llama");
        let logits: Tensor<Host, 3> = model.forward(inputs.model_input(&device));
        let actual = logits.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let (diff, at) = masked_max_diff(&actual, expected, &shape, &mask);
        println!("ndarray bf16 blocks (AMX: {amx}), adapter {adapter}: {diff:.3e} at {at} (bound {bound:.3e})");
        assert!(diff > 0.0, "the bf16 weights should round");
        assert!(diff <= bound, "adapter {adapter}: {diff:.3e} > {bound:.3e}");
    }
}
