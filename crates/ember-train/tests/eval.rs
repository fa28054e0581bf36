//! Evaluation: perplexity against the fixtures, label scoring on a case with a known answer,
//! and the base-vs-adapter report.

mod common;

use burn::backend::NdArray;
use common::*;
use ember_model::CausalLm;
use ember_train::data::Sample;
use ember_train::eval::{evaluate_loss, full_sequence_scores, label_log_likelihoods, normalize_answer};

type B = NdArray<f32>;

fn fixture_samples(arch: &str) -> Vec<Sample> {
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("inputs.json")).unwrap()).unwrap();
    let ids: Vec<Vec<i64>> = serde_json::from_value(inputs["input_ids"].clone()).unwrap();
    let labels: Vec<Vec<i64>> = serde_json::from_value(inputs["labels"].clone()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(inputs["attention_mask"].clone()).unwrap();
    ids.iter()
        .zip(&labels)
        .zip(&mask)
        .map(|((i, l), m)| {
            let n = m.iter().filter(|&&x| x == 1).count();
            Sample {
                input_ids: i[..n].iter().map(|&x| x as u32).collect(),
                labels: l[..n].to_vec(),
            }
        })
        .collect()
}

/// Perplexity is exp(mean per-token loss) of transformers' loss on the fixtures.
#[test]
fn perplexity_is_exp_of_reference_mean_loss() {
    for arch in ["llama", "qwen3"] {
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(arch).join("expected.json")).unwrap())
                .unwrap();
        let loss = expected["loss"].as_f64().unwrap();
        let model = CausalLm::<B>::from_dir(&fixtures().join(arch), &Default::default()).unwrap();
        let report = evaluate_loss(&model, &fixture_samples(arch), 1, 0);
        assert_eq!(report.target_tokens, 26);
        assert!(
            (report.loss - loss).abs() <= 1e-4 * loss,
            "{arch}: {} vs {loss}",
            report.loss
        );
        assert!((report.perplexity - loss.exp()).abs() <= 1e-3 * loss.exp());
    }
}

