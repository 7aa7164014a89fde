"""accelerate's DeepSpeed plugin with a user-built SM3 (ZeRO-2, config without an optimizer section).
CPU: `DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/accelerate_deepspeed.py`; GPUs: `accelerate launch
--num_processes 2 examples/accelerate_deepspeed.py`. With optimizer offload add "zero_force_ds_cpu_optimizer": false,
or accelerate swaps SM3 for DeepSpeedCPUAdam (check_engine says so)."""

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from sm3_dist.integrations.deepspeed import check_engine
from sm3_dist.integrations.shm import remove_deepspeed_shm_at_exit

from sm3_dist import SM3

remove_deepspeed_shm_at_exit()
config = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "gradient_clipping": 0.0,
    "steps_per_print": 10**9,
}
accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
model, opt = accelerator.prepare(
    model, SM3(model.parameters(), lr=4e-3, momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0)
)
check_engine(model)  # model is the DeepSpeed engine: raises, naming the cause, unless it steps SM3
gen = torch.Generator().manual_seed(accelerator.process_index)
for _ in range(10):
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
    loss = torch.nn.functional.mse_loss(model(x.to(accelerator.device)), y.to(accelerator.device))
    accelerator.backward(loss)  # DeepSpeed's backward and step
    opt.step()
    opt.zero_grad()
keys = sorted({k for state in model.basic_optimizer.state.values() for k in state})
if accelerator.is_main_process:
    print(f"ok: {type(model.basic_optimizer).__name__} under ZeRO-2, state keys {keys}")
