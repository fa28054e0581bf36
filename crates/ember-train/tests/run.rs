//! Whole runs on a tiny model: outputs, exact resume, Ctrl-C, bad input, accumulation, packing.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use common::*;
use ember_lora::{AdapterFiles, LoraConfig, TargetModules};
use ember_model::CausalLm;
use ember_train::data::{collate, Sample};
use ember_train::optim::AdamW;
use ember_train::{run, Resume, RunConfig, RunOptions, Trainer};

type B = Autodiff<NdArray<f32>>;

/// burn-ndarray's RNG is one global: runs in parallel test threads would draw from it in
/// turn. Tests that train hold this lock so each run sees only its own seeds.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(name: &str, extra: &str) -> RunConfig {
    let model = model_dir(&format!("{name}-model"));
    let data = completion_data(&model);
    let out = tempdir(&format!("{name}-out"));
    RunConfig::from_yaml(&format!(
        "base_model: {}\noutput_dir: {}\nseed: 3\nlora:\n  r: 4\n  lora_alpha: 8\n  lora_dropout: 0.1\n  target_modules: all-linear\n\
         data:\n  train: {}\n  format: completion\n  max_seq_len: 32\n  val_split: 0.2\n\
         train:\n  max_steps: 6\n  micro_batch_size: 2\n  gradient_accumulation_steps: 2\n  learning_rate: 0.01\n  warmup_steps: 1\n  lr_scheduler: cosine\n  save_every: 2\n  keep_last: 5\n  weight_decay: 0.01\n{extra}",
        model.display(),
        out.display(),
        data.display()
    ))
    .unwrap()
}

