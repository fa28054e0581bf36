//! LoRA on stacked expert weights, PEFT 0.21's `target_parameters` layout.
//!
//! PEFT adapts a parameter `[experts, d1, d2]` with one flat pair: `lora_A` `[E·r, in]` (rows
//! `e·r + j`: expert-major) and `lora_B` `[out, E·r]` (columns `j·E + e`: rank-major), so that
//! expert `e`'s update is `s·B_e·A_e`. Which of `d1`, `d2` is `in` depends on the parameter's
//! storage: transformers' `[experts, out, in]` experts are read with the two swapped, gpt-oss's
//! `is_transposed` `[experts, in, out]` as they are, and Llama 4's `[experts, in, out]` (which
//! does not declare `is_transposed`) also swapped, which turns A and B around with respect to
//! the expert's `nn.Linear` view.
//!
//! Ember keeps one adapter per expert on the expert's `[out, in]` linear layer (A_e `[r, in]`,
//! B_e `[out, r]`) and converts at the file boundary with [`split_flat`] and [`join_flat`].

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use crate::adapter::AdapterTensors;
use crate::config::{FusedMoeTargets, InitLoraWeights, InitName, ModuleLora};
use crate::error::{LoraError, Result};
use crate::linear::LoraAdapter;

/// How a stacked expert parameter's flat PEFT pair maps onto the per-expert `nn.Linear` view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpertLoraLayout {
    /// The parameter is stored `[experts, in, out]` (x·W) but PEFT reads it as
    /// `[experts, out, in]` (Llama 4): PEFT's A_e is the transpose of the linear view's B_e and
    /// its B_e the transpose of A_e.
    pub swap_roles: bool,
    /// The output rows are interleaved gate/up pairs in the parameter (gpt-oss's
    /// `gate_up_proj`) and `[gate | up]` in the linear view.
    pub interleaved_gate_up: bool,
}

impl ExpertLoraLayout {
    /// The flat PEFT shapes `([E·r, a_cols], [b_rows, E·r])` for experts whose linear view is
    /// `[out, in]`.
    pub fn flat_shapes(self, experts: usize, r: usize, out: usize, inp: usize) -> ([usize; 2], [usize; 2]) {
        if self.swap_roles {
            ([experts * r, out], [inp, experts * r])
        } else {
            ([experts * r, inp], [out, experts * r])
        }
    }
}

/// Row `i` of the linear view's `[gate | up]` output in the interleaved parameter.
fn interleaved_row(i: usize, rows: usize) -> usize {
    let half = rows / 2;
    if i < half {
        2 * i
    } else {
        2 * (i - half) + 1
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = values[i * cols + j];
        }
    }
    out
}

/// Splits PEFT's flat pair of a stacked parameter into one adapter per expert in the linear
/// view (A_e `[r, in]`, B_e `[out, r]`). `key` names the module in errors.
///
/// # Shapes
/// - `flat.lora_a`: `[E·r, ·]`, `flat.lora_b`: `[·, E·r]`; output: `experts` adapters
pub fn split_flat(
    flat: &AdapterTensors,
    experts: usize,
    layout: ExpertLoraLayout,
    key: &str,
) -> Result<Vec<AdapterTensors>> {
    let [a_rows, a_cols] = flat.a_shape;
    let [b_rows, b_cols] = flat.b_shape;
    if experts == 0 || a_rows % experts != 0 || b_cols != a_rows {
        return Err(LoraError::ShapeMismatch {
            key: format!("{key}.lora_A/lora_B (flat expert LoRA: A [E·r, ·], B [·, E·r], E = {experts})"),
            expected: vec![a_rows, b_cols],
            found: vec![a_rows, b_cols],
        });
    }
    let r = a_rows / experts;
    let mut out = Vec::with_capacity(experts);
    for e in 0..experts {
        // PEFT's A_e [r, a_cols] and B_e [b_rows, r].
        let a_e: Vec<f32> = flat.lora_a[e * r * a_cols..(e + 1) * r * a_cols].to_vec();
        let mut b_e = vec![0.0; b_rows * r];
        for row in 0..b_rows {
            for j in 0..r {
                b_e[row * r + j] = flat.lora_b[row * b_cols + j * experts + e];
            }
        }
        let (a, a_shape, mut b, b_shape) = if layout.swap_roles {
            // ΔW = (s·B_e·A_e)ᵀ = s·A_eᵀ·B_eᵀ: A' = B_eᵀ [r, b_rows], B' = A_eᵀ [a_cols, r].
            (
                transpose(&b_e, b_rows, r),
                [r, b_rows],
                transpose(&a_e, r, a_cols),
                [a_cols, r],
            )
        } else {
            (a_e, [r, a_cols], b_e, [b_rows, r])
        };
        if layout.interleaved_gate_up {
            let rows = b_shape[0];
            let source = b.clone();
            for i in 0..rows {
                let from = interleaved_row(i, rows);
                b[i * r..(i + 1) * r].copy_from_slice(&source[from * r..(from + 1) * r]);
            }
        }
        out.push(AdapterTensors {
            lora_a: a,
            a_shape,
            lora_b: b,
            b_shape,
        });
    }
    Ok(out)
}

