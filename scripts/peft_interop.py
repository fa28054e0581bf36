"""PEFT interop check (run by hand): Ember's adapters load in PEFT, PEFT's load in Ember, and
`ember merge` output loads in transformers, all with the same logits.

Needs: pip install torch transformers==5.24.0 peft==0.21.2 safetensors
Run from the repository root:  python scripts/peft_interop.py [ARCH ...]   (default: every fixture)
It builds Ember (release), and for several fixture models and LoRA settings:
  1. Ember writes a random adapter (examples/random_adapter) -> PEFT loads it -> logits vs `ember forward --adapter`;
  2. PEFT makes a random adapter (rank/alpha patterns, rsLoRA, subsets) -> `ember forward --adapter` -> logits vs PEFT;
  3. `ember merge` -> transformers AutoModelForCausalLM loads the folder -> logits vs PEFT merge_and_unload.
Prints the max abs logit difference of each (where attention_mask is 1) and fails above 1e-4.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
EMBER = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "ember")
EXAMPLE = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "examples", "random_adapter")
TOL = 1e-4


def sh(*args):
    subprocess.run(args, check=True, cwd=ROOT)


def inputs(arch):
    """Model inputs of the fixture: ids, mask and (2026 fixtures, left-padded) position ids."""
    d = json.load(open(os.path.join(FIX, arch, "inputs.json")))
    kw = {"input_ids": torch.tensor(d["input_ids"]), "attention_mask": torch.tensor(d["attention_mask"])}
    if isinstance(d.get("position_ids"), list):
        kw["position_ids"] = torch.tensor(d["position_ids"])
    return kw


def max_diff(a, b, mask):
    m = mask.bool().unsqueeze(-1).expand_as(a)
    return (a - b).abs()[m].max().item()


def sensitivity(model, kw, mask, trials=5):
    """How far the model's own logits move when its input embeddings get 1e-6 relative noise: a
    difference from Ember below this is f32 rounding amplified by the model (random adapters with
    init_lora_weights=False on Gated DeltaNet or a router can be that ill-conditioned), not a bug.
    Printed beside a failure; the bound is not loosened by it."""
    torch.manual_seed(1)
    rest = {k: v for k, v in kw.items() if k != "input_ids"}
    with torch.no_grad():
        emb = model.get_input_embeddings()(kw["input_ids"])
        ref = model(inputs_embeds=emb, **rest).logits
        return max(max_diff(model(inputs_embeds=emb * (1 + 1e-6 * torch.randn_like(emb)), **rest).logits, ref, mask)
                   for _ in range(trials))


def ember_logits(arch, adapter, tmp):
    out = os.path.join(tmp, "logits.safetensors")
    args = [EMBER, "forward", "--model", os.path.join(FIX, arch), "--inputs", os.path.join(FIX, arch, "inputs.json"), "--out", out]
    if adapter:
        args += ["--adapter", adapter]
    sh(*args)
    return load_file(out)["logits"]


def load(path):
    """The folder's own class (`architectures`): a causal LM or a multimodal wrapper."""
    cls = getattr(transformers, json.load(open(os.path.join(path, "config.json")))["architectures"][0])
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def base(arch):
    return load(os.path.join(FIX, arch))


