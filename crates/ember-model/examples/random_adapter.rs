//! Attach a LoRA adapter with random A and B to a model and save it in PEFT's format.
//!
//! Used by `scripts/peft_interop.py` to check that PEFT loads Ember's adapters:
//!
//! ```sh
//! cargo run --release -p ember-model --example random_adapter -- MODEL_DIR OUT_DIR R ALPHA TARGETS [rslora]
//! ```
//! TARGETS is `all-linear` or a comma-separated list (`q_proj,v_proj`), optionally followed by
//! `|` and the target parameters (`q_proj,v_proj|experts.gate_up_proj,experts.down_proj`).

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use ember_lora::{InitLoraWeights, LoraConfig, TargetModules};
use ember_model::CausalLm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err("usage: random_adapter MODEL_DIR OUT_DIR R ALPHA TARGETS [rslora]".into());
    }
    let model_dir = PathBuf::from(&args[0]);
    let out = PathBuf::from(&args[1]);
    let (modules, parameters) = args[4].split_once('|').unwrap_or((&args[4], ""));
    let list = |s: &str| -> Vec<String> { s.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect() };
    let targets = if modules == "all-linear" {
        TargetModules::Pattern("all-linear".into())
    } else {
        TargetModules::List(list(modules))
    };
    let config = LoraConfig {
        r: args[2].parse()?,
        lora_alpha: args[3].parse()?,
        target_modules: targets,
        target_parameters: list(parameters),
        use_rslora: args.get(5).is_some_and(|a| a == "rslora"),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    let device = Default::default();
    NdArray::<f32>::seed(&device, 7);
    let mut model = CausalLm::<NdArray<f32>>::from_dir(&model_dir, &device)?;
    let report = model.attach_lora(&config, &device)?;
    model
        .adapter_files(&config, Some(model_dir.display().to_string()))
        .write(&out)?;
    println!("{report} -> {}", out.display());
    Ok(())
}
