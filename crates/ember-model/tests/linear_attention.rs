//! Gated DeltaNet's chunked delta rule against the token-by-token recurrence (the exactness
//! reference): outputs, final state and gradients, over several chunks, a ragged last chunk
//! and a continued state. (The model-level checks against transformers are in parity.rs,
//! generate.rs and ember-train's parity.rs, on the `qwen3_5` fixture.)

mod common;

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};
use common::TestBackend;
use ember_model::linear_attention::{causal_conv, chunked_delta_rule, recurrent_delta_rule};

type Ad = Autodiff<TestBackend>;

fn max_diff<const D: usize>(a: Tensor<Ad, D>, b: Tensor<Ad, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// Random inputs of the form the mixer feeds the rule: unit-norm keys, scaled queries,
/// β in (0, 1), log-decays ≤ 0.
fn inputs(heads: usize, seq: usize, dk: usize, dv: usize) -> [Tensor<Ad, 3>; 3] {
    let device = Default::default();
    let unit = |t: Tensor<Ad, 3>| {
        let norm = t.clone().powi_scalar(2).sum_dim(2).sqrt();
        t / norm
    };
    let q = unit(Tensor::random(
        [heads, seq, dk],
        Distribution::Normal(0.0, 1.0),
        &device,
    ))
    .mul_scalar((dk as f64).powf(-0.5))
    .require_grad();
    let k = unit(Tensor::random(
        [heads, seq, dk],
        Distribution::Normal(0.0, 1.0),
        &device,
    ))
    .require_grad();
    let v = Tensor::random([heads, seq, dv], Distribution::Normal(0.0, 1.0), &device).require_grad();
    [q, k, v]
}

#[test]
fn chunked_delta_rule_equals_the_recurrence_with_gradients() {
    let device = Default::default();
    let (heads, seq, dk, dv) = (3, 11, 8, 6);
    for chunk in [1, 2, 4, 8, 64] {
        let [q, k, v] = inputs(heads, seq, dk, dv);
        let g: Tensor<Ad, 2> = Tensor::random([heads, seq], Distribution::Uniform(-1.5, 0.0), &device).require_grad();
        let beta: Tensor<Ad, 2> = Tensor::random([heads, seq], Distribution::Uniform(0.0, 1.0), &device).require_grad();
        let state: Tensor<Ad, 3> = Tensor::random([heads, dk, dv], Distribution::Normal(0.0, 1.0), &device);
        let run = |chunked: bool| {
            let args = (
                q.clone(),
                k.clone(),
                v.clone(),
                g.clone(),
                beta.clone(),
                Some(state.clone()),
            );
            if chunked {
                chunked_delta_rule(args.0, args.1, args.2, args.3, args.4, args.5, chunk)
            } else {
                recurrent_delta_rule(args.0, args.1, args.2, args.3, args.4, args.5)
            }
        };
        let (out_c, state_c) = run(true);
        let (out_r, state_r) = run(false);
        assert!(max_diff(out_c.clone(), out_r.clone()) < 1e-5, "chunk {chunk}: outputs");
        assert!(
            max_diff(state_c.clone(), state_r.clone()) < 1e-5,
            "chunk {chunk}: states"
        );

        // One weighted loss through both forms: every input's gradient agrees.
        let weights: Tensor<Ad, 3> = Tensor::random([heads, seq, dv], Distribution::Normal(0.0, 1.0), &device);
        let grads_of = |out: Tensor<Ad, 3>, s: Tensor<Ad, 3>| {
            let loss = (out * weights.clone()).sum() + s.sum();
            let grads = loss.backward();
            let g3 = |t: &Tensor<Ad, 3>| t.grad(&grads).expect("a gradient");
            let g2 = |t: &Tensor<Ad, 2>| t.grad(&grads).expect("a gradient");
            (g3(&q), g3(&k), g3(&v), g2(&g), g2(&beta))
        };
        let (a, b) = (grads_of(out_c, state_c), grads_of(out_r, state_r));
        let close3 = |x: Tensor<TestBackend, 3>, y: Tensor<TestBackend, 3>, what: &str| {
            let d: f32 = (x - y).abs().max().into_scalar();
            assert!(d < 1e-4, "chunk {chunk}: d{what} differs by {d}");
        };
        let close2 = |x: Tensor<TestBackend, 2>, y: Tensor<TestBackend, 2>, what: &str| {
            let d: f32 = (x - y).abs().max().into_scalar();
            assert!(d < 1e-4, "chunk {chunk}: d{what} differs by {d}");
        };
        close3(a.0, b.0, "q");
        close3(a.1, b.1, "k");
        close3(a.2, b.2, "v");
        close2(a.3, b.3, "g");
        close2(a.4, b.4, "beta");
    }
}

/// Running a sequence in two parts (state and convolution inputs carried over) gives what one
/// pass gives.
#[test]
fn split_sequences_continue_exactly() {
    let device = Default::default();
    let (heads, seq, dk, dv) = (2, 9, 4, 5);
    let [q, k, v] = inputs(heads, seq, dk, dv);
    let g: Tensor<Ad, 2> = Tensor::random([heads, seq], Distribution::Uniform(-1.0, 0.0), &device);
    let beta: Tensor<Ad, 2> = Tensor::random([heads, seq], Distribution::Uniform(0.0, 1.0), &device);
    let (whole, _) = chunked_delta_rule(q.clone(), k.clone(), v.clone(), g.clone(), beta.clone(), None, 4);
    let part = |t: &Tensor<Ad, 3>, from: usize, len: usize| t.clone().narrow(1, from, len);
    let part2 = |t: &Tensor<Ad, 2>, from: usize, len: usize| t.clone().narrow(1, from, len);
    let (first, state) = chunked_delta_rule(
        part(&q, 0, 6),
        part(&k, 0, 6),
        part(&v, 0, 6),
        part2(&g, 0, 6),
        part2(&beta, 0, 6),
        None,
        4,
    );
    let (second, _) = recurrent_delta_rule(
        part(&q, 6, 3),
        part(&k, 6, 3),
        part(&v, 6, 3),
        part2(&g, 6, 3),
        part2(&beta, 6, 3),
        Some(state),
    );
    assert!(max_diff(Tensor::cat(vec![first, second], 1), whole) < 1e-5);

    // The causal convolution: zeros before the start, the last inputs carried over.
    let x: Tensor<Ad, 3> = Tensor::random([2, 7, 5], Distribution::Normal(0.0, 1.0), &device);
    let w: Tensor<Ad, 2> = Tensor::random([5, 4], Distribution::Normal(0.0, 1.0), &device);
    let (all, _) = causal_conv(x.clone(), w.clone(), None);
    let (a, carried) = causal_conv(x.clone().narrow(1, 0, 5), w.clone(), None);
    let (b, _) = causal_conv(x.clone().narrow(1, 5, 2), w.clone(), Some(carried));
    assert!(max_diff(Tensor::cat(vec![a, b], 1), all.clone()) < 1e-6);
    // Position 0 sees only its own input, through the last tap.
    let first = x.narrow(1, 0, 1) * w.narrow(1, 3, 1).reshape([1, 1, 5]);
    assert!(max_diff(all.narrow(1, 0, 1), first) < 1e-6);
}

/// Packed rows on the Gated DeltaNet hybrids: every sample's logits equal those of the sample
/// run alone (the convolution and the recurrent state restart at each sample, the full
/// attention layers keep samples apart by the segment mask), with trailing padding too; and
/// without the segment ids the second sample's logits do change (the check can fail).
#[test]
fn packed_samples_mix_as_if_run_alone() {
    use burn::tensor::{Int, TensorData};
    use ember_model::{CausalLm, ModelInput};
    let device = Default::default();
    for arch in ["qwen3_5", "qwen3_5_moe", "qwen3_next"] {
        let model = CausalLm::<TestBackend>::from_dir(&common::fixtures().join(arch), &device).unwrap();
        let ids: Vec<i64> = (0..16).map(|i| 3 + (i * 37 + 11) % 370).collect();
        // Row 0: samples of 6 and 7 tokens, then 3 pads; row 1: samples of 10 and 6 tokens.
        let rows: [&[(usize, usize)]; 2] = [&[(0, 6), (6, 13)], &[(0, 10), (10, 16)]];
        let (seq, vocab) = (16, model.config().vocab_size);
        let (mut input, mut mask, mut positions, mut segments) =
            (vec![0i64; 32], vec![0i64; 32], vec![0i64; 32], vec![0i64; 32]);
        for (r, samples) in rows.iter().enumerate() {
            for (s, &(start, end)) in samples.iter().enumerate() {
                for t in start..end {
                    input[r * seq + t] = ids[(t + 5 * r) % 16];
                    mask[r * seq + t] = 1;
                    positions[r * seq + t] = (t - start) as i64;
                    segments[r * seq + t] = s as i64 + 1;
                }
            }
        }
        let int = |v: &[i64]| Tensor::<TestBackend, 2, Int>::from_data(TensorData::new(v.to_vec(), [2, seq]), &device);
        let packed = |with_segments: bool| -> Vec<f32> {
            let input = ModelInput {
                input_ids: int(&input),
                attention_mask: Some(int(&mask)),
                position_ids: Some(int(&positions)),
                segment_ids: with_segments.then(|| int(&segments)),
            };
            model.forward(input).into_data().to_vec().unwrap()
        };
        let (together, unsegmented) = (packed(true), packed(false));
        let mut second_sample_moved = 0.0f32;
        for (r, samples) in rows.iter().enumerate() {
            for (s, &(start, end)) in samples.iter().enumerate() {
                let alone_ids = input[r * seq + start..r * seq + end].to_vec();
                let len = end - start;
                let alone: Vec<f32> = model
                    .forward(ModelInput::new(Tensor::from_data(
                        TensorData::new(alone_ids, [1, len]),
                        &device,
                    )))
                    .into_data()
                    .to_vec()
                    .unwrap();
                fn at(logits: &[f32], row_start: usize, vocab: usize) -> &[f32] {
                    &logits[row_start * vocab..][..vocab]
                }
                let mut worst = 0.0f32;
                for t in 0..len {
                    for (a, b) in at(&together, r * seq + start + t, vocab)
                        .iter()
                        .zip(&alone[t * vocab..(t + 1) * vocab])
                    {
                        worst = worst.max((a - b).abs());
                    }
                    if s == 1 {
                        for (a, b) in at(&unsegmented, r * seq + start + t, vocab)
                            .iter()
                            .zip(&alone[t * vocab..(t + 1) * vocab])
                        {
                            second_sample_moved = second_sample_moved.max((a - b).abs());
                        }
                    }
                }
                assert!(
                    worst <= 1e-5,
                    "{arch} row {r} sample {s}: packed logits differ from alone by {worst:.3e}"
                );
            }
        }
        assert!(
            second_sample_moved > 1e-2,
            "{arch}: without segment ids the second sample should see the first ({second_sample_moved:.3e})"
        );
    }
}
