"""SM3 described for PyTorch's generic optimizer tests: an ``OptimizerInfo`` and its inputs.

``torch.testing._internal.common_optimizers`` ships with torch and describes every
``torch.optim`` optimizer as an :class:`OptimizerInfo` (the configurations to run,
the bad inputs and the errors they raise, the kernels it offers); PyTorch's own
suite (``test/test_optim.py`` in the PyTorch repository) runs its generic tests
over those. This module describes :class:`sm3_dist.SM3` the same way, for
``tests/test_optim_contract.py``.

Importing ``torch.testing._internal.common_utils`` freezes ``torch.backends`` flags
for the whole process; the import below gives that setting back, so that other
test modules in the same worker are not affected.
"""

from __future__ import annotations

import torch

_FLAGS_FROZEN = torch.backends.flags_frozen()

from torch.nn import Parameter  # noqa: E402
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR  # noqa: E402
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

from sm3_dist import SM3, functional  # noqa: E402
from sm3_dist.kernels.cpu.library import _compiler  # noqa: E402

if not _FLAGS_FROZEN:
    setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)

__all__ = ["SM3_INFO", "sm3_error_inputs", "sm3_optim_inputs"]


def sm3_optim_inputs(device: str | torch.device, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    """SM3's realistic configurations (without the kernel flags, which each test sets itself).

    Made fresh on each call: a tensor lr is mutable state that a scheduler may change.
    """
    inputs = [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"momentum": 0.9}, desc="momentum"),
        OptimizerInput(params=None, kwargs={"beta": 0.9}, desc="beta"),
        OptimizerInput(params=None, kwargs={"beta": 0.9, "ema_keeps_max": True}, desc="ema_keeps_max"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(params=None, kwargs={"maximize": True, "momentum": 0.9, "weight_decay": 0.1}, desc="maximize"),
        OptimizerInput(params=None, kwargs={"momentum": 0.9, "momentum_dtype": torch.bfloat16}, desc="bf16_momentum"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.05), "momentum": 0.5}, desc="tensor_lr"),
        OptimizerInput(params=None, kwargs={"eps": 0.0}, desc="eps0"),
        OptimizerInput(params=None, kwargs={"nonfinite": "ignore"}, desc="nonfinite_ignore"),
        OptimizerInput(
            params=None, kwargs={"beta": 0.9, "momentum": 0.9, "bias_correction": True}, desc="bias_correction"
        ),
        OptimizerInput(
            params=None,
            kwargs={"beta": 0.9, "momentum": 0.9, "bias_correction": True, "update_clip": 0.5},
            desc="update_clip",
        ),
    ]
    if torch.device(device).type == "cuda":
        inputs += [
            OptimizerInput(params=None, kwargs={"capturable": True, "momentum": 0.9}, desc="capturable"),
            OptimizerInput(
                params=None, kwargs={"capturable": True, "lr": torch.tensor(0.05)}, desc="capturable_tensor_lr"
            ),
        ]
    return inputs


def _param(device, dtype=torch.float32, shape=(2, 2)) -> Parameter:
    return Parameter(torch.randn(shape, device=device, dtype=dtype))


