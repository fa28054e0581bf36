//! LoRA on a loaded decoder: attach adapters by HF module path, load and save PEFT adapters,
//! merge in memory. The paths (`model.layers.3.self_attn.q_proj`) are born here and handed to
//! `ember-lora`, which knows no architecture.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use ember_lora::EmberBackend;
use ember_lora::{
    AdapterFiles, AdapterTensors, ExpertLoraLayout, LoraAdapter, LoraConfig, LoraError, LoraLinear, TargetModules,
};

use crate::config::MoeLayout;
use crate::error::Result;
use crate::linear_attention::DeltaNetInputs;
use crate::model::{CausalLm, FeedForward, GateUpProjection, LatentQuery, QkvProjection, SelfAttention};
use ember_lora::merge::MergeSlice;

/// How PEFT reaches an adaptable layer.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerReach {
    /// An `nn.Linear` in transformers: `target_modules` (and `all-linear`) name it.
    Module,
    /// A router that is not an `nn.Linear` in transformers: `target_parameters` name its
    /// weight, `{path}.weight`; the adapter file keys it by the module path as for a linear.
    RouterWeight,
    /// Expert `index` of the stacked parameter `param` (`model.layers.1.mlp.experts.gate_up_proj`,
    /// `[count, ..]`): `target_parameters` name `param`, and the adapter file holds one flat
    /// pair for all `count` experts in `layout`. The layer's own path is `{param}.{index}`
    /// (Ember's name, never written to a file).
    Expert {
        /// The stacked parameter's path.
        param: String,
        /// Which expert.
        index: usize,
        /// How many experts the parameter stacks.
        count: usize,
        /// How the flat PEFT pair maps onto this expert's `nn.Linear` view.
        layout: ExpertLoraLayout,
    },
}

/// What attaching or loading an adapter did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReport {
    /// Adapted module paths, in model order.
    pub targets: Vec<String>,
    /// Trainable parameters, Σ r·(in + out).
    pub trainable_params: usize,
    /// All parameters of the base model.
    pub base_params: usize,
    /// Adapted modules kept unchanged and not run ([`CausalLm::indexer_adapters`]), with why.
    pub kept_unchanged: Option<(String, Vec<String>)>,
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
        )?;
        if let Some((why, paths)) = &self.kept_unchanged {
            write!(
                f,
                "; {} adapted modules on {why} kept unchanged and not run",
                paths.len()
            )?;
        }
        Ok(())
    }
}

