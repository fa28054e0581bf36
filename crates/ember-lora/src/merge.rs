//! Merging an adapter into a safetensors checkpoint, shard by shard.
//!
//! For every adapted module `P`, `P.weight` becomes `W + s·B·A`, computed in f32 whatever the
//! storage dtype. When no dtype changes, a shard is the base file copied by the kernel with the
//! adapted weights written over their own bytes (peak memory: two weights in f32); converting
//! dtypes re-encodes the shard (peak memory: about one output shard). Everything is written
//! into a temporary folder beside the output, renamed at the end; the base is only read.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::adapter::{bytes_to_f32, AdapterFiles, AdapterTensors};
use crate::atomic::{is_plain_file_name, Staging};
use crate::error::{LoraError, Result};

/// Storage dtype of the merged checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    /// Keep each tensor's stored dtype.
    Same,
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl MergeDtype {
    fn target(self, stored: Dtype) -> Dtype {
        let float = matches!(stored, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64);
        match self {
            _ if !float => stored,
            MergeDtype::Same => stored,
            MergeDtype::F32 => Dtype::F32,
            MergeDtype::Bf16 => Dtype::BF16,
            MergeDtype::F16 => Dtype::F16,
        }
    }

    fn config_name(self) -> Option<&'static str> {
        match self {
            MergeDtype::Same => None,
            MergeDtype::F32 => Some("float32"),
            MergeDtype::Bf16 => Some("bfloat16"),
            MergeDtype::F16 => Some("float16"),
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Weights that changed.
    pub merged: Vec<String>,
    /// Shard files written.
    pub shards: Vec<String>,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoraError + '_ {
    move |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The safetensors files of a HF model folder, in order, and whether an index lists them.
pub fn checkpoint_files(dir: &Path) -> Result<(Vec<String>, Option<Value>)> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
        let index: Value = serde_json::from_str(&text).map_err(|source| LoraError::Json {
            path: index_path.clone(),
            source,
        })?;
        let files: BTreeSet<String> = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| LoraError::InvalidConfig {
                key: "weight_map".into(),
                message: format!("missing in `{}`", index_path.display()),
            })?
            .iter()
            .map(|(key, v)| match v.as_str() {
                Some(name) if is_plain_file_name(name) => Ok(name.to_string()),
                _ => Err(LoraError::InvalidConfig {
                    key: format!("weight_map.{key}"),
                    message: format!(
                        "{v} in `{}` is not a plain file name inside the model folder",
                        index_path.display()
                    ),
                }),
            })
            .collect::<Result<_>>()?;
        Ok((files.into_iter().collect(), Some(index)))
    } else if dir.join("model.safetensors").exists() {
        Ok((vec!["model.safetensors".into()], None))
    } else {
        Err(LoraError::Io {
            path: dir.join("model.safetensors"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors or index"),
        })
    }
}

fn open(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(io(path))?;
    // SAFETY: read-only map of a file this process does not modify.
    unsafe { Mmap::map(&file) }.map_err(io(path))
}

fn parse<'a>(path: &Path, mmap: &'a Mmap) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(mmap).map_err(|e| LoraError::Safetensors {
        path: path.to_path_buf(),
        message: format!("{e:?}"),
    })
}

/// A tensor of an output shard: key, dtype, shape and bytes (borrowed from the base's memory
/// map when unchanged).
type OutputTensor<'a> = (String, Dtype, Vec<usize>, std::borrow::Cow<'a, [u8]>);

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    fn collect<const N: usize>(values: &[f32], f: impl Fn(f32) -> [u8; N]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * N);
        for &x in values {
            out.extend_from_slice(&f(x));
        }
        out
    }
    match dtype {
        Dtype::BF16 => collect(values, |x| half::bf16::from_f32(x).to_le_bytes()),
        Dtype::F16 => collect(values, |x| half::f16::from_f32(x).to_le_bytes()),
        Dtype::F64 => collect(values, |x| (x as f64).to_le_bytes()),
        _ => collect(values, f32::to_le_bytes),
    }
}

/// Merges `adapter` into the checkpoint at `base` and writes a complete HF folder at `out`
/// (weights, index, config.json and every other file of the base folder). Refuses an
/// existing `out`, adapters that do not fit the base, and non-finite results.
pub fn merge_checkpoint(base: &Path, adapter: &AdapterFiles, out: &Path, dtype: MergeDtype) -> Result<MergeReport> {
    merge_checkpoint_renamed(base, adapter, out, dtype, &|module| module.to_string())
}