fn losses(metrics: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

fn opts() -> RunOptions {
    RunOptions {
        resume: None,
        stop: Arc::new(AtomicBool::new(false)),
        progress: false,
        overwrite: false,
    }
}

#[test]
fn a_run_writes_adapter_metrics_checkpoints_and_plot() {
    let _rng = rng_lock();
    let c = config("full", "");
    let summary = run::<B>(&c, &opts(), &Default::default()).unwrap();
    assert_eq!(summary.steps, 6);
    let out = &c.output_dir;
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "resolved_config.yaml",
        "checkpoint-6/optimizer.safetensors",
        "checkpoint-2/trainer_state.json",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    let l = losses(&out.join("metrics.jsonl"));
    assert_eq!(l.len(), 6);
    let (before, after) = (summary.eval_before.unwrap(), summary.eval_after.unwrap());
    assert!(
        after.loss < before.loss,
        "eval loss must fall: {} -> {}",
        before.loss,
        after.loss
    );
    // The adapter loads back (PEFT layout, all-linear = 14 modules).
    let files = AdapterFiles::read(&out.join("adapter")).unwrap();
    assert_eq!(files.tensors.len(), 14);
}

#[test]
fn resume_is_bit_identical() {
    let _rng = rng_lock();
    let straight = config("straight", "");
    run::<B>(&straight, &opts(), &Default::default()).unwrap();

    assert_resume_from_step_2_is_bit_identical(&straight, "resumed-out");
}

/// Another run, in a fresh output folder `name`, resumes from `straight`'s step-2 checkpoint:
/// its losses after step 2 and its final adapter equal `straight`'s bit for bit.
fn assert_resume_from_step_2_is_bit_identical(straight: &RunConfig, name: &str) {
    let resumed = RunConfig {
        output_dir: tempdir(name),
        ..straight.clone()
    };
    let copy = resumed.output_dir.join("checkpoint-2");
    copy_dir(&straight.output_dir.join("checkpoint-2"), &copy);
    let options = RunOptions {
        resume: Some(Resume::Latest),
        ..opts()
    };
    run::<B>(&resumed, &options, &Default::default()).unwrap();

    let a = losses(&straight.output_dir.join("metrics.jsonl"));
    let b = losses(&resumed.output_dir.join("metrics.jsonl"));
    assert_eq!(&a[2..], &b[..], "losses after step 2 must be identical");
    let fa = AdapterFiles::read(&straight.output_dir.join("adapter")).unwrap();
    let fb = AdapterFiles::read(&resumed.output_dir.join("adapter")).unwrap();
    assert_eq!(fa.tensors, fb.tensors, "adapters must be bit-identical");
}

/// A run with LoRA on a MoE model's router and experts (`all-linear` on qwen3_moe, which PEFT
/// rewrites to target_parameters) writes PEFT's flat expert pairs and resumes bit-identically
/// from a checkpoint (whose settings are the rewritten ones).
#[test]
fn expert_lora_run_writes_peft_layout_and_resumes_bit_identically() {
    let _rng = rng_lock();
    let model = model_dir_of("experts-model", "qwen3_moe_experts");
    let data = completion_data(&model);
    let straight = RunConfig::from_yaml(&format!(
        "base_model: {}\noutput_dir: {}\nseed: 5\nlora:\n  r: 2\n  lora_alpha: 4\n  target_modules: all-linear\n\
         data:\n  train: {}\n  format: completion\n  max_seq_len: 32\n  val_split: 0.2\n\
         train:\n  max_steps: 4\n  micro_batch_size: 2\n  learning_rate: 0.01\n  save_every: 2\n  keep_last: 5\n",
        model.display(),
        tempdir("experts-straight").display(),
        data.display()
    ))
    .unwrap();
    run::<B>(&straight, &opts(), &Default::default()).unwrap();
    let files = AdapterFiles::read(&straight.output_dir.join("adapter")).unwrap();
    let mut params = files.config.target_parameters.clone();
    params.sort();
    assert_eq!(params, ["down_proj", "gate.weight", "gate_up_proj"]);
    // 4 experts: gate_up_proj at rank 2·2 (PEFT doubles it), down_proj at rank 2.
    assert_eq!(files.tensors["model.layers.0.mlp.experts.base_layer"].a_shape, [16, 64]);
    assert_eq!(files.tensors["model.layers.0.mlp.experts"].a_shape, [8, 64]);
    assert_eq!(files.tensors["model.layers.0.mlp.gate"].b_shape, [4, 2]);

    assert_resume_from_step_2_is_bit_identical(&straight, "experts-resumed");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn stop_flag_saves_a_checkpoint_and_resume_finishes() {
    let _rng = rng_lock();
    let c = config("stop", "");
    let options = opts();
    options.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let summary = run::<B>(&c, &options, &Default::default()).unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.steps, 1);
    assert!(c
        .output_dir
        .join("checkpoint-1/adapter/adapter_model.safetensors")
        .exists());
    assert!(!c.output_dir.join("adapter").exists());
    let summary = run::<B>(
        &c,
        &RunOptions {
            resume: Some(Resume::Latest),
            ..opts()
        },
        &Default::default(),
    )
    .unwrap();
    assert_eq!(summary.steps, 6);
    assert!(c.output_dir.join("adapter/adapter_model.safetensors").exists());
    // keep_last prunes only older checkpoints.
    let mut ckpts: Vec<String> = std::fs::read_dir(&c.output_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    ckpts.sort();
    assert_eq!(ckpts, ["checkpoint-1", "checkpoint-2", "checkpoint-4", "checkpoint-6"]);
}

#[test]
fn bad_input_writes_nothing() {
    let _rng = rng_lock();
    let mut c = config("bad", "");
    c.data.train = c.output_dir.join("nope.jsonl");
    let out = c.output_dir.join("run");
    c.output_dir = out.clone();
    let err = run::<B>(&c, &opts(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("nope.jsonl"), "{err}");
    assert!(!out.exists(), "nothing may be written on bad input");

    let mut c = config("bad2", "");
    c.output_dir = c.output_dir.join("run");
    c.lora.config.target_modules = TargetModules::List(vec!["qq_proj".into()]);
    let err = run::<B>(&c, &opts(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("matched no linear layer"), "{err}");
    assert!(!c.output_dir.exists());

    let mut c = config("bad3", "");
    c.output_dir = c.output_dir.join("run");
    c.data.max_seq_len = 3;
    let err = run::<B>(&c, &opts(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("no sample survives"), "{err}");
    assert!(!c.output_dir.exists());

    // Rows longer than GLM-5's sparse attention computes exactly are refused up front, naming
    // the key. (glm_moe_dsa's fixture keeps every key up to index_topk = 32 positions.)
    for (arch, packing, max_seq_len, key) in [("glm_moe_dsa", false, 33, "data.max_seq_len")] {
        let mut c = config(&format!("bad-{arch}"), "");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures().join(arch).join(f), c.base_model.join(f)).unwrap();
        }
        c.output_dir = c.output_dir.join("run");
        c.data.packing = packing;
        c.data.max_seq_len = max_seq_len;
        let err = run::<B>(&c, &opts(), &Default::default()).unwrap_err().to_string();
        assert!(err.contains(key), "{arch}: {err}");
        assert!(!c.output_dir.exists());
    }
}

fn tiny_trainer() -> Trainer<B> {
    let device = Default::default();
    let mut model = CausalLm::<B>::from_dir(&fixtures().join("llama"), &device).unwrap();
    let files = AdapterFiles::read(&fixtures().join("llama/adapter_random_b")).unwrap();
    model.load_adapter(&files, &device).unwrap();
    Trainer::new(model, AdamW::new((0.9, 0.999), 1e-8, 0.0), Some(0.5), 0, device)
}

/// Two micro-batches with different target-token counts, accumulated, make the same update as
/// one batch of both (loss normalised by all the window's targets; clipping active).
#[test]
fn accumulation_normalises_by_all_target_tokens() {
    let _rng = rng_lock();
    let a = Sample {
        input_ids: vec![1, 36, 71, 67, 332, 383, 321, 291, 280, 295],
        labels: vec![1, 36, 71, 67, 332, 383, 321, 291, 280, 295],
    };
    let b = Sample {
        input_ids: vec![1, 52, 295, 324],
        labels: vec![-100, -100, 295, 324],
    };
    let mut acc = tiny_trainer();
    let s1 = acc
        .train_step(&[collate(&[vec![&a]], 0), collate(&[vec![&b]], 0)], 0.01)
        .unwrap();
    let mut one = tiny_trainer();
    let s2 = one.train_step(&[collate(&[vec![&a], vec![&b]], 0)], 0.01).unwrap();
    assert_eq!(s1.target_tokens, 9 + 2);
    assert!((s1.loss - s2.loss).abs() < 1e-5, "{} vs {}", s1.loss, s2.loss);
    assert!(
        (s1.grad_norm - s2.grad_norm).abs() < 1e-4 * s2.grad_norm,
        "{} vs {}",
        s1.grad_norm,
        s2.grad_norm
    );
    assert!(s2.grad_norm > 0.5, "clipping must be active in this case");
    // After one step the first moment is (1 − β₁)·(clipped gradient): compare gradients
    // through it (Adam's first update g/|g| amplifies float noise where g ≈ 0).
    for (k, (m_acc, _)) in &acc.optimizer.state {
        let x = m_acc.to_data().to_vec::<f32>().unwrap();
        let y = one.optimizer.state[k].0.to_data().to_vec::<f32>().unwrap();
        let scale = y.iter().fold(0.0f32, |m, q| m.max(q.abs()));
        let d = x.iter().zip(&y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            d <= 1e-4 * scale,
            "{k}: gradient differs by {d:.3e} (scale {scale:.3e})"
        );
    }
}

/// Packed rows give each sample exactly the logits it has alone: through the attention mask,
/// and on the Gated DeltaNet hybrid (qwen3_5) also through the linear-attention layers, whose
/// convolution and recurrent state restart at each sample.
#[test]
fn packed_samples_do_not_attend_to_each_other() {
    for arch in ["mistral", "qwen3_5"] {
        packed_samples_do_not_see_each_other_on(arch);
    }
}

fn packed_samples_do_not_see_each_other_on(arch: &str) {
    use burn::tensor::Tensor;
    let device = Default::default();
    let model = CausalLm::<NdArray<f32>>::from_dir(&fixtures().join(arch), &device).unwrap();
    let a = Sample {
        input_ids: vec![1, 36, 71, 67, 332, 383],
        labels: vec![0; 6],
    };
    let b = Sample {
        input_ids: vec![1, 52, 295, 324, 268],
        labels: vec![0; 5],
    };
    let logits = |rows: Vec<Vec<&Sample>>| -> Vec<f32> {
        let batch = collate(&rows, 0);
        let (input, _) = ember_train::trainer::batch_to_device::<NdArray<f32>>(&batch, &device);
        let out: Tensor<NdArray<f32>, 3> = model.forward(input);
        out.into_data().to_vec::<f32>().unwrap()
    };
    let packed = logits(vec![vec![&a, &b]]);
    let alone_a = logits(vec![vec![&a]]);
    let alone_b = logits(vec![vec![&b]]);
    let v = 384;
    let d = |x: &[f32], y: &[f32]| x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(d(&packed[..6 * v], &alone_a) < 1e-5, "{arch}");
    assert!(
        d(&packed[6 * v..11 * v], &alone_b) < 1e-5,
        "{arch}: packed sample b saw sample a ({:.3e})",
        d(&packed[6 * v..11 * v], &alone_b)
    );
}

#[test]
fn init_from_continues_a_peft_adapter() {
    let _rng = rng_lock();
    let mut c = config("initfrom", "");
    c.lora.init_from = Some(fixtures().join("llama/adapter_trained"));
    c.lora.config = LoraConfig::default();
    c.train.max_steps = Some(1);
    let summary = run::<B>(&c, &opts(), &Default::default()).unwrap();
    assert_eq!(summary.steps, 1);
    let files = AdapterFiles::read(&c.output_dir.join("adapter")).unwrap();
    assert_eq!(files.config.r, 4, "rank comes from the adapter started from");
    assert_eq!(files.tensors.len(), 14);
}

/// A loss that turns NaN/Inf stops the run with a message naming the step, and the last good
/// checkpoint stays.
#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let _rng = rng_lock();
    let mut c = config("nan", "");
    c.train.learning_rate = 1e30;
    c.train.warmup_steps = None;
    c.train.lr_scheduler = ember_train::config::LrScheduler::Constant;
    c.train.max_grad_norm = None;
    c.train.save_every = 1;
    let err = run::<B>(&c, &opts(), &Default::default()).unwrap_err();
    assert!(matches!(err, ember_train::TrainError::NonFiniteLoss { .. }), "{err}");
    assert!(err.to_string().contains("last good checkpoint"), "{err}");
    assert!(c
        .output_dir
        .join("checkpoint-1/adapter/adapter_model.safetensors")
        .exists());
    assert!(!c.output_dir.join("adapter").exists());
}
