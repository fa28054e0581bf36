//! Reading safetensors checkpoints: one file or shards with an index, memory-mapped, every
//! tensor converted to f32 on the host before it reaches the backend.
//!
//! [`Weights`] hands out tensors by HF key and remembers which were taken, so that loading can
//! report missing keys, unexpected keys and shape mismatches by name.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use ember_lora::QuantMatrix;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};

/// f32 tensors on the host by key, with their shapes.
pub type HostTensors = BTreeMap<String, (Vec<f32>, Vec<usize>)>;

/// The storage dtype of a checkpoint tensor.
pub type StorageDtype = Dtype;

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only; a concurrent writer truncating it is outside
        // what any model loader can defend against (transformers and candle map the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::CorruptWeights {
            path: path.to_path_buf(),
            message: format!("{e:?}"),
        })?;
        let tensors = metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }
}

/// A checkpoint opened for loading: every tensor of every shard, by key.
pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    index: BTreeMap<String, usize>,
    /// Tensors already in memory (e.g. dequantized from GGUF), by key.
    memory: HostTensors,
    /// Quantized tensors kept as blocks (a GGUF base under `base_dtype: gguf`), by key; each is
    /// moved out when the model takes it.
    quantized: RefCell<BTreeMap<String, QuantMatrix>>,
    /// The keys of `quantized`, taken or not, with their shapes.
    quantized_shapes: BTreeMap<String, Vec<usize>>,
    taken: RefCell<BTreeSet<String>>,
}