/// One low-rank update of a merge: `W[offset..offset + out·in] += scaling·B·A` on the
/// weight's row-major values (offset 0 and the whole weight for a linear layer; one expert's
/// `[out, in]` slice of a stacked `[experts, out, in]` parameter).
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSlice {
    /// First value of the slice in the weight.
    pub offset: usize,
    /// A `[r, in]` and B `[out, r]`.
    pub tensors: AdapterTensors,
    /// `alpha / r` (or `/ √r`) of the adapted module.
    pub scaling: f64,
}

impl MergeSlice {
    /// The update of a whole `[out, in]` weight.
    pub fn whole(tensors: AdapterTensors, scaling: f64) -> Self {
        Self {
            offset: 0,
            tensors,
            scaling,
        }
    }
}

/// The updates of one weight of a merge.
struct MergeJob {
    slices: Vec<MergeSlice>,
}

impl MergeJob {
    fn apply(&self, weight: &mut [f32]) {
        for s in &self.slices {
            let len = s.tensors.b_shape[0] * s.tensors.a_shape[1];
            s.tensors.add_delta_to(&mut weight[s.offset..s.offset + len], s.scaling);
        }
    }
}

/// [`merge_checkpoint`] for a checkpoint whose key stems differ from the adapter's module
/// paths: `checkpoint_key` maps a module path (`model.language_model.layers.0.self_attn.q_proj`)
/// to the stem of its weight in `base` (`language_model.model.layers.0.self_attn.q_proj` in a
/// multimodal wrapper saved in the older layout). The model crate knows the mapping.
pub fn merge_checkpoint_renamed(
    base: &Path,
    adapter: &AdapterFiles,
    out: &Path,
    dtype: MergeDtype,
    checkpoint_key: &dyn Fn(&str) -> String,
) -> Result<MergeReport> {
    let mut slices: BTreeMap<String, Vec<MergeSlice>> = BTreeMap::new();
    for (module, t) in &adapter.tensors {
        slices
            .entry(format!("{}.weight", checkpoint_key(module)))
            .or_default()
            .push(MergeSlice::whole(t.clone(), adapter.config.adapter_scaling(module)));
    }
    merge_checkpoint_slices(base, slices, out, dtype)
}

/// [`merge_checkpoint`] from updates keyed by the checkpoint's tensor names: each weight gets
/// its slices' `scaling·B·A` added. A slice must fit its weight (a whole `[out, in]` weight
/// exactly, or inside a stacked one); checked before anything is written.
pub fn merge_checkpoint_slices(
    base: &Path,
    slices: BTreeMap<String, Vec<MergeSlice>>,
    out: &Path,
    dtype: MergeDtype,
) -> Result<MergeReport> {
    if out.exists() {
        return Err(LoraError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output folder exists; choose a new one",
            ),
        });
    }
    let (files, index) = checkpoint_files(base)?;

    // Check that the adapter fits before writing anything.
    let mut shapes: BTreeMap<String, (Vec<usize>, PathBuf)> = BTreeMap::new();
    for file in &files {
        let path = base.join(file);
        let mmap = open(&path)?;
        let st = parse(&path, &mmap)?;
        for (key, view) in st.iter() {
            shapes.insert(key.to_string(), (view.shape().to_vec(), path.clone()));
        }
    }
    let mut jobs: BTreeMap<String, MergeJob> = BTreeMap::new();
    for (key, slices) in slices {
        let (shape, _) = shapes.get(&key).ok_or_else(|| LoraError::UnexpectedTensor {
            path: base.to_path_buf(),
            key: key.clone(),
            message: format!("the base has no `{key}`"),
        })?;
        let numel: usize = shape.iter().product();
        for s in &slices {
            let update = vec![s.tensors.b_shape[0], s.tensors.a_shape[1]];
            let fits = if shape.len() == 2 {
                s.offset == 0 && *shape == update
            } else {
                shape.len() == 3
                    && shape[1..] == update[..]
                    && s.offset % (update[0] * update[1]) == 0
                    && s.offset + update[0] * update[1] <= numel
            };
            if !fits {
                return Err(LoraError::ShapeMismatch {
                    key: format!("{key} (adapter B·A is {update:?} at value {})", s.offset),
                    expected: update,
                    found: shape.clone(),
                });
            }
        }
        jobs.insert(key, MergeJob { slices });
    }

    let staging = Staging::new(out)?;
    let report = write_merged(base, &jobs, &files, index, staging.path(), dtype)?;
    staging.commit_new(out)?;
    Ok(report)
}

