"""The training job ``sm3-dist train`` and its launch configs, installed as ``sm3_dist.launch``.

``train`` (the entry script) -> ``config`` (command line, validation) -> ``launcher`` (processes,
``--compare``) -> ``loop`` (one rank) -> ``backends`` (one class per setup); beside them ``checkpoint``,
``metrics``, ``plot``, ``watchdog``, ``faults`` (test-only), ``data``, ``model``; ``accelerate/`` and
``deepspeed/`` hold the launchers' YAML and JSON configs. docs/architecture.md maps the rest of the tree.
"""
