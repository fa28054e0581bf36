//! Helpers shared by the golden tests: fixture paths, inputs, reference tensors, comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use ember_model::{ModelInput, Weights};

/// Every fixture with PEFT adapters (a folder holding `adapter_random_b/`): one or more per
/// row of the family table (`llama_rope3` shares llama's row, `*_wrapped` is the family inside
/// its multimodal wrapper). `every_family_has_a_fixture` (loading.rs) checks the coverage.
pub fn families() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("adapter_random_b").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// The backend every test runs on: burn-ndarray, or burn-wgpu when the crate is tested with
/// `--features wgpu` (CI runs the golden tests that way on Mesa's software Vulkan driver).
#[cfg(not(feature = "wgpu"))]
pub type TestBackend = burn::backend::NdArray<f32>;
/// The backend every test runs on: burn-wgpu (`--features wgpu`).
#[cfg(feature = "wgpu")]
pub type TestBackend = burn::backend::Wgpu;

/// `tests/fixtures/` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The fixtures' `inputs.json`.
#[derive(serde::Deserialize)]
pub struct Inputs {
    pub input_ids: Vec<Vec<i64>>,
    pub attention_mask: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    /// Explicit positions (the 2026 fixtures, left-padded); absent = `0..seq` per row.
    #[serde(default, deserialize_with = "positions_or_note")]
    pub position_ids: Option<Vec<Vec<i64>>>,
}

impl Inputs {
    pub fn read(arch: &str) -> Self {
        let path = fixtures().join(arch).join("inputs.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    pub fn dims(&self) -> [usize; 2] {
        [self.input_ids.len(), self.input_ids[0].len()]
    }

    pub fn to_model_input(&self) -> ModelInput<TestBackend> {
        self.model_input(&Default::default())
    }

    pub fn model_input<B: burn::tensor::backend::Backend>(&self, device: &B::Device) -> ModelInput<B> {
        let device = device.clone();
        let dims = self.dims();
        let ids: Vec<i64> = self.input_ids.concat();
        let mask: Vec<i64> = self.attention_mask.concat();
        ModelInput {
            input_ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, dims), &device),
            attention_mask: Some(Tensor::from_data(TensorData::new(mask, dims), &device)),
            position_ids: self
                .position_ids
                .as_ref()
                .map(|p| Tensor::from_data(TensorData::new(p.concat(), dims), &device)),
            segment_ids: None,
        }
    }
}

/// Reads one f32 tensor from a safetensors file, with its shape.
pub fn reference(path: &std::path::Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    let weights = Weights::open_files(path.parent().unwrap(), &[path.to_path_buf()]).unwrap();
    let (shape, _) = weights
        .info(key)
        .unwrap_or_else(|| panic!("no `{key}` in {}", path.display()));
    (weights.read_f32(key, &shape).unwrap(), shape)
}

/// Max |a - b| over rows `[batch, seq, ...]` where `mask[b][s] == 1`; returns (max, index).
pub fn masked_max_diff(actual: &[f32], expected: &[f32], dims: &[usize], mask: &[Vec<i64>]) -> (f32, usize) {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let row: usize = dims[2..].iter().product();
    let seq = dims[1];
    let mut worst = (0.0f32, 0usize);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let pos = i / row;
        if mask[pos / seq][pos % seq] == 0 {
            continue;
        }
        let d = (a - e).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i);
        }
    }
    worst
}

/// Per-token causal-LM loss, `[batch, seq-1]`, 0 where the label is -100.
pub fn per_token_loss(logits: &[f32], dims: [usize; 3], labels: &[Vec<i64>]) -> Vec<f32> {
    let [batch, seq, vocab] = dims;
    let mut out = vec![0.0f32; batch * (seq - 1)];
    for b in 0..batch {
        for t in 0..seq - 1 {
            let label = labels[b][t + 1];
            if label < 0 {
                continue;
            }
            let row = &logits[(b * seq + t) * vocab..(b * seq + t + 1) * vocab];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
            out[b * (seq - 1) + t] = (lse - row[label as usize] as f64) as f32;
        }
    }
    out
}

/// Asserts `max <= tol`, printing where the worst difference is.
pub fn assert_close(what: &str, (max, at): (f32, usize), tol: f32) {
    println!("{what}: max abs diff {max:.3e} at flat index {at}");
    assert!(
        max <= tol,
        "{what}: max abs diff {max:.3e} at flat index {at} exceeds {tol:.0e}"
    );
}

/// `position_ids` of an inputs.json: explicit positions, or (the 2025 fixtures) a note saying
/// transformers used `0..seq`.
pub fn positions_or_note<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Vec<i64>>>, D::Error> {
    use serde::Deserialize;
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(rows) => {
            Some(serde_json::from_value(serde_json::Value::Array(rows)).map_err(serde::de::Error::custom)?)
        }
        _ => None,
    })
}
