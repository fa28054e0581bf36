//! LoRA on a loaded decoder: attach adapters by HF module path, load and save PEFT adapters,
//! merge in memory. The paths (`model.layers.3.self_attn.q_proj`) are born here and handed to
//! `ember-lora`, which knows no architecture.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use ember_lora::EmberBackend;
use ember_lora::{AdapterFiles, AdapterTensors, LoraAdapter, LoraConfig, LoraError, LoraLinear, TargetModules};

use crate::error::Result;
use crate::linear_attention::DeltaNetInputs;
use crate::model::{CausalLm, FeedForward, GateUpProjection, LatentQuery, QkvProjection, SelfAttention};

/// What attaching or loading an adapter did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReport {
    /// Adapted module paths, in model order.
    pub targets: Vec<String>,
    /// Trainable parameters, Σ r·(in + out).
    pub trainable_params: usize,
    /// All parameters of the base model.
    pub base_params: usize,
}

impl std::fmt::Display for LoraReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} modules adapted, trainable params {} of {} ({:.4}%)",
            self.targets.len(),
            self.trainable_params,
            self.base_params,
            100.0 * self.trainable_params as f64 / self.base_params.max(1) as f64
        )
    }
}

/// The walk behind [`CausalLm::linear_layers`] and [`CausalLm::linear_layers_mut`], written
/// once: `$($m)?` is `mut` for the mutable walk, `$iter` and `$as_option` the matching
/// `iter`/`iter_mut` and `as_ref`/`as_mut`.
macro_rules! walk_linear_layers {
    ($model:expr, $iter:ident, $as_option:ident $(, $m:tt)?) => {{
        let model = $model;
        let mut out = Vec::new();
        let decoder = model.names.decoder.clone();
        let mlp = model.config.spec().mlp_module;
        let shared = model.config.moe.as_ref().map_or("shared_expert", |m| m.layout.shared_expert_module());
        for (i, layer) in model.model.layers.$iter().enumerate() {
            let p = format!("{decoder}.layers.{i}");
            match &$($m)? layer.self_attn {
                SelfAttention::Grouped(a) => {
                    match &$($m)? a.qkv {
                        QkvProjection::Split(s) => {
                            out.push((format!("{p}.self_attn.q_proj"), &$($m)? s.q_proj));
                            out.push((format!("{p}.self_attn.k_proj"), &$($m)? s.k_proj));
                            out.push((format!("{p}.self_attn.v_proj"), &$($m)? s.v_proj));
                        }
                        QkvProjection::Fused(l) => out.push((format!("{p}.self_attn.qkv_proj"), l)),
                        QkvProjection::KeysAsValues(s) => {
                            out.push((format!("{p}.self_attn.q_proj"), &$($m)? s.q_proj));
                            out.push((format!("{p}.self_attn.k_proj"), &$($m)? s.k_proj));
                        }
                        QkvProjection::QueryOnly(l) => out.push((format!("{p}.self_attn.q_proj"), l)),
                    }
                    out.push((format!("{p}.self_attn.o_proj"), &$($m)? a.o_proj));
                }
                SelfAttention::Latent(a) => {
                    match &$($m)? a.query {
                        LatentQuery::Direct(l) => out.push((format!("{p}.self_attn.q_proj"), l)),
                        LatentQuery::LowRank(q) => {
                            out.push((format!("{p}.self_attn.q_a_proj"), &$($m)? q.q_a_proj));
                            out.push((format!("{p}.self_attn.q_b_proj"), &$($m)? q.q_b_proj));
                        }
                    }
                    out.push((format!("{p}.self_attn.kv_a_proj_with_mqa"), &$($m)? a.kv_a_proj_with_mqa));
                    out.push((format!("{p}.self_attn.kv_b_proj"), &$($m)? a.kv_b_proj));
                    out.push((format!("{p}.self_attn.o_proj"), &$($m)? a.o_proj));
                }
                SelfAttention::Linear(a) => {
                    match &$($m)? a.inputs {
                        DeltaNetInputs::Split(s) => {
                            out.push((format!("{p}.linear_attn.in_proj_qkv"), &$($m)? s.in_proj_qkv));
                            out.push((format!("{p}.linear_attn.in_proj_z"), &$($m)? s.in_proj_z));
                            out.push((format!("{p}.linear_attn.in_proj_b"), &$($m)? s.in_proj_b));
                            out.push((format!("{p}.linear_attn.in_proj_a"), &$($m)? s.in_proj_a));
                        }
                        DeltaNetInputs::Grouped(g) => {
                            out.push((format!("{p}.linear_attn.in_proj_qkvz"), &$($m)? g.in_proj_qkvz));
                            out.push((format!("{p}.linear_attn.in_proj_ba"), &$($m)? g.in_proj_ba));
                        }
                    }
                    out.push((format!("{p}.linear_attn.out_proj"), &$($m)? a.out_proj));
                }
            }
            let (dense, path, gate) = match &$($m)? layer.mlp {
                FeedForward::Dense(m) => (Some(m), format!("{p}.{mlp}"), None),
                FeedForward::Sparse(moe) => (
                    moe.shared_expert.$as_option(),
                    format!("{p}.{mlp}.{shared}"),
                    moe.shared_expert_gate.$as_option(),
                ),
                FeedForward::DenseAndSparse(both) => (Some(&$($m)? both.mlp), format!("{p}.{mlp}"), None),
            };
            if let Some(m) = dense {
                match &$($m)? m.gate_up {
                    GateUpProjection::Split(s) => {
                        out.push((format!("{path}.gate_proj"), &$($m)? s.gate_proj));
                        out.push((format!("{path}.up_proj"), &$($m)? s.up_proj));
                    }
                    GateUpProjection::Fused(l) => out.push((format!("{path}.gate_up_proj"), l)),
                }
                out.push((format!("{path}.down_proj"), &$($m)? m.down_proj));
            }
            if let Some(g) = gate {
                out.push((format!("{p}.{mlp}.{shared}_gate"), g));
            }
            if let Some(block) = &$($m)? layer.per_layer_input {
                out.push((format!("{p}.per_layer_input_gate"), &$($m)? block.gate));
                out.push((format!("{p}.per_layer_projection"), &$($m)? block.projection));
            }
        }
        if let Some(inputs) = &$($m)? model.model.per_layer_inputs {
            out.push((format!("{decoder}.per_layer_model_projection"), &$($m)? inputs.projection));
        }
        if let Some(head) = &$($m)? model.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }};
}

