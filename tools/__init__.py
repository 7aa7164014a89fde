"""Study tools installed as ``sm3_dist.tools``, kept out of the optimizer package: ``sm3-dist bench``
(:mod:`sm3_dist.tools.bench`), ``sm3-dist memory`` (:mod:`sm3_dist.tools.memory`) and DeepSpeed engines'
optimizer-state bytes (:mod:`sm3_dist.tools.deepspeed_memory`)."""