/// Joins per-expert adapters of the linear view (A_e `[r, in]`, B_e `[out, r]`, equal ranks)
/// into PEFT's flat pair, the inverse of [`split_flat`].
///
/// # Shapes
/// - `experts[e].lora_a`: `[r, in]`, `.lora_b`: `[out, r]`; output: A `[E·r, ·]`, B `[·, E·r]`
pub fn join_flat(experts: &[AdapterTensors], layout: ExpertLoraLayout) -> AdapterTensors {
    let n = experts.len();
    let [r, inp] = experts[0].a_shape;
    let out = experts[0].b_shape[0];
    let (a_shape, b_shape) = layout.flat_shapes(n, r, out, inp);
    let mut lora_a = Vec::with_capacity(a_shape[0] * a_shape[1]);
    let mut lora_b = vec![0.0; b_shape[0] * b_shape[1]];
    for (e, t) in experts.iter().enumerate() {
        let mut b = t.lora_b.clone();
        if layout.interleaved_gate_up {
            for i in 0..out {
                let to = interleaved_row(i, out);
                b[to * r..(to + 1) * r].copy_from_slice(&t.lora_b[i * r..(i + 1) * r]);
            }
        }
        // PEFT's A_e [r, a_cols] and B_e [b_rows, r].
        let (a_e, b_e) = if layout.swap_roles {
            (transpose(&b, out, r), transpose(&t.lora_a, r, inp))
        } else {
            (t.lora_a.clone(), b)
        };
        lora_a.extend_from_slice(&a_e);
        let b_rows = b_shape[0];
        for row in 0..b_rows {
            for j in 0..r {
                lora_b[row * b_shape[1] + j * n + e] = b_e[row * r + j];
            }
        }
    }
    AdapterTensors {
        lora_a,
        a_shape,
        lora_b,
        b_shape,
    }
}

/// A fresh adapter for one expert of a stacked parameter, drawn as PEFT draws its flat pair
/// (`lora_A` `[E·r, in]` Kaiming-uniform over PEFT's `in`, or N(0, 1/r) for `"gaussian"`;
/// `lora_B` zero, or Kaiming-uniform over `E·r` for `false`) and turned into the expert's
/// linear view `[out, in]`.
pub fn init_expert<B: Backend>(
    out: usize,
    inp: usize,
    lora: ModuleLora,
    init: InitLoraWeights,
    experts: usize,
    layout: ExpertLoraLayout,
    device: &B::Device,
) -> LoraAdapter<B> {
    let r = lora.r;
    // PEFT's in and out of this parameter.
    let (peft_out, peft_in) = if layout.swap_roles { (inp, out) } else { (out, inp) };
    let kaiming = |fan_in: usize| Distribution::Uniform(-1.0 / (fan_in as f64).sqrt(), 1.0 / (fan_in as f64).sqrt());
    let a = match init {
        InitLoraWeights::Named(InitName::Gaussian) => {
            Tensor::<B, 2>::random([r, peft_in], Distribution::Normal(0.0, 1.0 / r as f64), device)
        }
        InitLoraWeights::Bool(_) => Tensor::random([r, peft_in], kaiming(peft_in), device),
    };
    let b = match init {
        InitLoraWeights::Bool(false) => Tensor::<B, 2>::random([peft_out, r], kaiming(experts * r), device),
        _ => Tensor::zeros([peft_out, r], device),
    };
    let (a, b) = if layout.swap_roles {
        (b.transpose(), a.transpose())
    } else {
        (a, b)
    };
    LoraAdapter::from_tensors(a, b, lora.scaling, 0.0)
}