impl<B: EmberBackend> CausalLm<B> {
    /// Every adaptable linear layer with its HF module path, in model order: the attention
    /// projections (`qkv_proj` where fused), the dense MLP projections (`gate_up_proj` where
    /// fused; a MoE block's shared expert), Gemma 4's per-layer input projections and an
    /// untied `lm_head`. MoE routers and experts are frozen and not listed.
    pub fn linear_layers(&self) -> Vec<(String, &LoraLinear<B>)> {
        walk_linear_layers!(self, iter, as_ref)
    }

    /// [`CausalLm::linear_layers`], mutable.
    pub fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        walk_linear_layers!(self, iter_mut, as_mut, mut)
    }

    /// Number of parameters of the base model (adapters excluded; quantized weights, which are
    /// not burn parameters, counted by their shape).
    pub fn base_param_count(&self) -> usize {
        let layers = self.linear_layers();
        let adapters: usize = layers
            .iter()
            .filter_map(|(_, l)| l.adapter.as_ref().map(|a| a.num_params()))
            .sum();
        let values = |q: &ember_lora::QuantMatrix| q.shape()[0] * q.shape()[1];
        let quantized: usize = layers
            .iter()
            .filter_map(|(_, l)| l.weight.quantized().map(|q| values(q)))
            .chain(self.model.embed_tokens.weight.quantized().map(|q| values(q)))
            .sum();
        self.num_params() - adapters + quantized
    }

    fn report(&self) -> LoraReport {
        let mut targets = Vec::new();
        let mut trainable_params = 0;
        for (path, layer) in self.linear_layers() {
            if let Some(adapter) = &layer.adapter {
                let [o, i] = layer.dims();
                trainable_params += adapter.rank() * (i + o);
                targets.push(path);
            }
        }
        LoraReport {
            targets,
            trainable_params,
            base_params: self.base_param_count(),
        }
    }

    /// Attaches fresh adapters to every linear layer `config` targets (PEFT's matching rules),
    /// initialised as PEFT initialises them. Errors if `config` is invalid or matches nothing.
    pub fn attach_lora(&mut self, config: &LoraConfig, device: &B::Device) -> Result<LoraReport> {
        config.validate()?;
        let mut matched = 0;
        let mut example = String::new();
        for (path, layer) in self.linear_layers_mut() {
            if example.is_empty() {
                example = path.clone();
            }
            if !config.targets(&path, path == "lm_head") {
                continue;
            }
            let [out, inp] = layer.dims();
            let lora = config.module_lora(&path);
            let adapter = LoraAdapter::init(out, inp, lora, config.lora_dropout, config.init_lora_weights, device);
            layer.attach(adapter, &path)?;
            matched += 1;
        }
        if matched == 0 {
            let targets = match &config.target_modules {
                TargetModules::List(l) => format!("{l:?}"),
                TargetModules::Pattern(p) => format!("{p:?}"),
            };
            return Err(LoraError::NoTargets { targets, example }.into());
        }
        Ok(self.report())
    }

    /// Loads a PEFT adapter: every tensor must name a linear layer of this model with matching
    /// shapes; nothing is attached unless all fit.
    pub fn load_adapter(&mut self, files: &AdapterFiles, device: &B::Device) -> Result<LoraReport> {
        let mut pending: BTreeMap<String, LoraAdapter<B>> = BTreeMap::new();
        let known: BTreeMap<String, [usize; 2]> =
            self.linear_layers().into_iter().map(|(p, l)| (p, l.dims())).collect();
        for (path, t) in &files.tensors {
            if self.names.wrapped && !self.names.is_text_module(path) {
                return Err(LoraError::UnexpectedTensor {
                    path: "adapter_model.safetensors".into(),
                    key: format!("base_model.model.{path}.lora_A.weight"),
                    message: format!(
                        "`{path}` is outside the text decoder (`{}`): Ember loads and trains the language \
                         model of a multimodal checkpoint only, not LoRA on its vision or audio towers",
                        self.names.decoder
                    ),
                }
                .into());
            }
            let Some(&[out, inp]) = known.get(path) else {
                return Err(LoraError::UnexpectedTensor {
                    path: "adapter_model.safetensors".into(),
                    key: format!("base_model.model.{path}.lora_A.weight"),
                    message: format!("the model has no linear layer `{path}`"),
                }
                .into());
            };
            if t.a_shape[1] != inp || t.b_shape[0] != out {
                return Err(LoraError::ShapeMismatch {
                    key: format!("base_model.model.{path}.lora_A/B (B·A must be {:?})", [out, inp]),
                    expected: vec![out, inp],
                    found: vec![t.b_shape[0], t.a_shape[1]],
                }
                .into());
            }
            let a = Tensor::from_data(TensorData::new(t.lora_a.clone(), t.a_shape), device);
            let b = Tensor::from_data(TensorData::new(t.lora_b.clone(), t.b_shape), device);
            let scaling = files.config.module_lora(path).scaling;
            pending.insert(
                path.clone(),
                LoraAdapter::from_tensors(a, b, scaling, files.config.lora_dropout),
            );
        }
        for (path, layer) in self.linear_layers_mut() {
            if let Some(adapter) = pending.remove(&path) {
                layer.attach(adapter, &path)?;
            }
        }
        Ok(self.report())
    }

    /// The attached adapters as PEFT files (host f32 copies), ready to write; a multimodal
    /// wrapper's name its adapted modules by full path (see [`AdapterFiles::exact_targets`]).
    pub fn adapter_files(&self, config: &LoraConfig, base_model_name_or_path: Option<String>) -> AdapterFiles {
        let mut tensors = BTreeMap::new();
        for (path, layer) in self.linear_layers() {
            if let Some(adapter) = &layer.adapter {
                let a = adapter.lora_a.val();
                let b = adapter.lora_b.val();
                let (a_shape, b_shape) = (a.dims(), b.dims());
                tensors.insert(
                    path,
                    AdapterTensors {
                        lora_a: a.into_data().convert::<f32>().to_vec().unwrap_or_default(),
                        a_shape,
                        lora_b: b.into_data().convert::<f32>().to_vec().unwrap_or_default(),
                        b_shape,
                    },
                );
            }
        }
        AdapterFiles {
            config: config.clone(),
            base_model_name_or_path,
            tensors,
            exact_targets: self.names.wrapped,
        }
    }

    /// Folds every attached adapter into its base weight (in memory).
    pub fn merge_adapters(&mut self) -> Result<()> {
        for (path, layer) in self.linear_layers_mut() {
            layer.merge(&path)?;
        }
        Ok(())
    }

    /// Undoes [`CausalLm::merge_adapters`].
    pub fn unmerge_adapters(&mut self) {
        for (_, layer) in self.linear_layers_mut() {
            layer.unmerge();
        }
    }

    /// Detaches every adapter (merged ones are unmerged first): the base model again.
    pub fn remove_adapters(&mut self) {
        self.unmerge_adapters();
        for (_, layer) in self.linear_layers_mut() {
            layer.adapter = None;
        }
    }

    /// Turns every adapter branch on or off (the base alone is computed when off).
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, layer) in self.linear_layers_mut() {
            if let Some(adapter) = layer.adapter.as_mut() {
                adapter.enabled = enabled;
            }
        }
    }
}