/// The walk behind [`CausalLm::adaptable_layers`] and [`CausalLm::adaptable_layers_mut`], written
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
                            out.push((format!("{p}.self_attn.q_proj"), LayerReach::Module, &$($m)? s.q_proj));
                            out.push((format!("{p}.self_attn.k_proj"), LayerReach::Module, &$($m)? s.k_proj));
                            out.push((format!("{p}.self_attn.v_proj"), LayerReach::Module, &$($m)? s.v_proj));
                        }
                        QkvProjection::Fused(l) => out.push((format!("{p}.self_attn.qkv_proj"), LayerReach::Module, l)),
                        QkvProjection::KeysAsValues(s) => {
                            out.push((format!("{p}.self_attn.q_proj"), LayerReach::Module, &$($m)? s.q_proj));
                            out.push((format!("{p}.self_attn.k_proj"), LayerReach::Module, &$($m)? s.k_proj));
                        }
                        QkvProjection::QueryOnly(l) => out.push((format!("{p}.self_attn.q_proj"), LayerReach::Module, l)),
                    }
                    out.push((format!("{p}.self_attn.o_proj"), LayerReach::Module, &$($m)? a.o_proj));
                }
                SelfAttention::Latent(a) => {
                    match &$($m)? a.query {
                        LatentQuery::Direct(l) => out.push((format!("{p}.self_attn.q_proj"), LayerReach::Module, l)),
                        LatentQuery::LowRank(q) => {
                            out.push((format!("{p}.self_attn.q_a_proj"), LayerReach::Module, &$($m)? q.q_a_proj));
                            out.push((format!("{p}.self_attn.q_b_proj"), LayerReach::Module, &$($m)? q.q_b_proj));
                        }
                    }
                    out.push((format!("{p}.self_attn.kv_a_proj_with_mqa"), LayerReach::Module, &$($m)? a.kv_a_proj_with_mqa));
                    out.push((format!("{p}.self_attn.kv_b_proj"), LayerReach::Module, &$($m)? a.kv_b_proj));
                    out.push((format!("{p}.self_attn.o_proj"), LayerReach::Module, &$($m)? a.o_proj));
                }
                SelfAttention::Linear(a) => {
                    match &$($m)? a.inputs {
                        DeltaNetInputs::Split(s) => {
                            out.push((format!("{p}.linear_attn.in_proj_qkv"), LayerReach::Module, &$($m)? s.in_proj_qkv));
                            out.push((format!("{p}.linear_attn.in_proj_z"), LayerReach::Module, &$($m)? s.in_proj_z));
                            out.push((format!("{p}.linear_attn.in_proj_b"), LayerReach::Module, &$($m)? s.in_proj_b));
                            out.push((format!("{p}.linear_attn.in_proj_a"), LayerReach::Module, &$($m)? s.in_proj_a));
                        }
                        DeltaNetInputs::Grouped(g) => {
                            out.push((format!("{p}.linear_attn.in_proj_qkvz"), LayerReach::Module, &$($m)? g.in_proj_qkvz));
                            out.push((format!("{p}.linear_attn.in_proj_ba"), LayerReach::Module, &$($m)? g.in_proj_ba));
                        }
                    }
                    out.push((format!("{p}.linear_attn.out_proj"), LayerReach::Module, &$($m)? a.out_proj));
                }
            }
            let moe = model.config.moe.as_ref().map(|m| m.layout);
            let (dense, path, gate, sparse) = match &$($m)? layer.mlp {
                FeedForward::Dense(m) => (Some(m), format!("{p}.{mlp}"), None, None),
                FeedForward::Sparse(block) => (
                    block.shared_expert.$as_option(),
                    format!("{p}.{mlp}.{shared}"),
                    block.shared_expert_gate.$as_option(),
                    Some((&$($m)? block.router, &$($m)? block.experts)),
                ),
                FeedForward::DenseAndSparse(both) => (
                    Some(&$($m)? both.mlp),
                    format!("{p}.{mlp}"),
                    None,
                    Some((&$($m)? both.moe.router, &$($m)? both.moe.experts)),
                ),
            };
            if let Some(m) = dense {
                match &$($m)? m.gate_up {
                    GateUpProjection::Split(s) => {
                        out.push((format!("{path}.gate_proj"), LayerReach::Module, &$($m)? s.gate_proj));
                        out.push((format!("{path}.up_proj"), LayerReach::Module, &$($m)? s.up_proj));
                    }
                    GateUpProjection::Fused(l) => out.push((format!("{path}.gate_up_proj"), LayerReach::Module, l)),
                }
                out.push((format!("{path}.down_proj"), LayerReach::Module, &$($m)? m.down_proj));
            }
            if let Some(g) = gate {
                out.push((format!("{p}.{mlp}.{shared}_gate"), LayerReach::Module, g));
            }
            if let (Some((router, experts)), Some(layout)) = (sparse, moe) {
                let (router_path, router_is_linear) = layout.router_module();
                let reach = if router_is_linear { LayerReach::Module } else { LayerReach::RouterWeight };
                out.push((format!("{p}.{router_path}"), reach, router));
                let container = format!("{p}.{}", layout.experts_module());
                let count = experts.len();
                let mut downs = Vec::with_capacity(count);
                for (index, expert) in experts.$iter().enumerate() {
                    for (name, layer, gate_up) in [("gate_up_proj", &$($m)? expert.gate_up, true)] {
                        let param = format!("{container}.{name}");
                        let reach = LayerReach::Expert { param: param.clone(), index, count, layout: layout.expert_lora_layout(gate_up) };
                        out.push((format!("{param}.{index}"), reach, layer));
                    }
                    let param = format!("{container}.down_proj");
                    let reach = LayerReach::Expert { param: param.clone(), index, count, layout: layout.expert_lora_layout(false) };
                    downs.push((format!("{param}.{index}"), reach, &$($m)? expert.down));
                }
                out.extend(downs);
            }
            if let Some(block) = &$($m)? layer.per_layer_input {
                out.push((format!("{p}.per_layer_input_gate"), LayerReach::Module, &$($m)? block.gate));
                out.push((format!("{p}.per_layer_projection"), LayerReach::Module, &$($m)? block.projection));
            }
        }
        if let Some(inputs) = &$($m)? model.model.per_layer_inputs {
            out.push((format!("{decoder}.per_layer_model_projection"), LayerReach::Module, &$($m)? inputs.projection));
        }
        if let Some(head) = &$($m)? model.lm_head {
            out.push(("lm_head".to_string(), LayerReach::Module, head));
        }
        out
    }};
}

