//! PEFT's adapter files: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module path>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`.
//!
//! Tensors are held on the host as f32 ([`AdapterTensors`]); the model crate moves them into
//! [`crate::LoraLinear`] layers.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use crate::atomic::Staging;
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};

/// The file name of the adapter config.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The file name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// A stored tensor: f32 values and shape.
type Stored = (Vec<f32>, Vec<usize>);

/// One module's A and B, f32 on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterTensors {
    /// `lora_A.weight`, row-major `[r, in]`.
    pub lora_a: Vec<f32>,
    /// `[r, in]`.
    pub a_shape: [usize; 2],
    /// `lora_B.weight`, row-major `[out, r]`.
    pub lora_b: Vec<f32>,
    /// `[out, r]`.
    pub b_shape: [usize; 2],
}

impl AdapterTensors {
    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a_shape[0]
    }

    /// `W ← W + scaling·B·A` for a row-major `[out, in]` weight in f32 (one gemm call, on
    /// all cores): the merge, as PEFT computes it up to the rounding of the last addition.
    ///
    /// # Shapes
    /// - `weight`: `[out, in]` row-major, `out·in` values
    pub fn add_delta_to(&self, weight: &mut [f32], scaling: f64) {
        let [r, inp] = self.a_shape;
        let out = self.b_shape[0];
        assert_eq!(weight.len(), out * inp, "the weight is [out, in]");
        // SAFETY: the three buffers hold [out, r], [r, in] and [out, in] row-major values (the
        // assert above and the adapter's checked shapes) and do not overlap.
        unsafe {
            gemm::gemm(
                out,
                inp,
                r,
                weight.as_mut_ptr(),
                1,
                inp as isize,
                true,
                self.lora_b.as_ptr(),
                1,
                r as isize,
                self.lora_a.as_ptr(),
                1,
                inp as isize,
                1.0f32,
                scaling as f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
    }
}

/// An adapter as stored on disk: its config, the base it was made for, and its tensors by
/// module path (`model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    /// The LoRA settings.
    pub config: LoraConfig,
    /// `base_model_name_or_path` from the config.
    pub base_model_name_or_path: Option<String>,
    /// A and B of every adapted module.
    pub tensors: BTreeMap<String, AdapterTensors>,
    /// Write `target_modules` as the adapted modules' full paths whatever the config says:
    /// for a multimodal wrapper, whose vision tower PEFT would otherwise also match by the
    /// short names (and crash on, for Gemma 4's clippable linears).
    pub exact_targets: bool,
}

/// Converts a stored floating-point tensor to f32; `None` for other dtypes.
pub fn view_to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    bytes_to_f32(view.data(), view.dtype())
}