def main():
    if not os.environ.get("EMBER_INTEROP_NO_BUILD"): sh("cargo", "build", "--release", "-p", "ember-cli", "-p", "ember-model", "--example", "random_adapter")
    if not os.environ.get("EMBER_INTEROP_NO_BUILD"): sh("cargo", "build", "--release", "-p", "ember-cli")
    results = []
    torch.manual_seed(0)
    # A subset of each family's own module names (fused where the family fuses; attention only
    # for MoE: its experts are covered by the wide setting).
    subsets = {
        "phi3": "qkv_proj,down_proj",
        "glm4": "q_proj,v_proj,gate_up_proj",
        "mixtral": "q_proj,v_proj,o_proj",
        "qwen3_moe": "q_proj,v_proj,o_proj",
        "gpt_oss": "q_proj,v_proj,o_proj",
        "glm4_moe": "q_proj,v_proj,o_proj",
        "deepseek_v3": "q_b_proj,kv_b_proj,o_proj",
        "glm4_moe_lite": "kv_b_proj,o_proj",
        "glm_moe_dsa": "q_b_proj,kv_b_proj,o_proj",
        "mistral4": "q_b_proj,kv_b_proj,o_proj",
        "mistral4_wrapped": "q_b_proj,kv_b_proj,o_proj",
        "qwen3_5": "in_proj_qkv,in_proj_b,out_proj,q_proj",
        "qwen3_5_wrapped": "in_proj_qkv,in_proj_b,out_proj,q_proj",
        "qwen3_5_moe": "in_proj_qkv,out_proj,shared_expert_gate",
        "qwen3_next": "in_proj_qkvz,in_proj_ba,out_proj",
    }
    archs = ["llama", "llama_rope3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2",
             "glm4", "mixtral", "qwen3_moe", "gpt_oss", "olmo3", "smollm3", "ministral3", "llama4",
             "ministral3_wrapped", "gemma3_wrapped", "gemma4", "gemma4_moe", "gemma4_unified", "gemma4_wrapped",
             "gemma4_unified_wrapped", "glm4_moe", "deepseek_v3", "glm4_moe_lite", "glm_moe_dsa", "mistral4",
             "mistral4_wrapped", "qwen3_5", "qwen3_5_wrapped", "qwen3_5_moe", "qwen3_next"]
    for arch in sys.argv[1:] or archs:
        kw = inputs(arch)
        mask = kw["attention_mask"]
        subset = subsets.get(arch, "q_proj,v_proj,down_proj")
        # MoE: the families whose experts transformers 5 fuses take all-linear (PEFT rewrites it to attention +
        # router + experts, and so does Ember); the others name their expert (and router) parameters after `|`.
        # On a multimodal wrapper all-linear also targets the vision tower, which Ember refuses: PEFT gets a
        # regex over the language model there (Ember's list targets match text modules only).
        # (On Llama 4, PEFT 0.21.2's all-linear also wraps the router, a Linear returning a tuple, and its
        # forward crashes; GLM-5's all-linear includes the indexer, which Ember does not load.)
        experts = "experts.gate_up_proj,experts.down_proj"
        moe = arch in ("gpt_oss", "llama4", "gemma4_moe", "glm_moe_dsa", "mistral4", "mistral4_wrapped",
                       "qwen3_5_moe")
        wrapped = arch.endswith("_wrapped")
        wide = "q_proj,k_proj,v_proj,o_proj" if moe or wrapped else "all-linear"
        if arch in ("glm_moe_dsa", "mistral4", "mistral4_wrapped"):  # latent attention's projections
            wide = "q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"
        if arch in ("qwen3_5_moe",):  # linear attention and the shared expert's gate too
            wide = "q_proj,k_proj,v_proj,o_proj,out_proj,shared_expert_gate,in_proj_qkv,in_proj_z,in_proj_b,in_proj_a"
        if arch in ("llama4", "gemma4_moe"):  # the dense MLP (and shared expert) are linear layers too
            wide = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        if moe:
            router = {"gpt_oss": "router.weight", "llama4": "feed_forward.router.weight", "gemma4_moe": ""}
            wide += "|" + ",".join(p for p in [router.get(arch, "mlp.gate.weight"), experts] if p)
        for r, alpha, targets, rslora in [(8, 16, wide, False), (3, 7, subset, True)]:
            with tempfile.TemporaryDirectory() as tmp:
                # 1. Ember -> PEFT
                ad = os.path.join(tmp, "ember_adapter")
                sh(EXAMPLE, os.path.join(FIX, arch), ad, str(r), str(alpha), targets, "rslora" if rslora else "plain")
                peft_model = PeftModel.from_pretrained(base(arch), ad).eval()
                with torch.no_grad():
                    ref = peft_model(**kw).logits
                d1 = max_diff(ember_logits(arch, ad, tmp), ref, mask)
                what = f"Ember adapter -> PEFT (r={r}, alpha={alpha}, {targets}, rslora={rslora})"
                if d1 > TOL:
                    what += f" [PEFT's own logits move {sensitivity(peft_model, kw, mask):.1e} under 1e-6 input noise]"
                results.append((arch, what, d1))

                # 2. PEFT -> Ember
                modules, _, params = targets.partition("|")
                tm = modules if modules == "all-linear" else modules.split(",")
                if wrapped:
                    tm = r".*language_model.*\.(" + "|".join(modules.split(",")) + ")"
                patterns = targets == wide
                cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=tm, use_rslora=rslora, init_lora_weights=False,
                                 target_parameters=params.split(",") if params else None,
                                 rank_pattern={"o_proj": 2} if patterns else {},
                                 # (patterns are matched against module paths with the wrapper's names)
                                 alpha_pattern={"up_proj": 5, "v_proj": 3} if patterns else {})
                pm = get_peft_model(base(arch), cfg).eval()
                pdir = os.path.join(tmp, "peft_adapter")
                pm.save_pretrained(pdir)
                with torch.no_grad():
                    ref = pm(**kw).logits
                d2 = max_diff(ember_logits(arch, pdir, tmp), ref, mask)
                what = f"PEFT adapter -> Ember (r={r}, alpha={alpha}, {targets}, rslora={rslora}, patterns)"
                if d2 > TOL:
                    what += f" [PEFT's own logits move {sensitivity(pm, kw, mask):.1e} under 1e-6 input noise]"
                results.append((arch, what, d2))

                # 3. ember merge -> transformers
                merged = os.path.join(tmp, "merged")
                sh(EMBER, "merge", "--base", os.path.join(FIX, arch), "--adapter", pdir, "--out", merged)
                m = load(merged)
                with torch.no_grad():
                    got = m(**kw).logits
                    ref = pm.merge_and_unload()(**kw).logits
                d3 = max_diff(got, ref, mask)
                results.append((arch, "ember merge -> transformers vs PEFT merge_and_unload", d3))
    bad = 0
    for arch, what, d in results:
        ok = d <= TOL
        bad += not ok
        print(f"{'ok ' if ok else 'FAIL'} {arch:12s} {what}: max abs diff {d:.3e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
