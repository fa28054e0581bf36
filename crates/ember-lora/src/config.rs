//! `LoraConfig`: PEFT's LoRA settings with PEFT's names and semantics.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{LoraError, Result};

/// Which modules get adapters (`target_modules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches when its path equals an entry or ends with `.entry`.
    List(Vec<String>),
    /// A regex that must match the whole module path; `"all-linear"` means every linear layer
    /// except the output head.
    Pattern(String),
}

/// How adapter weights start (`init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform as PEFT does it, B = 0 (the adapter starts as the identity).
    /// `false`: both A and B random (for tests; the adapter does not start as the identity).
    Bool(bool),
    /// `"gaussian"`: A ~ N(0, 1/r²), B = 0.
    Named(InitName),
}

/// Named initialisation schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitName {
    /// A ~ N(0, 1/r²).
    Gaussian,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_targets() -> TargetModules {
    TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}
fn default_bias() -> String {
    "none".into()
}

/// LoRA settings, named as in PEFT's `LoraConfig` and `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of every adapter unless `rank_pattern` says otherwise.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator: the adapter branch is multiplied by `lora_alpha / r` (or `/ √r`).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Modules that get adapters.
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Parameters that get adapters (PEFT's `target_parameters`): a parameter
    /// `{module}.{name}` matches an entry equal to it or ending it after a dot
    /// (`experts.gate_up_proj`, `mlp.gate.weight`). Stacked expert weights `[experts, ..]`
    /// get one rank-r adapter per expert, stored flat as PEFT stores them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_parameters: Vec<String>,
    /// Modules never adapted: regex full-match (string) or exact/`.suffix` (list).
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Only layers with these indices (the first number in the path) are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides: key regex matched against the end of the module path.
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    /// Per-module alpha overrides: key regex matched against the end of the module path.
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    /// rsLoRA: scale by `lora_alpha / √r` instead of `lora_alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which biases train; only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// How A and B start.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: default_targets(),
            target_parameters: Vec::new(),
            exclude_modules: None,
            layers_to_transform: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            use_rslora: false,
            bias: default_bias(),
            init_lora_weights: default_init(),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> LoraError {
    LoraError::InvalidConfig {
        key: key.into(),
        message: message.into(),
    }
}

/// The resolved settings of one adapted module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleLora {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / r` or `alpha / √r`.
    pub scaling: f64,
}