/// One expert's update (linear view, as [`split_flat`] gives it) laid out for the expert's
/// slice of the stacked parameter on disk: as it is for `[experts, out, in]` storage; for x·W
/// storage `[experts, in, out]` (gpt-oss, Llama 4) transposed — `ΔPₑ = (s·B·A)ᵀ = s·Aᵀ·Bᵀ` —
/// with gpt-oss's gate/up columns interleaved again.
///
/// # Shapes
/// - `t.lora_a`: `[r, in]`, `t.lora_b`: `[out, r]`; output: the same, or `[r, out]` / `[in, r]`
pub fn stacked_slice(t: &AdapterTensors, layout: ExpertLoraLayout, xw_storage: bool) -> AdapterTensors {
    let [r, inp] = t.a_shape;
    let out = t.b_shape[0];
    let mut b = t.lora_b.clone();
    if layout.interleaved_gate_up {
        for i in 0..out {
            let to = interleaved_row(i, out);
            b[to * r..(to + 1) * r].copy_from_slice(&t.lora_b[i * r..(i + 1) * r]);
        }
    }
    if xw_storage {
        AdapterTensors {
            lora_a: transpose(&b, out, r),
            a_shape: [r, out],
            lora_b: transpose(&t.lora_a, r, inp),
            b_shape: [inp, r],
        }
    } else {
        AdapterTensors {
            lora_a: t.lora_a.clone(),
            a_shape: t.a_shape,
            lora_b: b,
            b_shape: t.b_shape,
        }
    }
}

/// The module paths PEFT files the flat pairs of `params` (parameters of the module
/// `container`, in their order of definition) under: the wrappers nest in that order, the
/// inner ones behind `.base_layer`s (`…experts.base_layer` holds `gate_up_proj` when
/// `down_proj` is adapted too).
pub fn nested_keys(container: &str, params: &[String]) -> Vec<(String, String)> {
    let n = params.len();
    params
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("{container}{}", ".base_layer".repeat(n - 1 - i)), p.clone()))
        .collect()
}

