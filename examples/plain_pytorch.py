"""SM3 in a plain PyTorch loop, one process: `python examples/plain_pytorch.py`."""

import torch

from sm3_dist import SM3
from sm3_dist.schedules import warmup_cooldown

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
opt = SM3(model.parameters(), lr=4e-3, momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0)
sched = warmup_cooldown(opt, total_steps=50, cooldown_fraction=0.1)  # warm-up 5% (quadratic), cool-down 10%
x, y = torch.randn(64, 16), torch.randn(64, 4)
losses = []
for _ in range(50):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    losses.append(loss.item())
# per dimension: a 32 x 16 weight keeps 32 + 16 accumulators
assert opt.state[model[0].weight]["mu_0"].shape == (32,) and opt.state[model[0].weight]["mu_1"].shape == (16,)
assert losses[-1] < losses[0]
print(f"ok: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