impl LoraConfig {
    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(invalid("r", "must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(invalid("lora_alpha", "must be a finite number"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.lora_dropout),
            ));
        }
        if self.bias != "none" {
            return Err(invalid(
                "bias",
                format!("`{}` is not supported (only \"none\": biases stay frozen)", self.bias),
            ));
        }
        if let TargetModules::List(list) = &self.target_modules {
            if list.is_empty() && self.target_parameters.is_empty() {
                return Err(invalid(
                    "target_modules",
                    "is empty (and no target_parameters are given)",
                ));
            }
        }
        if let Some(empty) = self.target_parameters.iter().find(|t| t.trim().is_empty()) {
            return Err(invalid("target_parameters", format!("entry {empty:?} is empty")));
        }
        for (key, field) in [(&self.target_modules, "target_modules")]
            .into_iter()
            .chain(self.exclude_modules.as_ref().map(|e| (e, "exclude_modules")))
        {
            if let TargetModules::Pattern(p) = key {
                if !p.eq_ignore_ascii_case("all-linear") {
                    full_match_regex(p).map_err(|e| invalid(field, format!("regex `{p}`: {e}")))?;
                }
            }
        }
        for (name, map) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            for (k, v) in map {
                suffix_regex(k).map_err(|e| invalid(&format!("{name}.{k}"), format!("bad regex: {e}")))?;
                let n = v
                    .as_f64()
                    .ok_or_else(|| invalid(&format!("{name}.{k}"), format!("{v} is not a number")))?;
                if name == "rank_pattern" && (n < 1.0 || n.fract() != 0.0) {
                    return Err(invalid(
                        &format!("{name}.{k}"),
                        format!("rank {v} is not a positive integer"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the module at `path` gets an adapter, by PEFT's rules
    /// (`check_target_module_exists`). `is_output_head` marks the layer `all-linear` skips.
    pub fn targets(&self, path: &str, is_output_head: bool) -> bool {
        if let Some(exclude) = &self.exclude_modules {
            let excluded = match exclude {
                TargetModules::Pattern(p) => full_match(p, path),
                TargetModules::List(list) => list.iter().any(|e| path == e || path.ends_with(&format!(".{e}"))),
            };
            if excluded {
                return false;
            }
        }
        // PEFT expands `all-linear` into the list of linear modules' last names, so
        // `layers_to_transform` applies to it as to any list matched by suffix.
        match &self.target_modules {
            TargetModules::Pattern(p) if p.eq_ignore_ascii_case("all-linear") => {
                !is_output_head && self.in_transformed_layers(path)
            }
            TargetModules::Pattern(p) => full_match(p, path),
            TargetModules::List(list) if list.iter().any(|t| t == path) => true,
            TargetModules::List(list) => {
                list.iter().any(|t| path.ends_with(&format!(".{t}"))) && self.in_transformed_layers(path)
            }
        }
    }

    /// Whether the parameter `key` (`model.layers.1.mlp.experts.gate_up_proj`,
    /// `model.layers.1.mlp.gate.weight`) gets an adapter, by PEFT's rule for
    /// `target_parameters`: an entry equal to `key` or ending it after a dot. (PEFT applies
    /// neither `exclude_modules` nor `layers_to_transform` to parameters.)
    pub fn targets_parameter(&self, key: &str) -> bool {
        self.target_parameters
            .iter()
            .any(|t| key == t || key.ends_with(&format!(".{t}")))
    }

    /// Whether `path`'s layer index is one of `layers_to_transform` (always, when unset or empty).
    fn in_transformed_layers(&self, path: &str) -> bool {
        match &self.layers_to_transform {
            Some(layers) if !layers.is_empty() => layer_index(path).is_some_and(|i| layers.contains(&i)),
            _ => true,
        }
    }

    /// The keys of `adapter_config.json` whose values differ between `self` and `other`
    /// (`"r: 4 vs 8"`, self's value first), for
    /// adapters of the same modules (`targets`). `base_model_name_or_path` and the form of
    /// `target_modules` do not count; which modules are adapted is the caller's check.
    pub fn differences(&self, other: &LoraConfig, targets: &[String]) -> Vec<String> {
        let (a, b) = (self.to_peft_json(None, targets), other.to_peft_json(None, targets));
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return Vec::new();
        };
        a.iter()
            .filter(|(k, _)| k.as_str() != "target_modules" && k.as_str() != "base_model_name_or_path")
            .filter(|(k, v)| b.get(k.as_str()) != Some(*v))
            .map(|(k, v)| format!("{k}: {v} vs {}", b.get(k.as_str()).unwrap_or(&Value::Null)))
            .collect()
    }

    /// Rank, alpha and scale of the module at `path` after `rank_pattern`/`alpha_pattern`
    /// (PEFT's `get_pattern_key`: the first pattern key `k` with `(.*\.)?(k)$` matching).
    pub fn module_lora(&self, path: &str) -> ModuleLora {
        let pick = |map: &Map<String, Value>| {
            map.iter()
                .find(|(k, _)| suffix_regex(k).is_ok_and(|re| re.is_match(path).unwrap_or(false)))
                .and_then(|(_, v)| v.as_f64())
        };
        let r = pick(&self.rank_pattern).map_or(self.r, |v| v as usize);
        let alpha = pick(&self.alpha_pattern).unwrap_or(self.lora_alpha);
        let scaling = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        ModuleLora { r, alpha, scaling }
    }

    /// Whether PEFT files a parameter's adapter under `module` (`model.layers.1.mlp.gate` for
    /// `gate.weight`; `…mlp.experts` and `…mlp.experts.base_layer` for the stacked experts).
    pub fn wraps_parameter_of(&self, module: &str) -> bool {
        let mut unwrapped = module;
        while let Some(inner) = unwrapped.strip_suffix(".base_layer") {
            unwrapped = inner;
        }
        self.target_parameters.iter().any(|t| {
            let leaf = t.rsplit('.').next().unwrap_or(t);
            self.targets_parameter(&format!("{unwrapped}.{leaf}"))
        })
    }

    /// The scale of the adapter PEFT files under `module`: a module adapted as the parameter
    /// `{module}.weight` (a router named by `target_parameters`) takes the rank and alpha
    /// patterns of that key, as PEFT matches them; others those of the module path.
    pub fn adapter_scaling(&self, module: &str) -> f64 {
        let weight = format!("{module}.weight");
        if self.targets_parameter(&weight) {
            self.module_lora(&weight).scaling
        } else {
            self.module_lora(module).scaling
        }
    }

    /// Reads a PEFT `adapter_config.json`, refusing features Ember does not implement.
    pub fn from_peft_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| LoraError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| LoraError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_peft_json(&value, path)
    }

    /// Converts parsed `adapter_config.json` content; `path` names the file in errors.
    pub fn from_peft_json(value: &Value, path: &Path) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(unsupported(path, "adapter_config.json is not a JSON object"));
        };
        let peft_type = map.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(unsupported(path, &format!("peft_type `{peft_type}` (only LORA)")));
        }
        let is_set = |k: &str| match map.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        let refused: &[(&str, &str)] = &[
            ("use_dora", "DoRA (use_dora)"),
            ("modules_to_save", "fully trained extra modules (modules_to_save)"),
            ("layer_replication", "layer_replication"),
            ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers)"),
            ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
            ("lora_bias", "LoRA bias (lora_bias)"),
            ("use_qalora", "QA-LoRA (use_qalora)"),
            ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
            ("megatron_config", "Megatron layers (megatron_config)"),
            ("layers_pattern", "layers_pattern"),
            ("use_bdlora", "BD-LoRA (use_bdlora)"),
        ];
        for (key, what) in refused {
            if is_set(key) {
                return Err(unsupported(path, &format!("{what} is set")));
            }
        }
        let get = |k: &str| map.get(k).filter(|v| !v.is_null()).cloned();
        let parse = |k: &str| -> Result<Option<Value>> { Ok(get(k)) };
        let field_err = |k: &str, e: serde_json::Error| LoraError::InvalidConfig {
            key: k.into(),
            message: format!("in `{}`: {e}", path.display()),
        };
        let init = match get("init_lora_weights") {
            None => default_init(),
            Some(Value::Bool(b)) => InitLoraWeights::Bool(b),
            Some(Value::String(s)) if s == "gaussian" => InitLoraWeights::Named(InitName::Gaussian),
            // Other initialisations (pissa, olora, loftq, eva, ...) only affect how training
            // starts; a saved adapter is plain A and B, so loading it is unaffected.
            Some(_) => default_init(),
        };
        let config = Self {
            r: parse("r")?
                .map(|v| serde_json::from_value(v).map_err(|e| field_err("r", e)))
                .transpose()?
                .unwrap_or(8),
            lora_alpha: parse("lora_alpha")?.and_then(|v| v.as_f64()).unwrap_or(8.0),
            lora_dropout: parse("lora_dropout")?.and_then(|v| v.as_f64()).unwrap_or(0.0),
            target_parameters: match get("target_parameters") {
                Some(v) => serde_json::from_value(v).map_err(|e| field_err("target_parameters", e))?,
                None => Vec::new(),
            },
            target_modules: match get("target_modules") {
                Some(v) => serde_json::from_value(v).map_err(|e| field_err("target_modules", e))?,
                // PEFT allows an adapter of parameters only.
                None if is_set("target_parameters") => TargetModules::List(Vec::new()),
                None => return Err(unsupported(path, "no target_modules")),
            },
            exclude_modules: get("exclude_modules")
                .map(|v| serde_json::from_value(v).map_err(|e| field_err("exclude_modules", e)))
                .transpose()?,
            layers_to_transform: match get("layers_to_transform") {
                None => None,
                Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
                Some(v) => Some(serde_json::from_value(v).map_err(|e| field_err("layers_to_transform", e))?),
            },
            rank_pattern: get("rank_pattern")
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default(),
            alpha_pattern: get("alpha_pattern")
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default(),
            use_rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
            bias: get("bias")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(default_bias),
            init_lora_weights: init,
        };
        config.validate().map_err(|e| match e {
            LoraError::InvalidConfig { key, message } => LoraError::InvalidConfig {
                key,
                message: format!("{message} (in `{}`)", path.display()),
            },
            other => other,
        })?;
        Ok(config)
    }

    /// The `adapter_config.json` PEFT writes for this config (every field PEFT 0.21 reads,
    /// unsupported features at their off values).
    pub fn to_peft_json(&self, base_model_name_or_path: Option<&str>, resolved_targets: &[String]) -> Value {
        let targets = match &self.target_modules {
            // PEFT 0.21 saves all-linear resolved to the full paths of the modules it found.
            TargetModules::Pattern(p) if p.eq_ignore_ascii_case("all-linear") => {
                let mut names = resolved_targets.to_vec();
                names.sort();
                Value::from(names)
            }
            other => serde_json::to_value(other).unwrap_or(Value::Null),
        };
        let init = serde_json::to_value(self.init_lora_weights).unwrap_or(Value::Bool(true));
        let mut m = BTreeMap::<&str, Value>::new();
        m.insert("alpha_pattern", Value::Object(self.alpha_pattern.clone()));
        m.insert("auto_mapping", Value::Null);
        m.insert(
            "base_model_name_or_path",
            base_model_name_or_path.map_or(Value::Null, Value::from),
        );
        m.insert("bias", Value::from(self.bias.clone()));
        m.insert(
            "exclude_modules",
            serde_json::to_value(&self.exclude_modules).unwrap_or(Value::Null),
        );
        m.insert("fan_in_fan_out", Value::Bool(false));
        m.insert("inference_mode", Value::Bool(true));
        m.insert("init_lora_weights", init);
        m.insert("layer_replication", Value::Null);
        m.insert("layers_pattern", Value::Null);
        m.insert(
            "layers_to_transform",
            serde_json::to_value(&self.layers_to_transform).unwrap_or(Value::Null),
        );
        m.insert("loftq_config", Value::Object(Map::new()));
        m.insert("lora_alpha", number(self.lora_alpha));
        m.insert("lora_bias", Value::Bool(false));
        m.insert("lora_dropout", Value::from(self.lora_dropout));
        m.insert("megatron_config", Value::Null);
        m.insert("megatron_core", Value::from("megatron.core"));
        m.insert("modules_to_save", Value::Null);
        m.insert("peft_type", Value::from("LORA"));
        m.insert("r", Value::from(self.r));
        m.insert("rank_pattern", Value::Object(self.rank_pattern.clone()));
        m.insert("revision", Value::Null);
        m.insert("target_modules", targets);
        m.insert(
            "target_parameters",
            if self.target_parameters.is_empty() {
                Value::Null
            } else {
                Value::from(self.target_parameters.clone())
            },
        );
        m.insert("task_type", Value::from("CAUSAL_LM"));
        m.insert("use_dora", Value::Bool(false));
        m.insert("use_rslora", Value::Bool(self.use_rslora));
        Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
}

