//! Times the bf16 frozen-weight products on AMX tiles ([`ember_lora::amx`]) at a model's linear
//! shapes: the forward `x·Wᵀ` and the input gradient `g·W`; then the whole LoRA linear (base on
//! tiles plus a rank-16 adapter in f32, forward and backward) against its base products alone.
//!
//! `cargo run --release -p ember-lora --example linear_bench -- [TOKENS] [HIDDEN] [INTERMEDIATE] [KV_WIDTH] [REPEATS]`
//! (defaults: SmolLM2-135M at 2048 tokens).

use std::time::Instant;

use ember_lora::amx;
use ember_lora::attention::HostMatrix;
use ember_lora::fused::{host_lora_linear_backward, host_lora_linear_forward, HostBase, InputGrad};
use ember_lora::{QuantFormat, QuantMatrix};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (m, hidden, inter, kv, repeats) = (arg(0, 2048), arg(1, 576), arg(2, 1536), arg(3, 192), arg(4, 5));
    assert!(amx::available(), "this CPU has no AMX bf16 tiles");
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
    let (mut total_flops, mut total_s) = (0.0, 0.0);
    for (name, out, inp) in [
        ("q/o", hidden, hidden),
        ("k/v", kv, hidden),
        ("gate/up", inter, hidden),
        ("down", hidden, inter),
    ] {
        let w: Vec<u16> = random(out * inp).into_iter().map(amx::bf16_bits).collect();
        let x = random(m * inp);
        let g = random(m * out);
        let flops = 2.0 * (m * out * inp) as f64;
        let (mut forward, mut backward) = (f64::MAX, f64::MAX);
        for _ in 0..repeats {
            let start = Instant::now();
            std::hint::black_box(amx::matmul_transposed(&x, m, &w, [out, inp]));
            let mid = Instant::now();
            std::hint::black_box(amx::matmul(&g, m, &w, [out, inp]));
            forward = forward.min((mid - start).as_secs_f64());
            backward = backward.min(mid.elapsed().as_secs_f64());
        }
        total_flops += 2.0 * flops;
        total_s += forward + backward;
        println!(
            "{name:8} [{m} x {inp}] -> {out}: x·Wᵀ {:.2} ms ({:.0} GFLOP/s), g·W {:.2} ms ({:.0} GFLOP/s)",
            forward * 1e3,
            flops / forward / 1e9,
            backward * 1e3,
            flops / backward / 1e9
        );
    }
    println!("all: {:.0} GFLOP/s", total_flops / total_s / 1e9);

    let rank = 16;
    let (mut base_s, mut lora_s) = (0.0, 0.0);
    for (name, out, inp) in [
        ("q/o", hidden, hidden),
        ("k/v", kv, hidden),
        ("gate/up", inter, hidden),
        ("down", hidden, inter),
    ] {
        let w = random(out * inp);
        let blocks = QuantMatrix::quantize(QuantFormat::Bf16, &w, [out, inp]).expect("bf16 blocks");
        let x = random(m * inp);
        let g = random(m * out);
        let a = random(rank * inp);
        let b = random(out * rank);
        let (xm, gm) = (HostMatrix::row_major(&x, [m, inp]), HostMatrix::row_major(&g, [m, out]));
        let (am, bm) = (
            HostMatrix::row_major(&a, [rank, inp]),
            HostMatrix::row_major(&b, [out, rank]),
        );
        let base = HostBase::Blocks(&blocks);
        let (mut whole, mut alone) = (f64::MAX, f64::MAX);
        for _ in 0..repeats {
            let start = Instant::now();
            let (y, low) = host_lora_linear_forward(&xm, None, &base, None, &am, &bm, 2.0);
            let grads = host_lora_linear_backward(&xm, &base, &am, &bm, &low, 2.0, &gm, InputGrad::Sum);
            std::hint::black_box((y, grads));
            whole = whole.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            std::hint::black_box(blocks.matmul_transposed(&x, m));
            std::hint::black_box(blocks.matmul(&g, m));
            alone = alone.min(start.elapsed().as_secs_f64());
        }
        base_s += alone;
        lora_s += whole;
        println!(
            "{name:8} LoRA linear fwd + bwd {:.2} ms, its base products alone {:.2} ms ({:.0}% adapter)",
            whole * 1e3,
            alone * 1e3,
            100.0 * (whole - alone) / whole
        );
    }
    println!(
        "all: adapter {:.0}% of the LoRA linears' time",
        100.0 * (lora_s - base_s) / lora_s
    );
}