impl<B: EmberBackend> CausalLm<B> {
    /// Every layer that can carry a LoRA adapter, with its path and how PEFT reaches it, in
    /// model order: the attention projections (`qkv_proj` where fused), the dense MLP
    /// projections (`gate_up_proj` where fused; a MoE block's shared expert), Gemma 4's
    /// per-layer input projections, MoE routers and each expert's `gate_up` and `down`
    /// projections (see [`LayerReach`]), and an untied `lm_head`.
    pub fn adaptable_layers(&self) -> Vec<(String, LayerReach, &LoraLinear<B>)> {
        walk_linear_layers!(self, iter, as_ref)
    }

    /// [`CausalLm::adaptable_layers`], mutable.
    pub fn adaptable_layers_mut(&mut self) -> Vec<(String, LayerReach, &mut LoraLinear<B>)> {
        walk_linear_layers!(self, iter_mut, as_mut, mut)
    }

    /// [`CausalLm::adaptable_layers`] without the reach: every adaptable layer by path (an
    /// expert's as `{param}.{index}`).
    pub fn linear_layers(&self) -> Vec<(String, &LoraLinear<B>)> {
        self.adaptable_layers().into_iter().map(|(p, _, l)| (p, l)).collect()
    }

    /// [`CausalLm::linear_layers`], mutable.
    pub fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        self.adaptable_layers_mut()
            .into_iter()
            .map(|(p, _, l)| (p, l))
            .collect()
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
        for (path, reach, layer) in self.adaptable_layers() {
            if let Some(adapter) = &layer.adapter {
                let [o, i] = layer.dims();
                trainable_params += adapter.rank() * (i + o);
                match reach {
                    LayerReach::Expert { param, index: 0, .. } => targets.push(param),
                    LayerReach::Expert { .. } => {}
                    _ => targets.push(path),
                }
            }
        }
        let paths = self.indexer_adapters.keys().map(String::as_str);
        let kept_unchanged = self
            .config
            .unloaded_indexers(paths)
            .map(|(why, paths)| (why, paths.into_iter().map(str::to_string).collect()));
        LoraReport {
            targets,
            trainable_params,
            base_params: self.base_param_count(),
            kept_unchanged,
        }
    }

    /// The LoRA settings PEFT 0.21 would use on this model: for a family whose experts
    /// transformers 5 fuses, targets naming the v4 expert projections or the router (and
    /// `all-linear`) become `target_parameters` (see
    /// [`LoraConfig::with_fused_moe_targets`]); other models take `config` as it is. An
    /// adapter written for this model carries these settings.
    pub fn peft_lora_config(&self, config: &LoraConfig) -> Result<LoraConfig> {
        let Some(fused) = self.config.spec().peft_fused_moe else {
            return Ok(config.clone());
        };
        let mut paths = ember_lora::MoeTargetPaths::default();
        for (path, reach, _) in self.adaptable_layers() {
            match reach {
                LayerReach::Module if path != "lm_head" => paths.linear.push(path),
                LayerReach::Module => {}
                LayerReach::RouterWeight => paths.other.push(path),
                LayerReach::Expert { param, index: 0, .. } => {
                    let container = param.rsplit_once('.').map_or(param.clone(), |(c, _)| c.to_string());
                    if !paths.expert_containers.contains(&container) {
                        paths.other.push(container.clone());
                        paths.expert_containers.push(container);
                    }
                }
                LayerReach::Expert { .. } => {}
            }
        }
        Ok(config.with_fused_moe_targets(&fused, &paths)?)
    }

    /// Attaches fresh adapters to every layer `config` targets (PEFT's matching rules, after
    /// [`CausalLm::peft_lora_config`]), initialised as PEFT initialises them; an expert
    /// parameter gets one adapter per expert, drawn as PEFT draws its flat pair. Errors if
    /// `config` is invalid or matches nothing.
    pub fn attach_lora(&mut self, config: &LoraConfig, device: &B::Device) -> Result<LoraReport> {
        config.validate()?;
        self.indexer_adapters.clear();
        let config = self.peft_lora_config(config)?;
        if !config.target_parameters.is_empty() && config.lora_dropout > 0.0 {
            return Err(LoraError::InvalidConfig {
                key: "lora_dropout".into(),
                message: format!(
                    "{} with target_parameters {:?}: PEFT's parameter LoRA has no dropout (it cannot factor x \
                     out of B·A·dropout(x)); set lora_dropout: 0",
                    config.lora_dropout, config.target_parameters
                ),
            }
            .into());
        }
        let mut matched = 0;
        let mut example = String::new();
        for (path, reach, layer) in self.adaptable_layers_mut() {
            let [out, inp] = layer.dims();
            let adapter = match &reach {
                LayerReach::Module => {
                    if example.is_empty() {
                        example = path.clone();
                    }
                    if !config.targets(&path, path == "lm_head") {
                        continue;
                    }
                    let lora = config.module_lora(&path);
                    LoraAdapter::init(out, inp, lora, config.lora_dropout, config.init_lora_weights, device)
                }
                LayerReach::RouterWeight => {
                    let key = format!("{path}.weight");
                    if !config.targets_parameter(&key) {
                        continue;
                    }
                    LoraAdapter::init(
                        out,
                        inp,
                        config.module_lora(&key),
                        0.0,
                        config.init_lora_weights,
                        device,
                    )
                }
                LayerReach::Expert {
                    param, count, layout, ..
                } => {
                    if !config.targets_parameter(param) {
                        continue;
                    }
                    let lora = config.module_lora(param);
                    ember_lora::expert::init_expert(out, inp, lora, config.init_lora_weights, *count, *layout, device)
                }
            };
            layer.attach(adapter, &path)?;
            matched += 1;
        }
        if matched == 0 {
            let mut targets = match &config.target_modules {
                TargetModules::List(l) => format!("{l:?}"),
                TargetModules::Pattern(p) => format!("{p:?}"),
            };
            if !config.target_parameters.is_empty() {
                targets.push_str(&format!(" and target_parameters {:?}", config.target_parameters));
            }
            return Err(LoraError::NoTargets { targets, example }.into());
        }
        Ok(self.report())
    }

    /// `files` as PEFT 0.21 loads them on this model. For a family whose experts transformers 5
    /// fuses: the config rewritten as [`CausalLm::peft_lora_config`] rewrites it (v4 expert and
    /// router names become `target_parameters`), and the pairs of an adapter saved for
    /// transformers 4's per-expert modules (`mlp.experts.3.gate_proj`, Mixtral's
    /// `block_sparse_moe.experts.3.w1`) fused into the stacked parameters' flat pairs
    /// ([`ember_lora::expert::fuse_v4_expert_tensors`]). Other models take `files` as they are.
    pub fn peft_adapter_files<'f>(&self, files: &'f AdapterFiles) -> Result<std::borrow::Cow<'f, AdapterFiles>> {
        let Some(fused) = self.config.spec().peft_fused_moe else {
            return Ok(std::borrow::Cow::Borrowed(files));
        };
        let experts = self.stacked_experts();
        let tensors = ember_lora::expert::fuse_v4_expert_tensors(&files.tensors, &fused, &|p| experts.get(p).copied())?;
        let config = self.peft_lora_config(&files.config)?;
        let same_keys = tensors.keys().eq(files.tensors.keys());
        if same_keys && config == files.config {
            return Ok(std::borrow::Cow::Borrowed(files));
        }
        if !same_keys {
            tracing::info!(
                "converted an adapter made for transformers 4's per-expert MoE modules to the fused experts, as PEFT \
                 0.21 does: {} adapted modules became {}",
                files.tensors.len(),
                tensors.len()
            );
        }
        Ok(std::borrow::Cow::Owned(AdapterFiles {
            config,
            base_model_name_or_path: files.base_model_name_or_path.clone(),
            tensors,
            exact_targets: files.exact_targets,
        }))
    }

    /// Every stacked expert parameter (`model.layers.1.mlp.experts.gate_up_proj`) with its
    /// expert count and the layout of its flat PEFT pair.
    fn stacked_experts(&self) -> BTreeMap<String, (usize, ExpertLoraLayout)> {
        let mut experts = BTreeMap::new();
        for (_, reach, _) in self.adaptable_layers() {
            if let LayerReach::Expert {
                param,
                index: 0,
                count,
                layout,
            } = reach
            {
                experts.insert(param, (count, layout));
            }
        }
        experts
    }

    /// For each stacked expert parameter that `adapted` says carries LoRA, the module path PEFT
    /// files its flat pair under: parameters of one module nest as wrappers in their order of
    /// definition (`gate_up_proj` inside `down_proj`), the inner ones behind `.base_layer`s
    /// (`model.layers.1.mlp.experts.base_layer` for `gate_up_proj` when both are adapted).
    fn expert_file_keys(&self, adapted: &dyn Fn(&str) -> bool) -> BTreeMap<String, String> {
        let mut by_container: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (_, reach, _) in self.adaptable_layers() {
            if let LayerReach::Expert { param, index: 0, .. } = reach {
                if adapted(&param) {
                    let container = param.rsplit_once('.').map_or(param.clone(), |(c, _)| c.to_string());
                    by_container.entry(container).or_default().push(param);
                }
            }
        }
        by_container
            .into_iter()
            .flat_map(|(container, params)| ember_lora::expert::nested_keys(&container, &params))
            .collect()
    }

    /// Loads a PEFT adapter: every tensor must name an adaptable layer of this model (or a
    /// stacked expert parameter its config targets) with matching shapes; nothing is attached
    /// unless all fit. Pairs on GLM-5's sparse-attention indexers (PEFT's `all-linear` adapts
    /// them; Ember does not run the indexers, which keep every key at the lengths it runs) are
    /// kept unchanged in [`CausalLm::indexer_adapters`] and written back with the adapter.
    ///
    /// An adapter saved for transformers 4's per-expert modules is converted first, as PEFT 0.21
    /// converts it ([`CausalLm::peft_adapter_files`]).
    pub fn load_adapter(&mut self, files: &AdapterFiles, device: &B::Device) -> Result<LoraReport> {
        let files = self.peft_adapter_files(files)?;
        let files = files.as_ref();
        let mut pending: BTreeMap<String, LoraAdapter<B>> = BTreeMap::new();
        let mut known: BTreeMap<String, [usize; 2]> = BTreeMap::new();
        let mut experts: BTreeMap<String, (usize, ExpertLoraLayout, [usize; 2])> = BTreeMap::new();
        for (path, reach, layer) in self.adaptable_layers() {
            match reach {
                LayerReach::Expert {
                    param,
                    index: 0,
                    count,
                    layout,
                } => {
                    experts.insert(param, (count, layout, layer.dims()));
                }
                LayerReach::Expert { .. } => {}
                _ => {
                    known.insert(path, layer.dims());
                }
            }
        }
        let expert_keys = self.expert_file_keys(&|param| files.config.targets_parameter(param));
        let unexpected = |path: &str, message: String| LoraError::UnexpectedTensor {
            path: "adapter_model.safetensors".into(),
            key: format!("base_model.model.{path}.lora_A.weight"),
            message,
        };
        let mut indexer_adapters = BTreeMap::new();
        for (path, t) in &files.tensors {
            if self.config.unloaded_indexers(std::iter::once(path.as_str())).is_some() {
                indexer_adapters.insert(path.clone(), t.clone());
                continue;
            }
            if self.names.wrapped && !self.names.is_text_module(path) {
                return Err(unexpected(
                    path,
                    format!(
                        "`{path}` is outside the text decoder (`{}`): Ember loads and trains the language \
                         model of a multimodal checkpoint only, not LoRA on its vision or audio towers",
                        self.names.decoder
                    ),
                )
                .into());
            }
            if let Some(param) = expert_keys.get(path) {
                let (count, layout, [out, inp]) = experts[param];
                let lora = files.config.module_lora(param);
                if t.a_shape[0] != count * lora.r {
                    return Err(LoraError::ShapeMismatch {
                        key: format!(
                            "base_model.model.{path}.lora_A.weight (`{param}`: {count} experts × r = {} by adapter_config.json)",
                            lora.r
                        ),
                        expected: vec![count * lora.r, t.a_shape[1]],
                        found: t.a_shape.to_vec(),
                    }
                    .into());
                }
                let scaling = lora.scaling;
                let per_expert = ember_lora::expert::split_flat(t, count, layout, path)?;
                for (e, x) in per_expert.into_iter().enumerate() {
                    if x.a_shape[1] != inp || x.b_shape[0] != out {
                        return Err(LoraError::ShapeMismatch {
                            key: format!(
                                "base_model.model.{path}.lora_A/B (`{param}`, each expert's B·A is {:?})",
                                [out, inp]
                            ),
                            expected: vec![out, inp],
                            found: vec![x.b_shape[0], x.a_shape[1]],
                        }
                        .into());
                    }
                    let a = Tensor::from_data(TensorData::new(x.lora_a, x.a_shape), device);
                    let b = Tensor::from_data(TensorData::new(x.lora_b, x.b_shape), device);
                    pending.insert(format!("{param}.{e}"), LoraAdapter::from_tensors(a, b, scaling, 0.0));
                }
                continue;
            }
            let Some(&[out, inp]) = known.get(path) else {
                let hint = if path.contains(".experts") {
                    " (LoRA on stacked experts must be named by the adapter config's target_parameters)"
                } else {
                    ""
                };
                return Err(unexpected(path, format!("the model has no linear layer `{path}`{hint}")).into());
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
            // A router adapted as a parameter takes the rank and alpha patterns of its weight.
            let scaling = files.config.adapter_scaling(path);
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
        self.indexer_adapters = indexer_adapters;
        Ok(self.report())
    }

    /// The attached adapters as PEFT files (host f32 copies), ready to write, with the
    /// settings of [`CausalLm::peft_lora_config`]; a stacked expert parameter's adapters are
    /// joined into PEFT's flat pair. A multimodal wrapper's names its adapted modules by full
    /// path (see [`AdapterFiles::exact_targets`]).
    pub fn adapter_files(&self, config: &LoraConfig, base_model_name_or_path: Option<String>) -> AdapterFiles {
        let host = |adapter: &LoraAdapter<B>| {
            let a = adapter.lora_a.val();
            let b = adapter.lora_b.val();
            let (a_shape, b_shape) = (a.dims(), b.dims());
            AdapterTensors {
                lora_a: a.into_data().convert::<f32>().to_vec().unwrap_or_default(),
                a_shape,
                lora_b: b.into_data().convert::<f32>().to_vec().unwrap_or_default(),
                b_shape,
            }
        };
        let per_layer = self
            .linear_layers()
            .into_iter()
            .filter_map(|(path, layer)| layer.adapter.as_ref().map(|a| (path, host(a))))
            .collect();
        let mut tensors = self.peft_tensors(per_layer);
        tensors.extend(self.indexer_adapters.clone());
        let config = self.peft_lora_config(config).unwrap_or_else(|_| config.clone());
        AdapterFiles {
            config,
            base_model_name_or_path,
            tensors,
            exact_targets: self.names.wrapped,
        }
    }

    /// Per-layer pairs keyed by [`CausalLm::linear_layers`] paths (adapters, or their
    /// gradients) in PEFT's file layout: each stacked expert parameter's `{param}.{index}`
    /// entries joined into its flat pair under the module path PEFT files it by; other entries
    /// unchanged.
    pub fn peft_tensors(&self, mut per_layer: BTreeMap<String, AdapterTensors>) -> BTreeMap<String, AdapterTensors> {
        let mut stacked: BTreeMap<String, (ExpertLoraLayout, Vec<AdapterTensors>)> = BTreeMap::new();
        for (path, reach, _) in self.adaptable_layers() {
            if let LayerReach::Expert { param, layout, .. } = reach {
                if let Some(t) = per_layer.remove(&path) {
                    stacked.entry(param).or_insert_with(|| (layout, Vec::new())).1.push(t);
                }
            }
        }
        for (key, param) in self.expert_file_keys(&|param| stacked.contains_key(param)) {
            if let Some((layout, experts)) = stacked.get(&param) {
                per_layer.insert(key, ember_lora::expert::join_flat(experts, *layout));
            }
        }
        per_layer
    }

    /// The inverse of [`CausalLm::peft_tensors`]: an adapter file's pairs keyed by
    /// [`CausalLm::linear_layers`] paths, each stacked expert parameter's flat pair split into
    /// its experts' `{param}.{index}` pairs (by the file config's target_parameters). Pairs
    /// on sparse-attention indexers (not layers Ember runs) are left out.
    pub fn layer_tensors(&self, files: &AdapterFiles) -> Result<BTreeMap<String, AdapterTensors>> {
        let counts = self.stacked_experts();
        let keys = self.expert_file_keys(&|param| files.config.targets_parameter(param));
        let mut out = BTreeMap::new();
        for (path, t) in &files.tensors {
            if self.config.unloaded_indexers(std::iter::once(path.as_str())).is_some() {
                continue;
            }
            match keys.get(path) {
                Some(param) => {
                    let (count, layout) = counts[param];
                    for (e, x) in ember_lora::expert::split_flat(t, count, layout, path)?
                        .into_iter()
                        .enumerate()
                    {
                        out.insert(format!("{param}.{e}"), x);
                    }
                }
                None => {
                    out.insert(path.clone(), t.clone());
                }
            }
        }
        Ok(out)
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
        self.indexer_adapters.clear();
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
    let moe = config.moe.as_ref();
    let converted;
    let adapter = match (config.spec().peft_fused_moe, moe) {
        (Some(fused), Some(moe)) => {
            converted = v4_adapter_fused(adapter, &fused, moe)?;
            converted.as_ref().unwrap_or(adapter)
        }
        _ => adapter,
    };
    let checkpoint_key = |module: &str| {
        let key = names.checkpoint_key(module);
        // Mixtral's router is `mlp.gate` in transformers 5 and `block_sparse_moe.gate` on disk.
        match moe.map(|m| m.layout) {
            Some(MoeLayout::Mixtral) => key.replace(".mlp.gate", ".block_sparse_moe.gate"),
            _ => key,
        }
    };
    let mut slices: BTreeMap<String, Vec<MergeSlice>> = BTreeMap::new();
    let mut weights: Option<crate::weights::Weights> = None;
    for (module, t) in &adapter.tensors {
        let container = module.trim_end_matches(".base_layer");
        let stacked = moe.filter(|m| container.ends_with(&format!(".{}", m.layout.experts_module())));
        let Some(moe) = stacked else {
            slices
                .entry(format!("{}.weight", checkpoint_key(module)))
                .or_default()
                .push(MergeSlice::whole(t.clone(), adapter.config.adapter_scaling(module)));
            continue;
        };
        let params: Vec<String> = ["gate_up_proj", "down_proj"]
            .iter()
            .map(|p| format!("{container}.{p}"))
            .filter(|p| adapter.config.targets_parameter(p))
            .collect();
        let Some((_, param)) = ember_lora::expert::nested_keys(container, &params)
            .into_iter()
            .find(|(key, _)| key == module)
        else {
            return Err(LoraError::UnexpectedTensor {
                path: "adapter_model.safetensors".into(),
                key: format!("base_model.model.{module}.lora_A.weight"),
                message: "no stacked expert parameter of the adapter config's target_parameters is filed here".into(),
            }
            .into());
        };
        let gate_up = param.ends_with(".gate_up_proj");
        let layout = moe.layout.expert_lora_layout(gate_up);
        let scaling = adapter.config.module_lora(&param).scaling;
        let experts = ember_lora::expert::split_flat(t, moe.num_experts, layout, module)?;
        let prefix = container
            .strip_suffix(&format!(".{}", moe.layout.experts_module()))
            .unwrap_or(container);
        let disk_experts = match moe.layout {
            MoeLayout::Mixtral => format!("{}.block_sparse_moe.experts", checkpoint_key(prefix)),
            _ => checkpoint_key(container),
        };
        let weights = match &weights {
            Some(w) => w,
            None => weights.insert(crate::weights::Weights::open_dir(base)?),
        };
        let leaf = if gate_up { "gate_up_proj" } else { "down_proj" };
        let fused = format!("{disk_experts}.{leaf}");
        if weights.contains(&fused) {
            // One stacked tensor on disk: each expert's update goes to its slice.
            let xw = matches!(moe.layout, MoeLayout::GptOss | MoeLayout::Llama4);
            let entry = slices.entry(fused).or_default();
            for (e, x) in experts.iter().enumerate() {
                let size = x.b_shape[0] * x.a_shape[1];
                entry.push(MergeSlice {
                    offset: e * size,
                    tensors: ember_lora::expert::stacked_slice(x, layout, xw),
                    scaling,
                });
            }
            continue;
        }
        // One tensor per expert and projection (the hub layout): gate and up take their rows.
        let (gate, up, down) = match moe.layout {
            MoeLayout::Mixtral => ("w1", "w3", "w2"),
            _ => ("gate_proj", "up_proj", "down_proj"),
        };
        for (e, x) in experts.into_iter().enumerate() {
            let key = |name: &str| format!("{disk_experts}.{e}.{name}.weight");
            if !gate_up {
                slices.entry(key(down)).or_default().push(MergeSlice::whole(x, scaling));
                continue;
            }
            let [out, r] = x.b_shape;
            let half = out / 2;
            for (name, rows) in [(gate, 0..half), (up, half..out)] {
                let tensors = AdapterTensors {
                    lora_a: x.lora_a.clone(),
                    a_shape: x.a_shape,
                    lora_b: x.lora_b[rows.start * r..rows.end * r].to_vec(),
                    b_shape: [half, r],
                };
                slices
                    .entry(key(name))
                    .or_default()
                    .push(MergeSlice::whole(tensors, scaling));
            }
        }
    }
    Ok(ember_lora::merge::merge_checkpoint_slices(base, slices, out, dtype)?)
}

/// A v4 per-expert adapter converted as PEFT 0.21 converts it (see
/// [`CausalLm::peft_adapter_files`]), for a checkpoint on disk (no model loaded): the config's
/// rewrite reads the module paths off the adapter's own keys. `None`: nothing to convert.
fn v4_adapter_fused(
    adapter: &AdapterFiles,
    fused: &ember_lora::FusedMoeTargets,
    moe: &crate::config::MoeConfig,
) -> Result<Option<AdapterFiles>> {
    let experts_module = format!(".{}", moe.layout.experts_module());
    let experts_of = |param: &str| {
        let (container, leaf) = param.rsplit_once('.')?;
        let gate_up = leaf == "gate_up_proj";
        (container.ends_with(&experts_module) && (gate_up || leaf == "down_proj"))
            .then(|| (moe.num_experts, moe.layout.expert_lora_layout(gate_up)))
    };
    let tensors = ember_lora::expert::fuse_v4_expert_tensors(&adapter.tensors, fused, &experts_of)?;
    if tensors.keys().eq(adapter.tensors.keys()) {
        return Ok(None);
    }
    let mut paths = ember_lora::MoeTargetPaths::default();
    for key in tensors.keys() {
        let container = key.trim_end_matches(".base_layer");
        if container.ends_with(&experts_module) {
            if !paths.expert_containers.iter().any(|c| c == container) {
                paths.other.push(container.to_string());
                paths.expert_containers.push(container.to_string());
            }
        } else {
            paths.linear.push(key.clone());
        }
    }
    Ok(Some(AdapterFiles {
        config: adapter.config.with_fused_moe_targets(fused, &paths)?,
        base_model_name_or_path: adapter.base_model_name_or_path.clone(),
        tensors,
        exact_targets: adapter.exact_targets,
    }))
}
