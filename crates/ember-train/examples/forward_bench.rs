//! Times inference forwards (no autodiff) on a real model (run by hand; see bench/README.md):
//!
//! ```sh
//! cargo run --release -p ember-train --example forward_bench -- MODEL[.gguf] [SEQ] [BATCH] [REPEATS]
//! ```

use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use ember_model::{CausalLm, ModelInput};

type B = NdArray<f32>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    ember_model::allocator::reuse_freed_buffers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = std::path::PathBuf::from(
        args.first()
            .ok_or("usage: forward_bench MODEL [SEQ] [BATCH] [REPEATS]")?,
    );
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (seq, batch, repeats) = (arg(1, 200), arg(2, 8), arg(3, 4));
    let device = Default::default();
    let model = CausalLm::<B>::from_path(&path, &device)?;
    let vocab = model.config().vocab_size as i64;
    let ids: Vec<i64> = (0..batch * seq).map(|i| (i as i64 * 7919) % vocab).collect();
    let mut times = Vec::new();
    for r in 0..repeats {
        let input = ModelInput::new(Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.clone(), [batch, seq]),
            &device,
        ));
        let start = Instant::now();
        let hidden = model.forward_hidden(input);
        let _ = hidden.into_data();
        let t = start.elapsed().as_secs_f64();
        eprintln!("forward {r}: {t:.2} s, {:.0} tok/s", (batch * seq) as f64 / t);
        times.push(t);
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "median forward {median:.2} s = {:.0} tokens/s (seq {seq}, batch {batch})",
        (batch * seq) as f64 / median
    );
    Ok(())
}
