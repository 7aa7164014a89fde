"""DDP with ShardedSM3 (optimizer state split across ranks):
`torchrun --nproc-per-node 2 examples/ddp_sharded.py` (gloo on CPU, nccl on GPUs)."""

import torch
import torch.distributed as dist

from sm3_dist import ShardedSM3

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
ddp = torch.nn.parallel.DistributedDataParallel(model)
# after the model is final (wrapped, on its device)
opt = ShardedSM3(ddp.parameters(), lr=4e-3, momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0)
gen = torch.Generator().manual_seed(rank)
for _ in range(20):
    x, y = torch.randn(32, 16, generator=gen).to(device), torch.randn(32, 4, generator=gen).to(device)
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
full = opt.state_dict()  # a collective: consolidated, the format of a single-process SM3
assert full["state"][0]["mu_0"].shape == (32,) and full["state"][0]["momentum_buffer"].shape == (32, 16)
if rank == 0:
    print(
        f"ok: rank 0 owns {sum(b - a for a, b in opt.owned_ranges())} of {sum(p.numel() for p in model.parameters())}"
    )
dist.destroy_process_group()