/// A merged weight ready to be written: f32 values written as they lie in memory, or encoded.
enum MergedBytes {
    F32(Vec<f32>),
    Encoded(Vec<u8>),
}

impl MergedBytes {
    fn new(values: Vec<f32>, dtype: Dtype) -> Self {
        if dtype == Dtype::F32 && cfg!(target_endian = "little") {
            MergedBytes::F32(values)
        } else {
            MergedBytes::Encoded(encode(&values, dtype))
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            // SAFETY: a byte view of initialised f32 values (u8 has no alignment or validity
            // requirements); little-endian, as safetensors stores them (checked in `new`).
            MergedBytes::F32(v) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) },
            MergedBytes::Encoded(b) => b,
        }
    }
}

/// Writes one shard whose dtypes all stay: the base file's header and untouched tensors are
/// copied by the kernel (`copy_file_range`, as `cp` does), and each adapted weight is written
/// at its own offset, so the output is the base byte for byte except the merged weights.
/// A second thread computes the next merged weight while this one writes.
fn write_shard_in_place(
    path: &Path,
    mmap: &Mmap,
    adapter: &BTreeMap<String, MergeJob>,
    out_path: &Path,
    report: &mut MergeReport,
) -> Result<()> {
    let safetensors_error = |message: String| LoraError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let (header_len, metadata) = SafeTensors::read_metadata(mmap).map_err(|e| safetensors_error(format!("{e:?}")))?;
    let data_start = 8 + header_len;
    // The adapted weights in file order: key, dtype, absolute byte range, adapter tensors.
    let mut jobs = Vec::new();
    for (key, info) in metadata.tensors() {
        let Some(t) = adapter.get(&key) else {
            continue;
        };
        let (begin, end) = info.data_offsets;
        jobs.push((key, info.dtype, data_start + begin..data_start + end, t));
    }
    let mut keys: Vec<String> = jobs.iter().map(|job| job.0.clone()).collect();
    keys.sort();
    jobs.sort_by_key(|job| job.2.start);

    let src = File::open(path).map_err(io(path))?;
    let mut out = File::create(out_path).map_err(io(out_path))?;
    let copy = |out: &mut File, range: std::ops::Range<usize>| -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut reader = &src;
        reader.seek(SeekFrom::Start(range.start as u64)).map_err(io(path))?;
        std::io::copy(&mut reader.take((range.end - range.start) as u64), out).map_err(io(out_path))?;
        Ok(())
    };
    std::thread::scope(|scope| -> Result<()> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Result<(std::ops::Range<usize>, MergedBytes)>>(1);
        scope.spawn(move || {
            for (key, dtype, range, t) in jobs {
                let merged = bytes_to_f32(&mmap[range.clone()], dtype)
                    .ok_or_else(|| LoraError::UnexpectedTensor {
                        path: path.to_path_buf(),
                        key: key.clone(),
                        message: format!("cannot merge into dtype {dtype:?}"),
                    })
                    .and_then(|mut w| {
                        t.apply(&mut w);
                        if w.iter().any(|x| !x.is_finite()) {
                            return Err(LoraError::NonFinite { key: key.clone() });
                        }
                        Ok((range, MergedBytes::new(w, dtype)))
                    });
                let failed = merged.is_err();
                if sender.send(merged).is_err() || failed {
                    return;
                }
            }
        });
        let mut written = 0;
        for merged in receiver {
            let (range, bytes) = merged?;
            copy(&mut out, written..range.start)?;
            std::io::Write::write_all(&mut out, bytes.bytes()).map_err(io(out_path))?;
            written = range.end;
        }
        copy(&mut out, written..mmap.len())
    })?;
    report.merged.extend(keys);
    report.bytes += (mmap.len() - data_start) as u64;
    Ok(())
}

