//! GGUF: block dequantization against gguf-py, name mapping, the q/k permutation, whole Qwen
//! models, and errors.
//!
//! Reference: `tests/fixtures/gguf_quants/quants.json` from `gen_quants.py` beside it
//! (gguf-py 0.19.0 `gguf.quants.dequantize`).

mod common;

use common::{assert_close, fixtures, masked_max_diff, reference, Inputs, TestBackend};
use ember_model::gguf::{dequantize, hf_name, unpermute, GgufFile};
use ember_model::CausalLm;

#[test]
fn block_formats_dequantize_as_gguf_py() {
    let text = std::fs::read_to_string(common::fixtures().join("gguf_quants/quants.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (name, case) in cases.as_object().unwrap() {
        let kind = case["ggml_type"].as_u64().unwrap() as u32;
        let bytes: Vec<u8> = case["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = dequantize(kind, &bytes, want.len()).unwrap_or_else(|| panic!("{name} unsupported"));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name} value {i}: {a} vs {b}");
        }
    }
}

#[test]
fn llama_cpp_names_map_to_hf_names() {
    assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
    assert_eq!(
        hf_name("blk.12.attn_q.weight").unwrap(),
        "model.layers.12.self_attn.q_proj.weight"
    );
    assert_eq!(
        hf_name("blk.0.ffn_down.weight").unwrap(),
        "model.layers.0.mlp.down_proj.weight"
    );
    assert_eq!(
        hf_name("blk.3.ffn_norm.weight").unwrap(),
        "model.layers.3.post_attention_layernorm.weight"
    );
    assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
    assert!(hf_name("blk.0.unknown.weight").is_none());
}

/// llama.cpp's convert script permutes q/k rows as `reshape(h, 2, d/2, in).swapaxes(1, 2)`;
/// `unpermute` must invert exactly that.
#[test]
fn unpermute_inverts_llama_cpp_permute() {
    let (heads, head_dim, cols) = (3, 8, 2);
    let rows = heads * head_dim;
    let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    // permute: GGUF row (h, i, j) = HF row (h, j, i), i < d/2, j < 2.
    let mut gguf = vec![0.0; hf.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..head_dim / 2 {
                let hf_row = h * head_dim + j * head_dim / 2 + i;
                let gguf_row = h * head_dim + i * 2 + j;
                gguf[gguf_row * cols..(gguf_row + 1) * cols].copy_from_slice(&hf[hf_row * cols..(hf_row + 1) * cols]);
            }
        }
    }
    assert_ne!(gguf, hf);
    assert_eq!(unpermute(&gguf, &[rows, cols], heads), hf);
}