/// After the prompt [1, 36, 71, 67] transformers' greedy choice is 87 (expected.json); label
/// scoring must rank it first, and its log-likelihood must equal log_softmax of the reference
/// logits at that position.
#[test]
fn label_scoring_picks_the_known_answer() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("llama/expected.json")).unwrap()).unwrap();
    let best = expected["generation"]["base_new_tokens"][0].as_u64().unwrap() as u32;
    let model = CausalLm::<B>::from_dir(&fixtures().join("llama"), &Default::default()).unwrap();
    let prompt = vec![1u32, 36, 71, 67];
    let candidates = vec![vec![65u32], vec![best], vec![300u32, 12]];
    let scores = label_log_likelihoods(&model, &[prompt], &candidates, 2, 0, |_| {});
    let top = scores[0]
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0;
    assert_eq!(top, 1, "scores {:?}", scores[0]);
    // Reference: logits row 0, position 3 from transformers.
    let bytes = std::fs::read(fixtures().join("llama/logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    let all: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let row = &all[3 * 384..4 * 384];
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    let want = row[best as usize] as f64 - lse;
    assert!((scores[0][1] - want).abs() < 1e-4, "{} vs {want}", scores[0][1]);
}

#[test]
fn report_lists_base_and_every_adapter_on_the_same_rows() {
    let model = model_dir("eval-model");
    let data = model.join("eval.jsonl");
    let rows: String = (0..6)
        .map(|i| serde_json::json!({"instruction": "Classify.", "input": format!("email {i}"), "output": if i % 2 == 0 { "spam" } else { "ham" }}).to_string() + "\n")
        .collect();
    write(&data, &rows);
    // An adapter for this model: the llama fixture's trained adapter.
    let spec = ember_train::eval::EvalSpec {
        model: model.clone(),
        adapters: vec![
            fixtures().join("llama/adapter_trained"),
            fixtures().join("llama/adapter_random_b"),
        ],
        data: serde_yaml::from_str(&format!("train: {}\nformat: alpaca\n", data.display())).unwrap(),
        labels: vec![],
        max_rows: None,
        batch_size: 4,
        generate: true,
        dtype: Default::default(),
    };
    let report = ember_train::eval::evaluate_models::<B>(&spec, &Default::default(), |_| {}).unwrap();
    assert_eq!(report.rows, 6);
    assert_eq!(report.models.len(), 3);
    assert_eq!(report.models[0].name, "base");
    for m in &report.models {
        let c = m.classification.as_ref().expect("alpaca data is label-scored");
        assert_eq!(c.labels, vec!["ham".to_string(), "spam".to_string()]);
        assert_eq!(c.rows, 6);
        assert_eq!(c.confusion.iter().flatten().sum::<usize>(), 6);
        assert!(m.generation.as_ref().unwrap().rows == 6);
        assert!(m.loss.target_tokens > 0 && m.loss.perplexity.is_finite());
    }
    assert_eq!(report.models[0].loss.target_tokens, report.models[1].loss.target_tokens);
    assert_ne!(
        report.models[0].loss.loss, report.models[1].loss.loss,
        "the adapter changes the model"
    );
    let md = report.markdown();
    assert!(md.contains("| base |") && md.contains("adapter_trained"), "{md}");
    assert_eq!(normalize_answer("  Spam! "), "spam");
}

/// The cached (prompt once, candidates from a copy of its KV cache) and single-token fast paths
/// give the full-sequence scores, also with prompts of different lengths (left padding).
#[test]
fn fast_label_scoring_paths_equal_full_forwards() {
    // qwen3_5: the cache is a recurrent state (copied per candidate, never cut back).
    for arch in ["qwen3", "qwen3_5"] {
        let model = CausalLm::<B>::from_dir(&fixtures().join(arch), &Default::default()).unwrap();
        let prompts = vec![
            vec![1u32, 36, 71, 67, 332],
            vec![1u32, 52],
            vec![1u32, 52, 295, 324, 268, 315, 81],
        ];
        for candidates in [
            vec![vec![65u32, 12], vec![87u32], vec![300u32, 12, 7]],
            vec![vec![65u32], vec![87u32]],
        ] {
            let fast = label_log_likelihoods(&model, &prompts, &candidates, 2, 0, |_| {});
            let full = full_sequence_scores(&model, &prompts, &candidates, 2, 0, |_| {});
            for (a, b) in fast.iter().flatten().zip(full.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{arch}: {fast:?} vs {full:?}");
            }
        }
    }
}

/// Scoring and the gold-continuation loss from one forward give what two separate passes give:
/// the full-sequence scores and `evaluate_loss` over prompt + continuation (continuations of
/// different lengths, one row without any, a sliding-window model so the cache cut matters,
/// and a linear-attention model whose recurrent state cannot be cut: its prompts run again).
#[test]
fn one_pass_scores_and_loss_equal_separate_passes() {
    use ember_train::data::IGNORE;
    use ember_train::eval::{label_scores_and_gold_loss, GoldContinuation};
    for arch in ["gemma2", "qwen3", "qwen3_5"] {
        let model = CausalLm::<B>::from_dir(&fixtures().join(arch), &Default::default()).unwrap();
        let prompts = vec![
            vec![1u32, 36, 71, 67, 332, 17, 99, 120, 5],
            vec![1u32, 52],
            vec![1u32, 52, 295, 324, 268, 315, 81],
        ];
        let gold = vec![
            GoldContinuation {
                tokens: vec![87, 12, 2],
                labels: vec![87, 12, 2],
            },
            GoldContinuation::default(),
            GoldContinuation {
                tokens: vec![65, 2],
                labels: vec![IGNORE, 2],
            },
        ];
        let candidates = vec![vec![65u32, 12], vec![87u32], vec![300u32, 12, 7]];
        let (scores, (sum, tokens)) = label_scores_and_gold_loss(&model, &prompts, &gold, &candidates, 2, 0, |_| {});
        let full = full_sequence_scores(&model, &prompts, &candidates, 2, 0, |_| {});
        for (a, b) in scores.iter().flatten().zip(full.iter().flatten()) {
            assert!((a - b).abs() < 1e-4, "{arch}: {scores:?} vs {full:?}");
        }
        let samples: Vec<Sample> = prompts
            .iter()
            .zip(&gold)
            .filter(|(_, g)| !g.tokens.is_empty())
            .map(|(p, g)| Sample {
                input_ids: p.iter().chain(&g.tokens).copied().collect(),
                labels: std::iter::repeat_n(IGNORE, p.len())
                    .chain(g.labels.iter().copied())
                    .collect(),
            })
            .collect();
        let separate = evaluate_loss(&model, &samples, 2, 0);
        assert_eq!(tokens, separate.target_tokens);
        let loss = sum / tokens as f64;
        // Same math, other padding (left vs right): equal to f32 rounding.
        assert!(
            (loss - separate.loss).abs() <= 1e-5 * separate.loss,
            "{arch}: {loss} vs {}",
            separate.loss
        );
    }
}
