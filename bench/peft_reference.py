"""The PyTorch + PEFT side of bench/cpu.sh (and bench/gpu.sh).

    python bench/peft_reference.py train MODEL_DIR --seq 256 --batch 4 --steps 21 [--adapter-out DIR]
    python bench/peft_reference.py generate MODEL_DIR --prompt-len 32 --new-tokens 128

`train` runs the loop Ember's step_bench runs: the same token pattern ((i*7919 + b*104729) % vocab),
every token a target, LoRA r 16 / alpha 32 on all linear layers but lm_head, AdamW (lr 1e-4, torch
defaults), global grad-norm clip 1.0. It prints one JSON line: median step seconds after the
first (warm-up) step, tokens/s, and peak memory (CPU: max RSS; CUDA: max allocated).
`generate` times greedy decoding with the KV cache (transformers' generate, eos ignored).
Needs: pip install torch transformers peft
"""
import argparse
import json
import resource
import statistics
import time

import torch


def peak_memory_mib(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(model_dir, device, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)


def train(args):
    from peft import LoraConfig, get_peft_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = load(args.model, args.device, dtype)
    vocab = model.config.vocab_size
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    ids = torch.tensor(
        [[(i * 7919 + b * 104729) % vocab for i in range(args.seq)] for b in range(args.batch)], device=args.device
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model.train()
    times = []
    for step in range(args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        print(f"step {step}: {times[-1]:.2f} s, loss {loss.item():.4f}", flush=True)
    median = statistics.median(times[1:])
    if args.adapter_out:
        model.save_pretrained(args.adapter_out)
    print(
        json.dumps(
            {
                "median_step_s": median,
                "tokens_per_s": args.seq * args.batch / median,
                "peak_mib": peak_memory_mib(args.device),
                "threads": torch.get_num_threads(),
            }
        )
    )


def generate(args):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = load(args.model, args.device, dtype).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 7919) % vocab for i in range(args.prompt_len)]], device=args.device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                use_cache=True,
            )
        times.append(time.perf_counter() - start)
    assert out.shape[1] == args.prompt_len + args.new_tokens
    median = statistics.median(times[1:])
    print(json.dumps({"seconds": median, "tokens_per_s": args.new_tokens / median}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "generate"])
    p.add_argument("model")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--adapter-out")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    train(args) if args.mode == "train" else generate(args)


if __name__ == "__main__":
    main()
