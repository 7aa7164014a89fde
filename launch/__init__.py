"""Training job entry points and launch configs (accelerate, DeepSpeed, torchrun), installed as sm3_dist.launch."""