/// A minimal GGUF v3 file: one string and one u32 key, one F32 tensor of 4 values.
fn tiny_gguf() -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(2u64.to_le_bytes()); // kv
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "llama.block_count");
    b.extend(4u32.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    s(&mut b, "output_norm.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // F32
    b.extend(0u64.to_le_bytes()); // offset
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for v in [1.0f32, 2.0, 3.0, 4.0] {
        b.extend(v.to_le_bytes());
    }
    b
}

#[test]
fn gguf_header_and_tensor_read() {
    let dir = std::env::temp_dir().join(format!("ember-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, tiny_gguf()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.architecture(), "llama");
    let t = file.tensors[0].clone();
    assert_eq!(file.read(&t).unwrap(), (vec![1.0, 2.0, 3.0, 4.0], vec![4]));
    // The metadata lacks the model sizes: the error names the key.
    let err = file.hf_config().unwrap_err().to_string();
    assert!(
        err.contains("llama.") && err.contains("missing from the GGUF metadata"),
        "{err}"
    );
}

#[test]
fn broken_gguf_files_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("ember-gguf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.gguf");
    let good = tiny_gguf();
    std::fs::write(&path, &good[..good.len() - 8]).unwrap();
    let err = GgufFile::open(&path).err().expect("truncated").to_string();
    assert!(err.contains("bad.gguf") && err.contains("truncated"), "{err}");
    std::fs::write(&path, &good[..30]).unwrap();
    let err = GgufFile::open(&path).err().expect("truncated header").to_string();
    assert!(err.contains("truncated"), "{err}");
    std::fs::write(&path, b"GGML\x03\x00\x00\x00").unwrap();
    let err = GgufFile::open(&path).err().expect("magic").to_string();
    assert!(err.contains("bad magic"), "{err}");
    let mut v1 = good.clone();
    v1[4] = 1;
    std::fs::write(&path, &v1).unwrap();
    let err = GgufFile::open(&path).err().expect("version").to_string();
    assert!(err.contains("version 1"), "{err}");
    // An unsupported quantization names the type and the tensor.
    let mut q5 = good.clone();
    let pos = q5.windows(18).position(|w| w == b"output_norm.weight").unwrap() + 18 + 4 + 8;
    q5[pos..pos + 4].copy_from_slice(&6u32.to_le_bytes());
    std::fs::write(&path, &q5).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let err = file.read(&file.tensors[0].clone()).unwrap_err().to_string();
    assert!(err.contains("Q5_0") && err.contains("output_norm.weight"), "{err}");
}

/// Qwen2 (q/k/v bias) and Qwen3 (q/k norm, head_dim ≠ hidden/heads) GGUFs, written the way
/// llama.cpp's converter writes them (`tests/fixtures/gguf_arch/gen_gguf_arch.py`: no q/k
/// permutation for these architectures), give transformers' logits of the HF fixture.
#[test]
fn qwen_gguf_files_give_transformers_logits() {
    for arch in ["qwen2", "qwen3"] {
        let path = fixtures().join("gguf_arch").join(format!("{arch}.gguf"));
        let model = CausalLm::<TestBackend>::from_path(&path, &Default::default()).unwrap();
        assert_eq!(model.config().model_type, arch);
        let inputs = Inputs::read(arch);
        let logits = model
            .forward(inputs.to_model_input())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let (expected, shape) = reference(&fixtures().join(arch).join("logits.safetensors"), "logits");
        assert_close(
            &format!("{arch} GGUF logits"),
            masked_max_diff(&logits, &expected, &shape, &inputs.attention_mask),
            1e-4,
        );
    }
}

/// Llama 3.1/3.2 GGUFs carry the llama3 RoPE scaling as llama.cpp's `rope_freqs.weight`
/// divisors: `llama_rope3.gguf` (the llama_rope3 fixture as llama.cpp's converter writes it,
/// `gen_gguf_arch.py`) gives transformers' logits, with the scaling recovered into the config.
#[test]
fn llama3_rope_freqs_give_transformers_logits() {
    let path = fixtures().join("gguf_arch/llama_rope3.gguf");
    let config = ember_model::gguf::GgufFile::open(&path).unwrap().hf_config().unwrap();
    assert_eq!(
        config["rope_scaling"],
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    );
    let model = CausalLm::<TestBackend>::from_path(&path, &Default::default()).unwrap();
    let inputs = Inputs::read("llama_rope3");
    let logits = model
        .forward(inputs.to_model_input())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let (expected, shape) = reference(&fixtures().join("llama_rope3/logits.safetensors"), "logits");
    assert_close(
        "llama_rope3 GGUF logits",
        masked_max_diff(&logits, &expected, &shape, &inputs.attention_mask),
        1e-4,
    );
}

/// Llama-3.1-8B's divisors (head_dim 128, θ 500000, factor 8, low 1, high 4, 8192: six on the
/// ramp) are recovered exactly, with 8192 assumed when the GGUF does not say; divisors that no
/// llama3 scaling gives are refused.
#[test]
fn llama3_scaling_is_recovered_from_its_divisors() {
    use ember_model::gguf::{llama3_rope_factors, llama3_scaling_from_factors};
    let factors: Vec<f32> = llama3_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192.0)
        .iter()
        .map(|&f| f as f32)
        .collect();
    let ramp = factors.iter().filter(|&&f| f > 1.0 && f < 8.0).count();
    assert!(ramp >= 2, "{ramp} divisors on the ramp");
    let scaling = llama3_scaling_from_factors(&factors, 500000.0, 128, 8192.0).unwrap();
    assert_eq!(
        scaling,
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    );
    let mut bent = factors.clone();
    bent[30] *= 1.01;
    let err = llama3_scaling_from_factors(&bent, 500000.0, 128, 8192.0).unwrap_err();
    assert!(err.contains("divisor"), "{err}");
    assert!(llama3_scaling_from_factors(&factors[..10], 500000.0, 128, 8192.0).is_err());
    assert_eq!(
        llama3_scaling_from_factors(&[1.0; 64], 500000.0, 128, 8192.0).unwrap(),
        serde_json::Value::Null
    );
}
