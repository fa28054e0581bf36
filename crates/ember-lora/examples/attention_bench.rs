//! Times the CPU attention kernels (forward + backward) with f32 and with bf16 products.
//!
//! `cargo run --release -p ember-lora --example attention_bench -- [SEQ] [HEADS] [KV_HEADS] [HEAD_DIM] [REPEATS] [KINDS]`
//! (defaults: SmolLM2-135M's attention at 2048 positions, one sequence; KINDS `both`, `f32` or
//! `bf16`: which products to time, each twice, alternating).

use std::time::Instant;

use ember_lora::attention::{host_attention_backward, host_attention_forward, AttentionDims, AttentionSpec, HostMask};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .take(5)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (seq, heads, kv_heads, d, repeats) = (arg(0, 2048), arg(1, 9), arg(2, 3), arg(3, 64), arg(4, 3));
    let dims = AttentionDims {
        batch: 1,
        heads,
        kv_heads,
        seq,
        keys: seq,
        head_dim: d,
        value_dim: d,
    };
    let mut state = 7u64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0
            })
            .collect()
    };
    let q = random(heads * seq * d);
    let k = random(kv_heads * seq * d);
    let v = random(kv_heads * seq * d);
    let g = random(heads * seq * d);
    let mask: Vec<f32> = (0..seq * seq)
        .map(|x| if x % seq > x / seq { f32::MIN } else { 0.0 })
        .collect();
    let host_mask = HostMask::new(&mask, &[1, 1, seq, seq], &dims);
    let flops = 7.0 * 2.0 * (seq * seq / 2 * d * heads) as f64;
    let kinds: &[bool] = match std::env::args().nth(6).as_deref() {
        None | Some("both") => &[false, true, false, true],
        Some("f32") => &[false, false],
        Some("bf16") => &[true, true],
        Some(other) => panic!("KINDS is both, f32 or bf16, not {other}"),
    };
    for &bf16_products in kinds {
        let spec = AttentionSpec {
            scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            causal: true,
            bf16_products,
        };
        let (mut forward, mut backward) = (f64::MAX, f64::MAX);
        for _ in 0..repeats {
            let start = Instant::now();
            let (out, lse) = host_attention_forward(&q, &k, &v, Some(host_mask), None, dims, spec);
            let mid = Instant::now();
            let grads = host_attention_backward(&q, &k, &v, Some(host_mask), dims, spec, &out, &lse, &g);
            std::hint::black_box(grads);
            forward = forward.min((mid - start).as_secs_f64());
            backward = backward.min(mid.elapsed().as_secs_f64());
        }
        println!(
            "bf16_products {bf16_products}: forward {:.1} ms, backward {:.1} ms, {:.0} GFLOP/s (causal products)",
            forward * 1e3,
            backward * 1e3,
            flops / (forward + backward) / 1e9
        );
    }
}