/// How transformers 5 fused a family's MoE modules, for PEFT's rewrite of an adapter's
/// targets (`peft.utils.transformers_weight_conversion`, applied by `get_peft_model` and when
/// loading): the v4 module names that no longer exist map to parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedMoeTargets {
    /// `(v4 leaf name, v5 parameter)`: `("gate", "gate.weight")`, `("w1", "gate_up_proj")`.
    pub renames: &'static [(&'static str, &'static str)],
    /// `(v5 parameter, the v4 names fused into it in order)`: `("gate_up_proj", ["w1", "w3"])`.
    pub fused: &'static [(&'static str, &'static [&'static str])],
    /// Module renames between the v4 and v5 layouts that apply to every key of a v4 adapter:
    /// `(".block_sparse_moe.", ".mlp.")` for Mixtral.
    pub renamed_modules: &'static [(&'static str, &'static str)],
}

/// The module paths of a model that PEFT's target rewrite looks at
/// ([`LoraConfig::with_fused_moe_targets`]).
#[derive(Debug, Clone, Default)]
pub struct MoeTargetPaths {
    /// Layers that are `nn.Linear` in transformers, the output head excluded (what
    /// `all-linear` resolves to).
    pub linear: Vec<String>,
    /// Other modules a regex can name: routers (`model.layers.1.mlp.gate`) and expert
    /// containers (`model.layers.1.mlp.experts`).
    pub other: Vec<String>,
    /// The expert containers, where a regex naming a v4 expert module
    /// (`model.layers.1.mlp.experts.gate_proj`) is probed.
    pub expert_containers: Vec<String>,
}

