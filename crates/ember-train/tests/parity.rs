//! Training parity with PEFT 0.21.2 + torch AdamW on the fixtures.
//!
//! From `adapter_random_b`, five full-batch AdamW steps (lr 1e-2, betas 0.9/0.999, eps 1e-8,
//! no weight decay, no clipping) reproduce `expected.json` → `lora.train.losses_before_each_step`
//! within 1e-4 relative, and the step-0 gradients match `lora_grads_step0.safetensors` within
//! 1e-4 relative (to each tensor's largest entry). References: `../shared/fixtures/_generator/gen_fixtures.py`.

mod common;

use burn::backend::Autodiff;
use std::collections::BTreeMap;

use ember_lora::{AdapterFiles, AdapterTensors};
use ember_model::{CausalLm, Weights};
use ember_train::optim::AdamW;
use ember_train::Trainer;

use common::{expected, fixture_batch, fixtures, reference_losses};

/// burn-ndarray, or burn-wgpu when tested with `--features wgpu` (CI, on Mesa's lavapipe).
#[cfg(not(feature = "wgpu"))]
type B = Autodiff<burn::backend::NdArray<f32>>;
/// burn-wgpu (`--features wgpu`).
#[cfg(feature = "wgpu")]
type B = Autodiff<burn::backend::Wgpu>;

fn trainer(arch: &str) -> Trainer<B> {
    let device = Default::default();
    let mut model = CausalLm::<B>::from_dir(&fixtures().join(arch), &device).unwrap();
    let files = AdapterFiles::read(&fixtures().join(arch).join("adapter_random_b")).unwrap();
    model.load_adapter(&files, &device).unwrap();
    Trainer::new(model, AdamW::new((0.9, 0.999), 1e-8, 0.0), None, 0, device)
}

fn check_arch(arch: &str) {
    let expected = expected(arch);
    let train = &expected["lora"]["train"];
    assert_eq!(train["lr"], 0.01);
    let batch = fixture_batch(arch);
    assert_eq!(
        batch.target_tokens,
        expected["num_loss_tokens"].as_u64().unwrap() as usize
    );

    // Step-0 gradients.
    let mut t = trainer(arch);
    let grads = t.gradients(&batch);
    // In PEFT's file layout: a stacked expert parameter's per-expert gradients joined into
    // its flat pair (the same re-indexing as its adapter's).
    let mut per_layer: BTreeMap<String, AdapterTensors> = BTreeMap::new();
    for (name, g) in &grads {
        let (module, half) = name.rsplit_once('.').unwrap();
        let entry = per_layer.entry(module.to_string()).or_insert_with(|| AdapterTensors {
            lora_a: Vec::new(),
            a_shape: [0, 0],
            lora_b: Vec::new(),
            b_shape: [0, 0],
        });
        let values = g.to_data().to_vec::<f32>().unwrap();
        match half {
            "lora_A" => (entry.lora_a, entry.a_shape) = (values, g.dims()),
            _ => (entry.lora_b, entry.b_shape) = (values, g.dims()),
        }
    }
    let grads = t.model.peft_tensors(per_layer);
    let reference_path = fixtures().join(arch).join("lora_grads_step0.safetensors");
    let reference = Weights::open_files(&fixtures().join(arch), &[reference_path]).unwrap();
    assert_eq!(2 * grads.len(), reference.keys().count());
    let mut worst = (0.0f32, String::new());
    for (module, pair) in &grads {
        for (half, got) in [("lora_A", &pair.lora_a), ("lora_B", &pair.lora_b)] {
            let key = format!("base_model.model.{module}.{half}.weight");
            let (shape, _) = reference.info(&key).unwrap_or_else(|| panic!("no {key}"));
            let want = reference.read_f32(&key, &shape).unwrap();
            assert_eq!(got.len(), want.len(), "{arch} {key}");
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
            let diff = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff / scale <= 1e-4,
                "{arch} {key}: relative gradient diff {:.3e}",
                diff / scale
            );
            if diff / scale > worst.0 {
                worst = (diff / scale, key);
            }
        }
    }
    println!(
        "{arch}: largest relative step-0 gradient diff {:.2e} ({})",
        worst.0, worst.1
    );

    // Five AdamW steps.
    let mut t = trainer(arch);
    let want = reference_losses(arch);
    for (step, &w) in want.iter().enumerate() {
        let stats = t.train_step(std::slice::from_ref(&batch), 0.01).unwrap();
        let rel = (stats.loss - w).abs() / w.abs();
        println!(
            "{arch} step {step}: loss {:.7} reference {:.7} (rel {rel:.2e})",
            stats.loss, w
        );
        assert!(
            rel <= 1e-4,
            "{arch} step {step}: loss {} vs {w} (relative {rel:.2e})",
            stats.loss
        );
    }
    // The trained adapter matches PEFT's adapter_trained.
    let trained = AdapterFiles::read(&fixtures().join(arch).join("adapter_trained")).unwrap();
    let ours = t.model.adapter_files(&trained.config, None);
    if let Ok(dir) = std::env::var("EMBER_DUMP_TRAINED") {
        ours.write(&std::path::Path::new(&dir).join(arch)).unwrap();
    }
    for (path, theirs) in &trained.tensors {
        let mine = &ours.tensors[path];
        for (a, b) in [(&mine.lora_a, &theirs.lora_a), (&mine.lora_b, &theirs.lora_b)] {
            let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff / scale <= 1e-3,
                "{arch} {path}: trained adapter differs by {:.3e} relative",
                diff / scale
            );
        }
    }
}

