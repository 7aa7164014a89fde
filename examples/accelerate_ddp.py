"""accelerate (DDP) with SM3 or ShardedSM3. On CPU: `ACCELERATE_USE_CPU=1 torchrun --nproc-per-node 2
examples/accelerate_ddp.py` (`accelerate launch --cpu --num_processes 2` starts one process); on GPUs:
`accelerate launch --num_processes 2 examples/accelerate_ddp.py`. `--sharded` for ShardedSM3."""

import argparse

import torch
from accelerate import Accelerator

from sm3_dist import SM3, ShardedSM3

parser = argparse.ArgumentParser()
parser.add_argument("--sharded", action="store_true")
args = parser.parse_args()
accelerator = Accelerator()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
if args.sharded:
    # ShardedSM3 views the parameters' storage: build it after prepare(model), which may move the model
    model = accelerator.prepare(model)
    opt = accelerator.prepare(
        ShardedSM3(model.parameters(), lr=4e-3, momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0)
    )
else:
    model, opt = accelerator.prepare(
        model, SM3(model.parameters(), lr=4e-3, momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0)
    )
gen = torch.Generator().manual_seed(accelerator.process_index)
for _ in range(10):
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)
    loss = torch.nn.functional.mse_loss(model(x.to(accelerator.device)), y.to(accelerator.device))
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
accelerator.wait_for_everyone()
if accelerator.is_main_process:
    print(f"ok: {accelerator.num_processes} processes, {type(opt.optimizer).__name__}")