fn write_merged(
    base: &Path,
    adapter: &BTreeMap<String, MergeJob>,
    files: &[String],
    index: Option<Value>,
    staging: &Path,
    dtype: MergeDtype,
) -> Result<MergeReport> {
    let mut report = MergeReport::default();
    for file in files {
        let path = base.join(file);
        let mmap = open(&path)?;
        let st = parse(&path, &mmap)?;
        if st.tensors().iter().all(|(_, v)| dtype.target(v.dtype()) == v.dtype()) {
            write_shard_in_place(&path, &mmap, adapter, &staging.join(file), &mut report)?;
            report.shards.push(file.clone());
            continue;
        }
        // Untouched tensors are written straight from the memory map; only merged or
        // converted ones are held in memory.
        let mut owned: Vec<OutputTensor<'_>> = Vec::new();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        for key in names {
            let view = st.tensor(&key).map_err(|e| LoraError::Safetensors {
                path: path.clone(),
                message: format!("{key}: {e:?}"),
            })?;
            let target = dtype.target(view.dtype());
            let lora = adapter.get(&key);
            let bytes = match lora {
                Some(t) => {
                    let mut w = bytes_to_f32(view.data(), view.dtype()).ok_or_else(|| LoraError::UnexpectedTensor {
                        path: path.clone(),
                        key: key.clone(),
                        message: format!("cannot merge into dtype {:?}", view.dtype()),
                    })?;
                    t.apply(&mut w);
                    if w.iter().any(|x| !x.is_finite()) {
                        return Err(LoraError::NonFinite { key });
                    }
                    report.merged.push(key.clone());
                    std::borrow::Cow::Owned(encode(&w, target))
                }
                None if target == view.dtype() => std::borrow::Cow::Borrowed(view.data()),
                None => {
                    let w = bytes_to_f32(view.data(), view.dtype()).unwrap_or_default();
                    std::borrow::Cow::Owned(encode(&w, target))
                }
            };
            report.bytes += bytes.len() as u64;
            owned.push((key, target, view.shape().to_vec(), bytes));
        }
        let views = owned
            .iter()
            .map(|(k, d, s, b)| {
                TensorView::new(*d, s.clone(), b.as_ref())
                    .map(|v| (k.clone(), v))
                    .map_err(|e| LoraError::Safetensors {
                        path: path.clone(),
                        message: format!("{k}: {e:?}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let out_path = staging.join(file);
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        safetensors::serialize_to_file(views, metadata, &out_path).map_err(|e| LoraError::Safetensors {
            path: out_path.clone(),
            message: format!("cannot write: {e:?}"),
        })?;
        report.shards.push(file.clone());
    }
    if let Some(mut index) = index {
        if let Some(meta) = index.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("total_size".into(), Value::from(report.bytes));
        }
        let p = staging.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|source| LoraError::Json {
            path: p.clone(),
            source,
        })?;
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    // Every other file of the base (config, tokenizer, generation config, template, license).
    for entry in std::fs::read_dir(base).map_err(io(base))? {
        let entry = entry.map_err(io(base))?;
        let name = entry.file_name().to_string_lossy().to_string();
        // Other weight formats of the same model would be stale next to the merged weights.
        let is_weights = [
            ".safetensors",
            ".bin",
            ".pt",
            ".pth",
            ".gguf",
            ".h5",
            ".msgpack",
            ".onnx",
            ".ckpt",
        ]
        .iter()
        .any(|ext| name.ends_with(ext))
            || name.ends_with(".index.json");
        if !entry.path().is_file() || is_weights {
            continue;
        }
        let dest = staging.join(&name);
        if name == "config.json" {
            let p = entry.path();
            let text = std::fs::read_to_string(&p).map_err(io(&p))?;
            let mut config: Value = serde_json::from_str(&text).map_err(|source| LoraError::Json {
                path: p.clone(),
                source,
            })?;
            if let (Some(name), Some(obj)) = (dtype.config_name(), config.as_object_mut()) {
                let key = if obj.contains_key("torch_dtype") {
                    "torch_dtype"
                } else {
                    "dtype"
                };
                obj.insert(key.into(), Value::from(name));
            }
            let text = serde_json::to_string_pretty(&config).map_err(|source| LoraError::Json {
                path: p.clone(),
                source,
            })?;
            std::fs::write(&dest, text + "\n").map_err(io(&dest))?;
        } else {
            std::fs::copy(entry.path(), &dest).map_err(io(&dest))?;
        }
    }
    Ok(report)
}