/// Converts little-endian stored values to f32; `None` for dtypes that are not floating point.
pub fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// f32 values as little-endian bytes.
pub fn f32_to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoraError + '_ {
    move |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl AdapterFiles {
    /// Reads a PEFT adapter folder. Unsupported features (DoRA, embedding LoRA, LoRA biases,
    /// modules_to_save, ...) are refused before any tensor is used.
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config = LoraConfig::from_peft_file(&config_path)?;
        let raw: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).map_err(io(&config_path))?)
            .map_err(|source| LoraError::Json {
                path: config_path.clone(),
                source,
            })?;
        let base_model_name_or_path = raw
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(LoraError::Unsupported {
                path: dir.join("adapter_model.bin"),
                feature: "pickled adapter_model.bin (convert to safetensors with PEFT's save_pretrained(safe_serialization=True))".into(),
            });
        }
        let bytes = std::fs::read(&weights_path).map_err(io(&weights_path))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| LoraError::Safetensors {
            path: weights_path.clone(),
            message: format!("{e:?}"),
        })?;
        let mut halves: BTreeMap<String, (Option<Stored>, Option<Stored>)> = BTreeMap::new();
        for (key, view) in st.tensors() {
            let unexpected = |message: &str| LoraError::UnexpectedTensor {
                path: weights_path.clone(),
                key: key.clone(),
                message: message.to_string(),
            };
            let refused = |feature: &str| LoraError::Unsupported {
                path: weights_path.clone(),
                feature: format!("{feature} (tensor `{key}`)"),
            };
            if key.contains("lora_embedding_A") || key.contains("lora_embedding_B") {
                return Err(refused("LoRA on embeddings"));
            }
            if key.contains("lora_magnitude_vector") {
                return Err(refused("DoRA"));
            }
            if key.contains("modules_to_save") || key.contains("trainable_tokens") {
                return Err(refused("fully trained extra modules"));
            }
            let path = key
                .strip_prefix(KEY_PREFIX)
                .ok_or_else(|| unexpected("keys must start with `base_model.model.`"))?;
            let (module, is_a) = if let Some(m) = path.strip_suffix(".lora_A.weight") {
                (m, true)
            } else if let Some(m) = path.strip_suffix(".lora_B.weight") {
                (m, false)
            } else if path.ends_with(".lora_B.bias") {
                return Err(refused("LoRA bias"));
            } else {
                return Err(unexpected("not a lora_A/lora_B weight"));
            };
            if view.shape().len() != 2 {
                return Err(unexpected(&format!(
                    "rank-{} tensor, LoRA weights are 2-D",
                    view.shape().len()
                )));
            }
            let values = view_to_f32(&view).ok_or_else(|| unexpected(&format!("dtype {:?}", view.dtype())))?;
            if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
                return Err(unexpected(&format!(
                    "holds {bad} (NaN or infinite values; was the run that wrote it diverging?)"
                )));
            }
            let entry = halves.entry(module.to_string()).or_default();
            let slot = if is_a { &mut entry.0 } else { &mut entry.1 };
            *slot = Some((values, view.shape().to_vec()));
        }
        let mut tensors = BTreeMap::new();
        for (module, (a, b)) in halves {
            let missing = |half: &str| LoraError::MissingTensor {
                path: weights_path.clone(),
                key: format!("{KEY_PREFIX}{module}.{half}.weight"),
            };
            let (lora_a, a_shape) = a.ok_or_else(|| missing("lora_A"))?;
            let (lora_b, b_shape) = b.ok_or_else(|| missing("lora_B"))?;
            if b_shape[1] != a_shape[0] {
                return Err(LoraError::ShapeMismatch {
                    key: format!("{KEY_PREFIX}{module}.lora_B.weight"),
                    expected: vec![b_shape[0], a_shape[0]],
                    found: b_shape,
                });
            }
            let expected_r = config.module_lora(&module).r;
            // A stacked expert parameter's flat pair holds experts × its rank rows; which
            // parameter a key holds (and so its rank) only the model can tell.
            let stacked = config.wraps_parameter_of(&module) && !config.targets_parameter(&format!("{module}.weight"));
            if a_shape[0] != expected_r && !stacked {
                return Err(LoraError::ShapeMismatch {
                    key: format!("{KEY_PREFIX}{module}.lora_A.weight (r = {expected_r} by adapter_config.json)"),
                    expected: vec![expected_r, a_shape[1]],
                    found: a_shape,
                });
            }
            tensors.insert(
                module,
                AdapterTensors {
                    lora_a,
                    a_shape: [a_shape[0], a_shape[1]],
                    lora_b,
                    b_shape: [b_shape[0], b_shape[1]],
                },
            );
        }
        if tensors.is_empty() {
            return Err(LoraError::MissingTensor {
                path: weights_path,
                key: "any lora_A/lora_B weight".into(),
            });
        }
        Ok(Self {
            config,
            base_model_name_or_path,
            tensors,
            exact_targets: false,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` atomically:
    /// both go to a temporary folder beside `dir` that is renamed over it at the end.
    pub fn write(&self, dir: &Path) -> Result<()> {
        // Modules whose adapters wrap a parameter (routers, stacked experts) are reached by
        // `target_parameters`: naming them as modules would make PEFT wrap them as layers.
        let targets: Vec<String> = self
            .tensors
            .keys()
            .filter(|module| !self.config.wraps_parameter_of(module))
            .cloned()
            .collect();
        let mut config = self
            .config
            .to_peft_json(self.base_model_name_or_path.as_deref(), &targets);
        if self.exact_targets {
            config["target_modules"] = Value::from(targets.clone());
        }
        let staging = Staging::new(dir)?;
        let config_path = staging.path().join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&config).map_err(|source| LoraError::Json {
            path: config_path.clone(),
            source,
        })?;
        std::fs::write(&config_path, text + "\n").map_err(io(&config_path))?;

        let mut data: Vec<(String, Vec<u8>, [usize; 2])> = Vec::new();
        for (module, t) in &self.tensors {
            data.push((
                format!("{KEY_PREFIX}{module}.lora_A.weight"),
                f32_to_bytes(&t.lora_a),
                t.a_shape,
            ));
            data.push((
                format!("{KEY_PREFIX}{module}.lora_B.weight"),
                f32_to_bytes(&t.lora_b),
                t.b_shape,
            ));
        }
        let weights_path = staging.path().join(WEIGHTS_FILE);
        write_safetensors(&weights_path, &data)?;
        staging.commit(dir)
    }
}

/// Writes f32 tensors to a safetensors file with `{"format": "pt"}` metadata.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<u8>, [usize; 2])]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(k, bytes, shape)| {
            TensorView::new(Dtype::F32, shape.to_vec(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| LoraError::Safetensors {
                    path: path.to_path_buf(),
                    message: format!("{k}: {e:?}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| LoraError::Safetensors {
        path: path.to_path_buf(),
        message: format!("cannot write: {e:?}"),
    })
}
