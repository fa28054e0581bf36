//! The dtype the frozen base is stored and multiplied in.

use std::str::FromStr;

use burn::tensor::FloatDType;
use ember_lora::QuantFormat;
use serde::{Deserialize, Serialize};

/// Storage dtype of the frozen base: its linear weights (attention, MLP, experts, output head)
/// and the embedding table. Norm weights, biases, attention sinks and MoE routers stay f32, as do
/// the activations, LoRA A/B, optimizer moments, the loss and the gradient norm. A half-precision
/// weight multiplies its input cast to that dtype ([`ember_lora::linear`]), so the frozen
/// weights take half the memory of f32 and GPUs multiply them on their bf16/f16 units. A
/// backend without bf16 tensors (burn-ndarray) holds a bf16 base's linear weights and
/// embedding as host blocks ([`ember_lora::QuantFormat::Bf16`], multiplied on AMX tiles where
/// the CPU has them) and its stacked experts in f32.
///
/// The quantized choices keep the frozen base as blocks ([`ember_lora::quant`], QLoRA):
/// `gguf` keeps a GGUF file's quantized tensors as they are stored (all of them, the embedding
/// and output head included); `q8_0`, `q4_0` and `nf4` quantize the decoder's linear layers of
/// any base on load, leaving the embedding and the output head in f32 (as bitsandbytes and
/// QLoRA do). Everything that is not quantized is f32.
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
    /// A GGUF base's quantized tensors kept as stored (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
    Gguf,
    /// Decoder linear layers quantized on load to GGUF's Q8_0 (8-bit, blocks of 32).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Decoder linear layers quantized on load to GGUF's Q4_0 (4-bit, blocks of 32).
    #[serde(rename = "q4_0")]
    Q4_0,
    /// Decoder linear layers quantized on load to bitsandbytes' NF4 (QLoRA: 4-bit NormalFloat,
    /// blocks of 64).
    Nf4,
}

impl BaseDtype {
    /// Every choice.
    pub const ALL: [BaseDtype; 7] = [
        BaseDtype::Float32,
        BaseDtype::Bfloat16,
        BaseDtype::Float16,
        BaseDtype::Gguf,
        BaseDtype::Q8_0,
        BaseDtype::Q4_0,
        BaseDtype::Nf4,
    ];

    /// burn's dtype for the float tensors of the frozen base (f32 for the quantized choices,
    /// whose unquantized tensors stay f32).
    pub fn float_dtype(self) -> FloatDType {
        match self {
            BaseDtype::Bfloat16 => FloatDType::BF16,
            BaseDtype::Float16 => FloatDType::F16,
            _ => FloatDType::F32,
        }
    }

    /// The block format linear layers are quantized to on load (`q8_0`, `q4_0`, `nf4`).
    pub fn quantize_on_load(self) -> Option<QuantFormat> {
        match self {
            BaseDtype::Q8_0 => Some(QuantFormat::Q8_0),
            BaseDtype::Q4_0 => Some(QuantFormat::Q4_0),
            BaseDtype::Nf4 => Some(QuantFormat::Nf4),
            _ => None,
        }
    }

    /// Whether the frozen base is (partly) held as quantized blocks.
    pub fn is_quantized(self) -> bool {
        self == BaseDtype::Gguf || self.quantize_on_load().is_some()
    }

    /// Whether this is a 16-bit dtype (which burn-ndarray cannot hold).
    pub fn is_half(self) -> bool {
        matches!(self, BaseDtype::Bfloat16 | BaseDtype::Float16)
    }

    /// The canonical name (`float32`, `bfloat16`, `float16`, `gguf`, `q8_0`, `q4_0`, `nf4`).
    pub fn name(self) -> &'static str {
        match self {
            BaseDtype::Float32 => "float32",
            BaseDtype::Bfloat16 => "bfloat16",
            BaseDtype::Float16 => "float16",
            BaseDtype::Gguf => "gguf",
            BaseDtype::Q8_0 => "q8_0",
            BaseDtype::Q4_0 => "q4_0",
            BaseDtype::Nf4 => "nf4",
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
            .ok_or_else(|| format!("`{s}`: use float32, bfloat16, float16, gguf, q8_0, q4_0 or nf4"))
    }
}

#[cfg(test)]
mod tests {
    use super::{BaseDtype, QuantFormat};

    #[test]
    fn names_and_aliases_parse() {
        for dtype in BaseDtype::ALL {
            assert_eq!(dtype.name().parse::<BaseDtype>().unwrap(), dtype);
            assert_eq!(dtype.to_string(), dtype.name());
        }
        assert_eq!("float32".parse::<BaseDtype>().unwrap(), BaseDtype::Float32);
        assert_eq!("bf16".parse::<BaseDtype>().unwrap(), BaseDtype::Bfloat16);
        assert_eq!("fp16".parse::<BaseDtype>().unwrap(), BaseDtype::Float16);
        assert_eq!("q4_0".parse::<BaseDtype>().unwrap(), BaseDtype::Q4_0);
        assert_eq!(BaseDtype::Nf4.quantize_on_load(), Some(QuantFormat::Nf4));
        assert!(BaseDtype::Gguf.is_quantized() && !BaseDtype::Gguf.is_half());
        let err = "int8".parse::<BaseDtype>().unwrap_err();
        assert!(err.contains("int8") && err.contains("bfloat16"), "{err}");
    }
}