def _with_grad(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    p.grad = grad
    return p


def sm3_error_inputs(device: str | torch.device, dtype: torch.dtype = torch.float32) -> list[ErrorOptimizerInput]:
    """Bad inputs, the error each raises (type and message), and whether at construction or at the step."""
    errors = list(get_error_inputs_for_all_optims(device, dtype))

    def bad(kwargs, error_type, regex, desc, params=None):
        return ErrorOptimizerInput(
            OptimizerInput(params=params, kwargs=kwargs, desc=desc), error_type=error_type, error_regex=regex
        )

    def at_step(params, kwargs, error_type, regex, desc):
        return ErrorOptimizerInput(
            OptimizerInput(params=params, kwargs=kwargs, desc=desc),
            error_on=OptimizerErrorEnum.STEP_ERROR,
            error_type=error_type,
            error_regex=regex,
        )

    # what the step checks runs on the device (on accelerators, the non-finite check is a device flag)
    errors.append(
        at_step(
            [_with_grad(_param(device), torch.tensor([[1.0, float("nan")], [0.0, 0.0]], device=device))],
            dict(nonfinite="raise"),
            FloatingPointError,
            r"non-finite gradient in param_groups\[0\]\['params'\]\[0\]",
            "nan gradient under nonfinite='raise'",
        )
    )
    if torch.device(device).type != "cpu":
        return errors  # the constructor's checks do not depend on the device; they run once, on CPU
    p = [_param(device, dtype)]
    errors += [
        bad(dict(lr=-0.1), ValueError, r"Invalid lr: -0\.1", "negative lr", p),
        bad(dict(lr=float("nan")), ValueError, r"Invalid lr: nan", "nan lr", p),
        bad(dict(lr=torch.tensor([[0.1, 0.2]])), ValueError, r"Tensor lr must be 1-element", "2-element lr", p),
        bad(dict(lr=torch.tensor(1)), ValueError, r"Tensor lr must be a real floating-point", "integer lr", p),
        bad(dict(lr=torch.tensor(-1.0)), ValueError, r"Invalid lr: -1\.0", "negative tensor lr", p),
        bad(dict(momentum=1.0), ValueError, r"Invalid momentum: 1\.0", "momentum 1", p),
        bad(dict(momentum=-0.1), ValueError, r"Invalid momentum: -0\.1", "negative momentum", p),
        bad(dict(momentum=torch.tensor(0.9)), ValueError, r"only lr may be a tensor", "tensor momentum", p),
        bad(dict(beta=1.5), ValueError, r"Invalid beta: 1\.5", "beta above 1", p),
        bad(dict(beta=1.0), ValueError, r"Invalid beta: 1\.0", "beta 1", p),
        bad(dict(eps=-1e-8), ValueError, r"Invalid eps: -1e-08", "negative eps", p),
        bad(dict(weight_decay=-1.0), ValueError, r"Invalid weight_decay: -1\.0", "negative weight_decay", p),
        bad(dict(foreach=True, fused=True), ValueError, r"foreach and fused cannot both be True", "two kernels", p),
        bad(dict(nonfinite="warn"), ValueError, r"nonfinite must be one of", "unknown nonfinite policy", p),
        bad(dict(momentum_dtype=torch.float16), ValueError, r"momentum_dtype must be", "fp16 momentum", p),
        bad(
            {},
            TypeError,
            r"SM3 does not support complex parameters",
            "complex parameter",
            [Parameter(torch.randn(2, 2, dtype=torch.complex64))],
        ),
        bad(
            {},
            TypeError,
            r"SM3 does not support torch\.int64",
            "integer parameter",
            [torch.ones(2, 2, dtype=torch.int64)],
        ),
    ]
    return errors


SM3_INFO = OptimizerInfo(
    SM3,
    optim_inputs_func=sm3_optim_inputs,
    optim_error_inputs_func=sm3_error_inputs,
    scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10)], [lambda opt: ReduceLROnPlateau(opt)]),
    supported_impls=("foreach", "fused"),
    not_og_supported_flags=("foreach", "fused", "maximize", "capturable", "bias_correction"),
    supports_sparse=True,
    has_capturable_arg=True,
    supports_complex=False,
    # CPU wherever a C++ compiler can build the native kernel (a failed build must fail the fused rows, not drop them)
    supports_fused_on=("cpu",) * (_compiler() is not None or functional.fused_kernel("cpu") is not None)
    + ("cuda",) * (functional.fused_kernel("cuda") is not None),
)
"""SM3 as PyTorch's generic optimizer tests see it.

``supports_complex=False``: SM3's accumulators are maxima of squared magnitudes over slices, which
has no complex analogue that the original rule defines; complex parameters are refused at
construction with a clear error (tested). ``differentiable`` is not offered.
"""
