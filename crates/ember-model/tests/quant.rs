//! Quantize-on-load against reference implementations (tests/fixtures/quant/make_reference.py):
//! Q8_0 and Q4_0 against llama.cpp's `gguf.quants.quantize`, NF4 against bitsandbytes' code
//! book and block layout (absmax per 64 values, the first code of a pair in the high nibble).

use std::path::PathBuf;

use ember_lora::{QuantFormat, QuantMatrix};
use serde_json::Value;

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn shape_of(case: &Value) -> [usize; 2] {
    let dims: Vec<usize> = case["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    [dims[0], dims[1]]
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

#[test]
fn q8_0_and_q4_0_blocks_equal_llama_cpps_reference_quantizer() {
    let cases = reference();
    let mut checked = 0;
    for (name, case) in cases.as_object().unwrap() {
        let shape = shape_of(case);
        let values = floats(&case["values"]);
        for (key, format) in [("q8_0", QuantFormat::Q8_0), ("q4_0", QuantFormat::Q4_0)] {
            let Some(expected) = case.get(key) else { continue };
            let q = QuantMatrix::quantize(format, &values, shape).unwrap();
            assert_eq!(q.blocks(), bytes(&expected["blocks"]).as_slice(), "{name} {key} blocks");
            assert_eq!(q.dequantize(), floats(&expected["dequantized"]), "{name} {key} values");
            checked += 1;
        }
    }
    assert_eq!(checked, 2);
}

#[test]
fn nf4_codes_and_absmax_equal_bitsandbytes_layout() {
    let cases = reference();
    for (name, case) in cases.as_object().unwrap() {
        let shape = shape_of(case);
        let values = floats(&case["values"]);
        let q = QuantMatrix::quantize(QuantFormat::Nf4, &values, shape).unwrap();
        let (packed, absmax) = (bytes(&case["nf4"]["packed"]), floats(&case["nf4"]["absmax"]));
        // Ember's NF4 block: the f32 absmax, then bitsandbytes' 32 packed bytes.
        for (i, block) in q.blocks().chunks_exact(36).enumerate() {
            assert_eq!(
                f32::from_le_bytes(block[0..4].try_into().unwrap()),
                absmax[i],
                "{name} absmax {i}"
            );
            assert_eq!(&block[4..], &packed[32 * i..32 * i + 32], "{name} codes of block {i}");
        }
        assert_eq!(q.dequantize(), floats(&case["nf4"]["dequantized"]), "{name} values");
    }
}
