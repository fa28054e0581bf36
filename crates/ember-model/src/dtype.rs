//! The dtype the frozen base is stored and multiplied in.

use std::str::FromStr;

use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

/// Storage dtype of the frozen base: its linear weights (attention, MLP, experts, output head)
/// and the embedding table. Norm weights, biases, attention sinks and MoE routers stay f32, as do
/// the activations, LoRA A/B, optimizer moments, the loss and the gradient norm. A half-precision
/// weight multiplies its input cast to that dtype ([`ember_lora::linear`]), so the frozen
/// weights take half the memory of f32 and GPUs multiply them on their bf16/f16 units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    /// f32 (bf16/f16 checkpoints are upcast on load).
    #[default]
    #[serde(alias = "f32", alias = "fp32")]
    Float32,
    /// bfloat16.
    #[serde(alias = "bf16")]
    Bfloat16,
    /// IEEE float16.
    #[serde(alias = "f16", alias = "fp16")]
    Float16,
}

impl BaseDtype {
    /// Every choice.
    pub const ALL: [BaseDtype; 3] = [BaseDtype::Float32, BaseDtype::Bfloat16, BaseDtype::Float16];

    /// burn's dtype for tensors of the frozen base.
    pub fn float_dtype(self) -> FloatDType {
        match self {
            BaseDtype::Float32 => FloatDType::F32,
            BaseDtype::Bfloat16 => FloatDType::BF16,
            BaseDtype::Float16 => FloatDType::F16,
        }
    }

    /// Whether this is a 16-bit dtype (which burn-ndarray cannot hold).
    pub fn is_half(self) -> bool {
        self != BaseDtype::Float32
    }

    /// The canonical name (`float32`, `bfloat16`, `float16`).
    pub fn name(self) -> &'static str {
        match self {
            BaseDtype::Float32 => "float32",
            BaseDtype::Bfloat16 => "bfloat16",
            BaseDtype::Float16 => "float16",
        }
    }
}

impl std::fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BaseDtype {
    type Err = String;

    /// Parses the canonical names and the short ones (`f32`, `bf16`, `f16`, `fp16`, `fp32`).
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value::<BaseDtype>(serde_json::Value::String(s.trim().to_string()))
            .ok()
            .ok_or_else(|| format!("`{s}`: use float32, bfloat16 or float16"))
    }
}

#[cfg(test)]
mod tests {
    use super::BaseDtype;

    #[test]
    fn names_and_aliases_parse() {
        for dtype in BaseDtype::ALL {
            assert_eq!(dtype.name().parse::<BaseDtype>().unwrap(), dtype);
            assert_eq!(dtype.to_string(), dtype.name());
        }
        assert_eq!("float32".parse::<BaseDtype>().unwrap(), BaseDtype::Float32);
        assert_eq!("bf16".parse::<BaseDtype>().unwrap(), BaseDtype::Bfloat16);
        assert_eq!("fp16".parse::<BaseDtype>().unwrap(), BaseDtype::Float16);
        let err = "int8".parse::<BaseDtype>().unwrap_err();
        assert!(err.contains("int8") && err.contains("bfloat16"), "{err}");
    }
}