impl LoraConfig {
    /// PEFT 0.21's rewrite of the targets for a MoE family whose experts transformers 5 fuses
    /// (Mixtral, Qwen2/3-MoE, DeepSeek-V3, GLM-4.5 to GLM-5, Qwen3-Next): `all-linear`, a regex
    /// or a list naming the v4 expert projections (`gate_proj`, `up_proj`, `down_proj`; Mixtral's
    /// `w1`, `w3`, `w2`) or the router (`gate`) becomes LoRA on the fused expert parameters and
    /// the router weight (`target_parameters`), with rank and alpha doubled on `gate_up_proj`
    /// (two projections fused). Those names then no longer adapt any `nn.Linear`: the dense MLP
    /// layers and shared experts of such models lose their LoRA, as in PEFT. Naming only one of
    /// two fused projections is an error.
    pub fn with_fused_moe_targets(&self, fused: &FusedMoeTargets, paths: &MoeTargetPaths) -> Result<LoraConfig> {
        let leaf = |p: &str| p.rsplit('.').next().unwrap_or(p).to_string();
        let targets: Vec<String> = match &self.target_modules {
            TargetModules::List(list) => list.clone(),
            TargetModules::Pattern(p) if p.eq_ignore_ascii_case("all-linear") => {
                let mut names: Vec<String> = paths.linear.iter().map(|p| leaf(p)).collect();
                names.extend(fused.renames.iter().map(|(old, _)| old.to_string()));
                names
            }
            TargetModules::Pattern(p) => {
                let mut names: Vec<String> = paths
                    .linear
                    .iter()
                    .chain(&paths.other)
                    .filter(|path| full_match(p, path))
                    .map(|path| leaf(path))
                    .collect();
                for (old, _) in fused.renames {
                    if paths
                        .expert_containers
                        .iter()
                        .any(|c| full_match(p, &format!("{c}.{old}")))
                    {
                        names.push(old.to_string());
                    }
                }
                if names.is_empty() {
                    return Ok(self.clone());
                }
                names
            }
        };
        let mut out = self.clone();
        let mut remaining = Vec::new();
        let mut parameters = self.target_parameters.clone();
        let mut named: Vec<(&str, &str)> = Vec::new();
        for target in &targets {
            let hit = fused
                .renames
                .iter()
                .find(|(old, _)| target == old || target.ends_with(&format!(".{old}")));
            match hit {
                Some(&(old, new)) => {
                    if !parameters.iter().any(|p| p == new) {
                        parameters.push(new.to_string());
                    }
                    named.push((new, old));
                }
                None if !remaining.contains(target) => remaining.push(target.clone()),
                None => {}
            }
        }
        for (new, olds) in fused.fused {
            let present: Vec<&str> = olds
                .iter()
                .copied()
                .filter(|o| named.iter().any(|(n, old)| n == new && old == o))
                .collect();
            if !present.is_empty() && present.len() < olds.len() {
                let missing: Vec<&str> = olds.iter().copied().filter(|o| !present.contains(o)).collect();
                return Err(invalid(
                    "target_modules",
                    format!(
                        "names {} without {}: this model fuses them into `{new}` (as transformers 5 and PEFT do), \
                         so target all of them or none",
                        present.join(", "),
                        missing.join(", ")
                    ),
                ));
            }
            if present.len() == olds.len() && olds.len() > 1 {
                let key = format!(r".*\.{}", fancy_regex::escape(new));
                out.rank_pattern.insert(key.clone(), Value::from(self.r * olds.len()));
                out.alpha_pattern
                    .insert(key, number(self.lora_alpha * olds.len() as f64));
            }
        }
        out.target_modules = TargetModules::List(remaining);
        out.target_parameters = parameters;
        Ok(out)
    }
}