macro_rules! training_parity {
    ($($name:ident: $arch:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_arch($arch);
            }
        )*
    };
}

training_parity! {
    llama_training_matches_peft: "llama",
    mistral_training_matches_peft: "mistral",
    qwen2_training_matches_peft: "qwen2",
    qwen3_training_matches_peft: "qwen3",
    gemma_training_matches_peft: "gemma",
    gemma2_training_matches_peft: "gemma2",
    gemma3_training_matches_peft: "gemma3",
    phi3_training_matches_peft: "phi3",
    olmo2_training_matches_peft: "olmo2",
    glm4_training_matches_peft: "glm4",
    mixtral_training_matches_peft: "mixtral",
    qwen3_moe_training_matches_peft: "qwen3_moe",
    gpt_oss_training_matches_peft: "gpt_oss",
    olmo3_training_matches_peft: "olmo3",
    smollm3_training_matches_peft: "smollm3",
    ministral3_training_matches_peft: "ministral3",
    ministral3_wrapped_training_matches_peft: "ministral3_wrapped",
    llama4_training_matches_peft: "llama4",
    gemma3_wrapped_training_matches_peft: "gemma3_wrapped",
    gemma4_training_matches_peft: "gemma4",
    gemma4_wrapped_training_matches_peft: "gemma4_wrapped",
    gemma4_moe_training_matches_peft: "gemma4_moe",
    gemma4_unified_training_matches_peft: "gemma4_unified",
    gemma4_unified_wrapped_training_matches_peft: "gemma4_unified_wrapped",
    qwen3_moe_experts_training_matches_peft: "qwen3_moe_experts",
    mixtral_experts_training_matches_peft: "mixtral_experts",
    glm4_moe_experts_training_matches_peft: "glm4_moe_experts",
    gpt_oss_experts_training_matches_peft: "gpt_oss_experts",
    llama4_experts_training_matches_peft: "llama4_experts",
    glm4_moe_training_matches_peft: "glm4_moe",
    deepseek_v3_training_matches_peft: "deepseek_v3",
    glm4_moe_lite_training_matches_peft: "glm4_moe_lite",
    glm_moe_dsa_training_matches_peft: "glm_moe_dsa",
    mistral4_training_matches_peft: "mistral4",
    mistral4_wrapped_training_matches_peft: "mistral4_wrapped",
    qwen3_5_training_matches_peft: "qwen3_5",
    qwen3_5_moe_training_matches_peft: "qwen3_5_moe",
    qwen3_5_wrapped_training_matches_peft: "qwen3_5_wrapped",
    qwen3_5_moe_wrapped_training_matches_peft: "qwen3_5_moe_wrapped",
    qwen3_next_training_matches_peft: "qwen3_next",
}
