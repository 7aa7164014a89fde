"""FSDP2 (`fully_shard`) with SM3 on the sharded parameters: `torchrun --nproc-per-node 2 examples/fsdp2.py`."""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from sm3_dist import SM3

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
if torch.cuda.is_available():
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
# state kept as DTensors: DCP saves and reshards it
opt = SM3(model.parameters(), lr=4e-3, momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0)
gen = torch.Generator().manual_seed(dist.get_rank())
for _ in range(20):
    x, y = torch.randn(32, 16, generator=gen).to(device), torch.randn(32, 4, generator=gen).to(device)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
mu = opt.state[model[0].weight]["mu_0"]
assert mu.shape == (32,), mu.shape  # the global accumulator of dimension 0, sharded like the weight's rows
if dist.get_rank() == 0:
    print(f"ok: mu_0 placements {mu.placements}")
dist.destroy_process_group()