/// Merges `adapter` into the HF checkpoint at `base` (see [`ember_lora::merge`]), naming each
/// adapted module as the checkpoint does: a multimodal wrapper's text decoder may be stored
/// under `language_model.model.` while PEFT adapters name it `model.language_model.`. LoRA on
/// a wrapper's vision or audio towers is refused, as everywhere in Ember.
pub fn merge_checkpoint(
    base: &std::path::Path,
    adapter: &AdapterFiles,
    out: &std::path::Path,
    dtype: ember_lora::merge::MergeDtype,
) -> Result<ember_lora::merge::MergeReport> {
    let config = crate::config::DecoderConfig::from_file(base.join("config.json"))?;
    let names = if config.wrapper.is_some() {
        let weights = crate::weights::Weights::open_dir(base)?;
        let names = crate::family::ModuleNames::wrapped(weights.keys().map(String::as_str));
        if let Some(module) = adapter.tensors.keys().find(|m| !names.is_text_module(m)) {
            return Err(LoraError::UnexpectedTensor {
                path: "adapter_model.safetensors".into(),
                key: format!("base_model.model.{module}.lora_A.weight"),
                message: format!(
                    "`{module}` is outside the text decoder (`{}`): Ember merges LoRA of the language model \
                     of a multimodal checkpoint only",
                    names.decoder
                ),
            }
            .into());
        }
        names
    } else {
        crate::family::ModuleNames::text_only()
    };
    Ok(ember_lora::merge::merge_checkpoint_renamed(
        base,
        adapter,
        out,
        dtype,
        &|module| names.checkpoint_key(module),
    )?)
}
