"""accelerate's FSDP2 plugin with SM3 (GPUs: on CPU accelerate's FSDP plugin does not shard; use examples/fsdp2.py
with torchrun there): `accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 examples/accelerate_fsdp2.py`."""

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin

from sm3_dist import SM3

accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
# built before prepare: accelerate moves the optimizer onto the sharded (DTensor) parameters, which SM3 reads
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
mu = opt.optimizer.state[model[0].weight]["mu_0"]
if accelerator.is_main_process:
    print(f"ok: FSDP2 via accelerate, mu_0 {type(mu).__name__} of shape {tuple(mu.shape)}")
