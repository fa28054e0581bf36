"""The mlx-lm side of bench/cpu.sh: `mlx_lm.lora` on the same HF folder Ember and PEFT train.

    python bench/mlx_reference.py MODEL_DIR DATA_DIR --seq 256 --batch 4 --steps 3

LoRA r 16, scale 2.0 (alpha 32), dropout 0, the seven linear keys of every layer, AdamW lr 1e-4,
no gradient checkpointing; DATA_DIR holds train.jsonl/valid.jsonl of {"text": ...} rows longer
than SEQ tokens (mlx-lm cuts them to SEQ), so every step trains BATCH x SEQ tokens. Prints one
JSON line: the median of mlx-lm's own tokens/s reports over the steps after the first (its
reports exclude validation time), mlx's peak memory and the first loss.
Needs: pip install "mlx[cpu]" mlx-lm
"""
import argparse
import json
import statistics
import tempfile
import types

import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()

    reports = []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, train_info):
            reports.append(train_info)

    lora.get_reporting_callbacks = lambda *args, **kwargs: Collect()
    with tempfile.TemporaryDirectory() as adapter_dir:
        args = dict(lora.CONFIG_DEFAULTS)
        args.update(
            model=a.model,
            train=True,
            test=False,
            data=a.data,
            fine_tune_type="lora",
            num_layers=-1,
            batch_size=a.batch,
            iters=a.steps,
            learning_rate=1e-4,
            max_seq_length=a.seq,
            optimizer="adamw",
            steps_per_report=1,
            steps_per_eval=10**9,
            val_batches=1,
            save_every=10**9,
            adapter_path=adapter_dir,
            grad_checkpoint=False,
            seed=0,
            report_to=None,
            project_name=None,
            lora_parameters={
                "keys": [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ],
                "rank": 16,
                "scale": 2.0,
                "dropout": 0.0,
            },
        )
        lora.run(types.SimpleNamespace(**args))
    timed = reports[1:] or reports
    print(
        json.dumps(
            {
                "tokens_per_s": statistics.median(r["tokens_per_second"] for r in timed),
                "peak_mlx_gb": reports[-1]["peak_memory"],
                "first_loss": reports[0]["train_loss"],
            }
        )
    )


if __name__ == "__main__":
    main()