/// PEFT 0.21's conversion of an adapter saved for transformers 4's per-expert MoE modules
/// (`peft.utils.transformers_weight_conversion`, applied when PEFT loads one): keys are renamed
/// as the checkpoint's modules were (Mixtral's `.block_sparse_moe.` → `.mlp.`), and the pairs
/// of `{container}.experts.{e}.{name}` (`gate_proj`, `up_proj`, `down_proj`; Mixtral's `w1`,
/// `w3`, `w2`) become the flat pair of the stacked parameter (`gate_up_proj`, `down_proj`) in
/// PEFT's layout. Projections fused into one parameter fuse their adapters: A's stacked
/// (`[A_gate; A_up]`), B's block-diagonal, so each expert's update stays
/// `[B_gate·A_gate; B_up·A_up]` at rank `2r` (the config's rank and alpha on `gate_up_proj`
/// double in [`crate::LoraConfig::with_fused_moe_targets`]). Keys of other modules pass
/// through (renamed). `experts_of(param)` gives a stacked parameter's expert count and layout
/// (`None`: no such parameter). Errors name the adapter key that is missing or does not fit.
pub fn fuse_v4_expert_tensors(
    tensors: &BTreeMap<String, AdapterTensors>,
    fused: &FusedMoeTargets,
    experts_of: &dyn Fn(&str) -> Option<(usize, ExpertLoraLayout)>,
) -> Result<BTreeMap<String, AdapterTensors>> {
    // (container, stacked parameter) -> v4 name -> expert -> pair
    type PerExpert<'a> = BTreeMap<&'static str, BTreeMap<usize, &'a AdapterTensors>>;
    let mut groups: BTreeMap<(String, &'static str), PerExpert<'_>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (key, t) in tensors {
        let mut key = key.clone();
        for (from, to) in fused.renamed_modules {
            key = key.replace(from, to);
        }
        let v4 = key.rsplit_once('.').and_then(|(rest, name)| {
            let (container, index) = rest.rsplit_once('.')?;
            let index: usize = index.parse().ok()?;
            let &(old, new) = fused.renames.iter().find(|(old, _)| *old == name)?;
            (container.ends_with(".experts") && !new.contains('.')).then(|| (container.to_string(), old, new, index))
        });
        match v4 {
            Some((container, old, new, e)) => {
                groups
                    .entry((container, new))
                    .or_default()
                    .entry(old)
                    .or_default()
                    .insert(e, t);
            }
            None => {
                out.insert(key, t.clone());
            }
        }
    }
    let file_key =
        |container: &str, e: usize, name: &str| format!("base_model.model.{container}.{e}.{name}.lora_A.weight");
    // The stacked parameters of each container, in their order of definition (that of `renames`).
    let mut params_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (container, new) in groups.keys() {
        params_of
            .entry(container.clone())
            .or_default()
            .push(format!("{container}.{new}"));
    }
    let order = |p: &String| {
        fused
            .renames
            .iter()
            .position(|(_, new)| p.ends_with(&format!(".{new}")))
    };
    for params in params_of.values_mut() {
        params.sort_by_key(order);
    }
    for ((container, new), by_name) in &groups {
        let param = format!("{container}.{new}");
        let olds: Vec<&str> = fused
            .fused
            .iter()
            .find(|(p, _)| p == new)
            .map_or_else(|| by_name.keys().copied().collect(), |(_, olds)| olds.to_vec());
        let Some((count, layout)) = experts_of(&param) else {
            let (old, per) = by_name.iter().next().expect("a group holds one name at least");
            let e = per.keys().next().copied().unwrap_or(0);
            return Err(LoraError::UnexpectedTensor {
                path: "adapter_model.safetensors".into(),
                key: file_key(container, e, old),
                message: format!("the model has no stacked expert parameter `{param}` for this v4 per-expert adapter"),
            });
        };
        let extra = by_name
            .iter()
            .find_map(|(name, m)| m.keys().find(|&&i| i >= count).map(|&i| (*name, i)));
        if let Some((name, extra)) = extra {
            return Err(LoraError::UnexpectedTensor {
                path: "adapter_model.safetensors".into(),
                key: file_key(container, extra, name),
                message: format!("expert {extra}, but `{param}` has {count} experts"),
            });
        }
        let mut per_expert = Vec::with_capacity(count);
        for e in 0..count {
            let mut parts = Vec::with_capacity(olds.len());
            for old in &olds {
                let Some(t) = by_name.get(old).and_then(|m| m.get(&e)) else {
                    return Err(LoraError::MissingTensor {
                        path: "adapter_model.safetensors".into(),
                        key: format!(
                            "{} (this v4 per-expert adapter adapts `{param}`, which fuses {} of all {count} experts)",
                            file_key(container, e, old),
                            olds.join(" and ")
                        ),
                    });
                };
                parts.push(*t);
            }
            per_expert.push(fuse_pairs(&parts, &file_key(container, e, olds[0]))?);
        }
        let flat = join_flat(&per_expert, layout);
        let key = nested_keys(container, &params_of[container])
            .into_iter()
            .find(|(_, p)| *p == param)
            .map(|(k, _)| k)
            .expect("the parameter is one of its container's");
        out.insert(key, flat);
    }
    Ok(out)
}

/// Adapters of projections fused along the output rows, as one adapter:
/// A = `[A_1; A_2; …]`, B = `diag(B_1, B_2, …)` (equal ranks and inputs).
fn fuse_pairs(parts: &[&AdapterTensors], key: &str) -> Result<AdapterTensors> {
    let [r, inp] = parts[0].a_shape;
    if let Some(bad) = parts.iter().find(|t| t.a_shape != [r, inp] || t.b_shape[1] != r) {
        return Err(LoraError::ShapeMismatch {
            key: format!("{key} and the projections fused with it (equal r and in needed)"),
            expected: vec![r, inp],
            found: bad.a_shape.to_vec(),
        });
    }
    if parts.len() == 1 {
        return Ok(parts[0].clone());
    }
    let n = parts.len();
    let rows: usize = parts.iter().map(|t| t.b_shape[0]).sum();
    let mut lora_a = Vec::with_capacity(n * r * inp);
    let mut lora_b = vec![0.0; rows * n * r];
    let mut row0 = 0;
    for (i, t) in parts.iter().enumerate() {
        lora_a.extend_from_slice(&t.lora_a);
        for row in 0..t.b_shape[0] {
            let dst = (row0 + row) * n * r + i * r;
            lora_b[dst..dst + r].copy_from_slice(&t.lora_b[row * r..(row + 1) * r]);
        }
        row0 += t.b_shape[0];
    }
    Ok(AdapterTensors {
        lora_a,
        a_shape: [n * r, inp],
        lora_b,
        b_shape: [rows, n * r],
    })
}
