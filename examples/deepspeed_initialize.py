"""DeepSpeed ZeRO with a user-built SM3: `DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_initialize.py`
(or `deepspeed --num_gpus 2 examples/deepspeed_initialize.py` on GPUs). `--stage 1|2|3`."""

import argparse

import deepspeed
import torch
from sm3_dist.integrations.shm import remove_deepspeed_shm_at_exit

from sm3_dist import SM3, local_state_bytes

parser = argparse.ArgumentParser()
parser.add_argument("--stage", type=int, default=2)
parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
args = parser.parse_args()
remove_deepspeed_shm_at_exit()  # DeepSpeed's CPU backend leaves its /dev/shm buffers behind otherwise
config = {
    "train_micro_batch_size_per_gpu": 8,
    "zero_optimization": {"stage": args.stage},
    "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 unless told: 0 keeps the run equal to plain SM3
    "steps_per_print": 10**9,
    # no "optimizer" section: the optimizer is the one passed below
}
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
engine, *_ = deepspeed.initialize(
    model=model,
    optimizer=SM3(model.parameters(), lr=4e-3, momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0),
    config=config,
)
gen = torch.Generator().manual_seed(engine.global_rank)
for _ in range(10):
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
    loss = torch.nn.functional.mse_loss(engine(x.to(engine.device)), y.to(engine.device))
    engine.backward(loss)
    engine.step()
base = engine.basic_optimizer  # the SM3 above: ZeRO's flat partitions mapped back to the weights' shapes
keys = sorted({k for state in base.state.values() for k in state})
assert "mu_0" in keys or any(k.startswith("piece") for k in keys), keys
if engine.global_rank == 0:
    print(f"ok: ZeRO-{args.stage}, {type(base).__name__}, {local_state_bytes(base)} bytes of state on rank 0")