impl Weights {
    /// Opens `model.safetensors` or `model.safetensors.index.json` + shards in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
            if let Some((key, file)) = parsed
                .weight_map
                .iter()
                .find(|(_, f)| !ember_lora::atomic::is_plain_file_name(f))
            {
                return Err(ModelError::InvalidConfig {
                    path: index.clone(),
                    key: format!("weight_map.{key}"),
                    message: format!("{file:?} is not a plain file name inside the model folder"),
                });
            }
            let files: BTreeSet<&String> = parsed.weight_map.values().collect();
            let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
            let weights = Self::open_files(dir, &paths)?;
            for (key, file) in &parsed.weight_map {
                if !weights.index.contains_key(key) {
                    return Err(ModelError::MissingTensor {
                        key: format!("{key} (listed in the index for `{file}`)"),
                        dir: dir.to_path_buf(),
                    });
                }
            }
            Ok(weights)
        } else if single.exists() {
            Self::open_files(dir, &[single])
        } else {
            Err(ModelError::NoWeights { dir: dir.to_path_buf() })
        }
    }

    /// Opens the given safetensors files as one checkpoint; `dir` names it in errors.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let shard = Shard::open(path)?;
            for key in shard.tensors.keys() {
                index.insert(key.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
            memory: BTreeMap::new(),
            quantized: RefCell::new(BTreeMap::new()),
            quantized_shapes: BTreeMap::new(),
            taken: RefCell::new(BTreeSet::new()),
        })
    }

    /// Weights held in memory as f32 (`source` names them in errors).
    pub fn from_memory(source: &Path, tensors: HostTensors) -> Self {
        Self::from_memory_with_blocks(source, tensors, BTreeMap::new())
    }

    /// Weights held in memory: f32 tensors and quantized ones kept as blocks.
    pub fn from_memory_with_blocks(
        source: &Path,
        tensors: HostTensors,
        quantized: BTreeMap<String, QuantMatrix>,
    ) -> Self {
        let quantized_shapes = quantized.iter().map(|(k, q)| (k.clone(), q.shape().to_vec())).collect();
        Self {
            dir: source.to_path_buf(),
            shards: Vec::new(),
            index: BTreeMap::new(),
            memory: tensors,
            quantized: RefCell::new(quantized),
            quantized_shapes,
            taken: RefCell::new(BTreeSet::new()),
        }
    }

    /// Takes `key` as quantized blocks when it is held so (else `None`), checking its shape.
    pub fn take_quantized(&self, key: &str, expected: [usize; 2]) -> Result<Option<QuantMatrix>> {
        let Some(shape) = self.quantized_shapes.get(key) else {
            return Ok(None);
        };
        self.check_shape(key, shape, &expected)?;
        let matrix = self.quantized.borrow_mut().remove(key);
        if matrix.is_some() {
            self.taken.borrow_mut().insert(key.to_string());
        }
        Ok(matrix)
    }

    /// Errors unless a held tensor's `shape` is `expected`.
    fn check_shape(&self, key: &str, shape: &[usize], expected: &[usize]) -> Result<()> {
        if shape == expected {
            return Ok(());
        }
        Err(ModelError::ShapeMismatch {
            key: key.to_string(),
            path: self.dir.clone(),
            expected: expected.to_vec(),
            found: shape.to_vec(),
        })
    }

    /// The folder or file the weights come from.
    pub fn source(&self) -> &Path {
        &self.dir
    }

    /// Whether any tensor is held as quantized blocks.
    pub fn has_quantized(&self) -> bool {
        !self.quantized_shapes.is_empty()
    }

    /// Whether the checkpoint holds `key` (also as gpt-oss MXFP4 `{key}_blocks`/`_scales`).
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
            || self.memory.contains_key(key)
            || self.quantized_shapes.contains_key(key)
            || self.index.contains_key(&format!("{key}_blocks"))
    }

    /// The stored bytes of `key` with its header entry and file.
    fn raw(&self, key: &str) -> Result<(&[u8], &TensorInfo, &Path)> {
        let shard_index = *self.index.get(key).ok_or_else(|| ModelError::MissingTensor {
            key: key.to_string(),
            dir: self.dir.clone(),
        })?;
        let shard = &self.shards[shard_index];
        let info = &shard.tensors[key];
        let (start, end) = info.data_offsets;
        Ok((
            &shard.mmap[shard.data_start + start..shard.data_start + end],
            info,
            &shard.path,
        ))
    }

    /// gpt-oss experts stored as MXFP4: `{key}_blocks` (u8, two e2m1 values per byte, low
    /// nibble first, `[experts, rows, groups, 16]` or `[experts, rows, groups·16]`) and
    /// `{key}_scales` (u8 exponents biased by 127, one per 32 values, `[experts, rows, groups]`),
    /// dequantised and transposed to `[experts, groups·32, rows]` as transformers'
    /// `convert_moe_packed_tensors` does. `None` when the checkpoint has no such pair.
    fn read_mxfp4(&self, key: &str, expected: &[usize]) -> Result<Option<Vec<f32>>> {
        const FP4: [f32; 16] = [
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        ];
        let (blocks_key, scales_key) = (format!("{key}_blocks"), format!("{key}_scales"));
        if !self.index.contains_key(&blocks_key) {
            return Ok(None);
        }
        let (blocks, blocks_info, path) = self.raw(&blocks_key)?;
        let (scales, scales_info, _) = self.raw(&scales_key)?;
        let bad = |message: String| ModelError::CorruptWeights {
            path: path.to_path_buf(),
            message: format!("`{blocks_key}`: {message}"),
        };
        if blocks_info.dtype != Dtype::U8 || scales_info.dtype != Dtype::U8 || scales_info.shape.len() != 3 {
            return Err(bad(format!(
                "MXFP4 needs u8 blocks and 3-d u8 scales, found {:?} {:?} and {:?} {:?}",
                blocks_info.dtype, blocks_info.shape, scales_info.dtype, scales_info.shape
            )));
        }
        let [experts, rows, groups] = [scales_info.shape[0], scales_info.shape[1], scales_info.shape[2]];
        let cols = groups * 32;
        if blocks.len() != experts * rows * groups * 16 || scales.len() != experts * rows * groups {
            return Err(bad(format!(
                "{} block bytes and {} scales do not fit scales shape {:?}",
                blocks.len(),
                scales.len(),
                scales_info.shape
            )));
        }
        if expected != [experts, cols, rows] {
            return Err(ModelError::ShapeMismatch {
                key: blocks_key,
                path: path.to_path_buf(),
                expected: expected.to_vec(),
                found: vec![experts, cols, rows],
            });
        }
        let mut out = vec![0.0f32; experts * cols * rows];
        for e in 0..experts {
            for r in 0..rows {
                for g in 0..groups {
                    let scale_index = (e * rows + r) * groups + g;
                    let scale = 2f32.powi(scales[scale_index] as i32 - 127);
                    for (b, &byte) in blocks[scale_index * 16..scale_index * 16 + 16].iter().enumerate() {
                        let c = g * 32 + 2 * b;
                        out[(e * cols + c) * rows + r] = FP4[(byte & 0x0F) as usize] * scale;
                        out[(e * cols + c + 1) * rows + r] = FP4[(byte >> 4) as usize] * scale;
                    }
                }
            }
        }
        let mut taken = self.taken.borrow_mut();
        taken.insert(blocks_key);
        taken.insert(scales_key);
        Ok(Some(out))
    }

    /// All keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.index
            .keys()
            .chain(self.memory.keys())
            .chain(self.quantized_shapes.keys())
    }

    /// The stored shape and dtype of `key` (quantized blocks report `U8`).
    pub fn info(&self, key: &str) -> Option<(Vec<usize>, StorageDtype)> {
        if let Some((_, shape)) = self.memory.get(key) {
            return Some((shape.clone(), StorageDtype::F32));
        }
        if let Some(shape) = self.quantized_shapes.get(key) {
            return Some((shape.clone(), StorageDtype::U8));
        }
        let shard = &self.shards[*self.index.get(key)?];
        let info = &shard.tensors[key];
        Some((info.shape.clone(), info.dtype))
    }

    /// The stored dtype most tensors have (what `inspect` reports).
    pub fn dominant_dtype(&self) -> Option<StorageDtype> {
        let mut counts: BTreeMap<String, (usize, StorageDtype)> = BTreeMap::new();
        for shard in &self.shards {
            for info in shard.tensors.values() {
                let n = info.shape.iter().product::<usize>();
                let e = counts.entry(format!("{:?}", info.dtype)).or_insert((0, info.dtype));
                e.0 += n;
            }
        }
        counts.into_values().max_by_key(|(n, _)| *n).map(|(_, d)| d)
    }

    /// Reads `key` as f32 values, checking the stored shape against `expected`.
    pub fn read_f32(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>> {
        if let Some((values, shape)) = self.memory.get(key) {
            self.check_shape(key, shape, expected)?;
            self.taken.borrow_mut().insert(key.to_string());
            return Ok(values.clone());
        }
        if let Some(shape) = self.quantized_shapes.get(key) {
            // Quantized blocks asked for as floats (a tensor Ember keeps dense): dequantized.
            self.check_shape(key, shape, expected)?;
            let matrix = self
                .quantized
                .borrow_mut()
                .remove(key)
                .ok_or_else(|| ModelError::MissingTensor {
                    key: format!("{key} (already taken)"),
                    dir: self.dir.clone(),
                })?;
            self.taken.borrow_mut().insert(key.to_string());
            return Ok(matrix.dequantize());
        }
        if !self.index.contains_key(key) {
            if let Some(values) = self.read_mxfp4(key, expected)? {
                return Ok(values);
            }
        }
        let (bytes, info, path) = self.raw(key)?;
        if info.shape != expected {
            return Err(ModelError::ShapeMismatch {
                key: key.to_string(),
                path: path.to_path_buf(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let values =
            ember_lora::adapter::bytes_to_f32(bytes, info.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
                key: key.to_string(),
                path: path.to_path_buf(),
                dtype: format!("{:?}", info.dtype),
            })?;
        self.taken.borrow_mut().insert(key.to_string());
        Ok(values)
    }

    /// Reads `key` into a backend tensor of rank `D` with shape `expected`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        key: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        self.tensor_as(key, expected, device, FloatDType::F32)
    }

    /// [`Weights::tensor`] stored in `dtype` on the device (converted from f32 on the host, one
    /// tensor at a time, so a bf16 model never exists in f32 as a whole).
    pub fn tensor_as<B: Backend, const D: usize>(
        &self,
        key: &str,
        expected: [usize; D],
        device: &B::Device,
        dtype: FloatDType,
    ) -> Result<Tensor<B, D>> {
        let values = self.read_f32(key, &expected)?;
        Ok(Tensor::from_data(
            TensorData::new(values, expected),
            (device, DType::from(dtype)),
        ))
    }

    /// Marks `key` as deliberately unused (e.g. a stored copy of a tied `lm_head`).
    pub fn skip(&self, key: &str) {
        self.taken.borrow_mut().insert(key.to_string());
    }

    /// Errors if any tensor of the checkpoint was not taken.
    pub fn ensure_all_used(&self) -> Result<()> {
        let taken = self.taken.borrow();
        let left: Vec<&str> = self
            .keys()
            .filter(|k| !taken.contains(*k))
            // Older checkpoints store RoPE tables as buffers; they are recomputed.
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .map(String::as_str)
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(ModelError::UnexpectedTensors {
                keys: left.join(", "),
                dir: self.dir.clone(),
            })
        }
    }
}
