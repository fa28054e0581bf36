//! Times greedy generation with the KV cache (run by hand; see bench/README.md):
//!
//! ```sh
//! cargo run --release -p ember-model --example generate_bench -- MODEL[.gguf] [PROMPT_LEN] [NEW_TOKENS]
//! ```
//! Prompt: `(i·7919) mod vocab`, batch 1, eos ignored; median of 2 runs after a warm-up, as JSON.
//! `EMBER_DTYPE=bfloat16` holds the base in bf16 (host bf16 blocks on burn-ndarray, multiplied
//! on AMX tiles where the CPU has them).

use std::time::Instant;

use burn::backend::NdArray;
use ember_model::generate::{generate, GenerationConfig};
use ember_model::{BaseDtype, CausalLm};

type B = NdArray<f32>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    ember_model::allocator::reuse_freed_buffers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = std::path::PathBuf::from(
        args.first()
            .ok_or("usage: generate_bench MODEL [PROMPT_LEN] [NEW_TOKENS]")?,
    );
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (prompt_len, new_tokens) = (arg(1, 32), arg(2, 128));
    let dtype: BaseDtype = std::env::var("EMBER_DTYPE").as_deref().unwrap_or("float32").parse()?;
    let model = CausalLm::<B>::from_path_as(&path, &Default::default(), dtype)?;
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 7919) % vocab).collect();
    let config = GenerationConfig {
        max_new_tokens: new_tokens,
        eos_token_ids: Vec::new(),
        ..Default::default()
    };
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let out = generate(
            &model,
            std::slice::from_ref(&prompt),
            &config,
            0,
            |_, _| {},
            |_, _| false,
        );
        times.push(start.elapsed().as_secs_f64());
        assert_eq!(out[0].len(), new_tokens);
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"seconds\": {median:.4}, \"tokens_per_s\": {:.2}}}",
        new_tokens as f64 / median
    );
    Ok(())
}