/// Integers as JSON integers (PEFT writes `"lora_alpha": 16`), others as floats.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn unsupported(path: &Path, feature: &str) -> LoraError {
    LoraError::Unsupported {
        path: path.to_path_buf(),
        feature: feature.to_string(),
    }
}

/// Python's `re.fullmatch(pattern, s)`.
fn full_match_regex(pattern: &str) -> std::result::Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())
}

fn full_match(pattern: &str, s: &str) -> bool {
    full_match_regex(pattern).is_ok_and(|re| re.is_match(s).unwrap_or(false))
}

/// PEFT's `re.match(rf"(.*\.)?({key})$", path)`.
fn suffix_regex(key: &str) -> std::result::Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| e.to_string())
}

/// The layer index PEFT reads: the first number that follows a `name.` segment and is itself
/// followed by a dot (`re.match(r".*?\.[^.]*\.(\d+)\.", path)`).
pub fn layer_index(path: &str) -> Option<usize> {
    let parts: Vec<&str> = path.split('.').collect();
    // Needs some prefix, a segment, the number, and at least one more segment after it.
    (2..parts.len().saturating_sub(1))
        .find(|&i| !parts[i].is_empty() && parts[i].bytes().all(|b| b.is_ascii_digit()))
        .and_then(|i| parts[i].parse().ok())
}
