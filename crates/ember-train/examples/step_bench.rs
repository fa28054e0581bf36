//! Times LoRA training steps on a real model (run by hand; see bench/README.md):
//!
//! ```sh
//! cargo run --release -p ember-train --example step_bench -- MODEL[.gguf] [SEQ] [BATCH] [STEPS] [TARGETS_PER_ROW]
//! ```
//! r 16, alpha 32, all linear layers, AdamW; TARGETS_PER_ROW = 0 trains every token.
//! `EMBER_DEVICE=cuda` (built with `--features cuda`) runs on the first GPU, `wgpu` (with
//! `--features wgpu`) on the first wgpu adapter, `flex` on burn-flex; `EMBER_DTYPE=bfloat16`
//! (or `float16`) stores the frozen base in that dtype (on the CPU: bf16 as host blocks on
//! burn-ndarray, multiplied on AMX tiles where the CPU has them; f16 on burn-flex); `gguf` keeps a
//! GGUF's quantized blocks. `EMBER_CHECKPOINT=1` recomputes activations in the backward pass
//! (burn-ndarray with balanced checkpointing).

use std::time::Instant;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex, NdArray};
use ember_lora::{LoraConfig, TargetModules};
use ember_model::{BaseDtype, CausalLm};
use ember_train::data::{collate, Sample, IGNORE};
use ember_train::optim::AdamW;
use ember_train::Trainer;

type Run = Result<(), Box<dyn std::error::Error>>;

fn main() -> Run {
    ember_model::allocator::reuse_freed_buffers();
    let dtype: BaseDtype = std::env::var("EMBER_DTYPE").as_deref().unwrap_or("float32").parse()?;
    match std::env::var("EMBER_DEVICE").as_deref() {
        Ok("cuda") => cuda(dtype),
        Ok("wgpu") => wgpu(dtype),
        Ok("flex") => bench::<Autodiff<Flex>>(dtype),
        // burn's balanced gradient checkpointing (recompute in the backward pass)
        _ if std::env::var("EMBER_CHECKPOINT").is_ok_and(|v| v == "1") => {
            bench::<Autodiff<NdArray<f32>, BalancedCheckpointing>>(dtype)
        }
        _ if dtype == BaseDtype::Float16 => bench::<Autodiff<Flex>>(dtype),
        _ => bench::<Autodiff<NdArray<f32>>>(dtype),
    }
}

#[cfg(feature = "cuda")]
fn cuda(dtype: BaseDtype) -> Run {
    bench::<Autodiff<burn::backend::Cuda<f32>>>(dtype)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: BaseDtype) -> Run {
    Err("EMBER_DEVICE=cuda needs `--features cuda`".into())
}

#[cfg(feature = "wgpu")]
fn wgpu(dtype: BaseDtype) -> Run {
    bench::<Autodiff<burn::backend::Wgpu>>(dtype)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_: BaseDtype) -> Run {
    Err("EMBER_DEVICE=wgpu needs `--features wgpu`".into())
}

fn bench<B: ember_lora::EmberAutodiffBackend>(dtype: BaseDtype) -> Run {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = std::path::PathBuf::from(
        args.first()
            .ok_or("usage: step_bench MODEL [SEQ] [BATCH] [STEPS] [TARGETS]")?,
    );
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (seq, batch, steps, targets) = (arg(1, 256), arg(2, 4), arg(3, 5), arg(4, 0));
    let device = Default::default();
    let mut model = CausalLm::<B>::from_path_as(&path, &device, dtype)?;
    let config = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..Default::default()
    };
    // a fixed seed: LoRA A starts the same in every run, so that runs compare loss for loss
    B::seed(&device, 0);
    let report = model.attach_lora(&config, &device)?;
    eprintln!("{report}");
    let vocab = model.config().vocab_size as u32;
    let rows: Vec<Sample> = (0..batch)
        .map(|b| {
            let ids: Vec<u32> = (0..seq).map(|i| ((i * 7919 + b * 104729) as u32) % vocab).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    if targets == 0 || i >= seq - targets {
                        t as i64
                    } else {
                        IGNORE
                    }
                })
                .collect();
            Sample { input_ids: ids, labels }
        })
        .collect();
    let refs: Vec<Vec<&Sample>> = rows.iter().map(|s| vec![s]).collect();
    let window = vec![collate(&refs, 0)];
    let mut trainer = Trainer::new(model, AdamW::new((0.9, 0.999), 1e-8, 0.0), Some(1.0), 0, device);
    let mut times = Vec::new();
    let mut first_loss = f64::NAN;
    for step in 0..steps {
        let start = Instant::now();
        let stats = trainer.train_step(&window, 1e-4)?;
        let t = start.elapsed().as_secs_f64();
        times.push(t);
        if step == 0 {
            first_loss = stats.loss;
        }
        eprintln!(
            "step {step}: {t:.2} s, loss {:.4}, {:.0} tok/s, grad norm {:.6}",
            stats.loss,
            (seq * batch) as f64 / t,
            stats.grad_norm
        );
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    eprintln!(
        "median step {median:.2} s = {:.0} tokens/s (seq {seq}, batch {batch})",
        (seq * batch) as f64 / median
    );
    println!(
        "{{\"median_step_s\": {median:.4}, \"tokens_per_s\": {:.2}, \"first_loss\": {first_loss:.9}}}",
        (seq * batch) as f64 / median
    );
    Ok(())
}
