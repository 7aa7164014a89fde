"""HF Trainer with SM3 under DeepSpeed ZeRO-2, tiny GPT-2 built from a config (no download).
CPU: `DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/hf_trainer.py --route config|cls`.
`config`: "optimizer": {"type": "SM3", "params": {"lr": "auto"}} in the DeepSpeed config; `cls`: no optimizer
section, `Trainer(optimizer_cls_and_kwargs=(SM3, {...}))`. Not `optimizers=(SM3(...), None)` without a section:
transformers discards that optimizer under DeepSpeed, and RequireSM3 stops the job before its first step."""

import argparse

import torch
from sm3_dist.integrations.shm import remove_deepspeed_shm_at_exit
from sm3_dist.integrations.transformers import RequireSM3
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from sm3_dist import SM3

parser = argparse.ArgumentParser()
parser.add_argument("--route", choices=["config", "cls"], default="config")
parser.add_argument("--out", default="hf-trainer-out")
args = parser.parse_args()
remove_deepspeed_shm_at_exit()


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


ds_config = {
    "train_micro_batch_size_per_gpu": 2,  # explicit: "auto" would be filled for one process on CPU
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**9,
}
extra = {}
if args.route == "config":
    ds_config["optimizer"] = {
        "type": "SM3",
        "params": {"lr": "auto", "momentum": 0.9, "beta": 0.99, "bias_correction": True, "update_clip": 1.0},
    }
else:
    extra["optimizer_cls_and_kwargs"] = (
        SM3,
        {"lr": 4e-3, "momentum": 0.9, "beta": 0.99, "bias_correction": True, "update_clip": 1.0},
    )
training = TrainingArguments(
    output_dir=args.out,
    max_steps=5,
    per_device_train_batch_size=2,
    learning_rate=0.05,
    max_grad_norm=0.0,  # no clipping: the run is SM3's own update
    deepspeed=ds_config,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
trainer = Trainer(model=model, args=training, train_dataset=Tokens(), callbacks=[RequireSM3()], **extra)
trainer.train()
base = trainer.model_wrapped.basic_optimizer
keys = sorted({k for state in base.state.values() for k in state})
assert "exp_avg" not in keys, keys
if trainer.is_world_process_zero():
    print(f"ok: {args.route}: {type(base).__name__}, {trainer.state.global_step} steps")
