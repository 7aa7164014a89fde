"""SM3 against the slow per-element reference, the peer implementation, and bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pytorch_optimizer import SM3 as PeerSM3

from sm3_dist import MOMENTUM_KEY, SM3, accumulator_key, functional, local_state_bytes
from sm3_dist.kernels.rule import UpdateRule
from tests.common import KERNELS, seeded_grads
from tests.reference import ReferenceSM3

SHAPES = [(), (7,), (5, 6), (3, 4, 5), (2, 3, 4, 3)]
HYPER = [
    dict(),
    dict(momentum=0.9),
    dict(beta=0.9),
    dict(momentum=0.5, beta=0.5),
    dict(weight_decay=0.01),
    dict(eps=0.0),
    dict(maximize=True, momentum=0.9),
    dict(beta=0.9, bias_correction=True),
    dict(momentum=0.9, beta=0.99, bias_correction=True, weight_decay=0.01),
    dict(update_clip=0.5),
    dict(eps=0.0, update_clip=0.5, maximize=True),
    dict(momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0),
]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "defaults")
def test_matches_reference(kernel, hyper):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    ref = ReferenceSM3(params, lr=0.05, **hyper)
    opt = SM3(params, lr=0.05, **hyper, **KERNELS[kernel])
    for step in range(8):
        grads = seeded_grads(SHAPES, step, zero_slice=hyper.get("eps") == 0.0)  # nu == 0: 0/0 = 0 with eps = 0
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    for k, (p, r) in enumerate(zip(params, ref.params)):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
        ndim = max(p.dim(), 1)
        ours = [opt.state[p][accumulator_key(d)].double() for d in range(ndim)]
        for a, b in zip(ours, ref.accumulators(k)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hyper", [h for h in HYPER if h.get("update_clip")], ids=str)
def test_the_clip_binds_in_the_reference_rows(hyper):
    """The clip rows of ``HYPER`` clip some coordinates (a kernel ignoring ``update_clip`` fails them)."""
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    runs = [ReferenceSM3(params, lr=0.05, **{**hyper, "update_clip": c}) for c in (hyper["update_clip"], 0.0)]
    for step in range(8):
        grads = seeded_grads(SHAPES, step, zero_slice=hyper.get("eps") == 0.0)
        for ref in runs:
            ref.step(grads)
    assert any(not torch.equal(p, q) for p, q in zip(runs[0].params, runs[1].params))


def test_sparse_embedding_matches_reference():
    torch.manual_seed(0)
    for momentum in (0.0, 0.9):
        emb = torch.nn.Embedding(12, 5, sparse=True)
        ref = ReferenceSM3([emb.weight], lr=0.1, momentum=momentum)
        opt = SM3(emb.parameters(), lr=0.1, momentum=momentum)
        for step in range(6):
            idx = torch.randint(0, 12, (7,), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            grad = emb.weight.grad.coalesce()
            assert grad.is_sparse
            dense = grad.to_dense()
            ref.step([dense], touched_rows=[set(grad.indices()[0].tolist())])
            opt.step()
        torch.testing.assert_close(emb.weight.detach().double(), ref.params[0], rtol=1e-5, atol=1e-6)
        for a, b in zip([opt.state[emb.weight][accumulator_key(d)] for d in range(2)], ref.accumulators(0)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_sparse_equals_dense_with_zero_rows_without_momentum():
    """With beta = 0 and no momentum, untouched rows behave as if their gradient were zero."""
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(10, 4, sparse=True)
    dense = copy.deepcopy(sparse)
    dense.sparse = False
    a, b = SM3(sparse.parameters(), lr=0.1), SM3(dense.parameters(), lr=0.1, foreach=False)
    for step in range(5):
        idx = torch.tensor([step % 10, (3 * step + 1) % 10])
        for m, o in ((sparse, a), (dense, b)):
            o.zero_grad()
            m(idx).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_peer_where_rules_coincide(momentum):
    """pytorch-optimizer's SM3 uses the same dense rule (beta = 0, eps = 1e-30); momentum via lerp."""
    torch.manual_seed(0)
    shapes = [(6, 5), (4, 3, 2), (9,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a, b = SM3(ours, lr=0.1, momentum=momentum), PeerSM3(theirs, lr=0.1, momentum=momentum)
    for step in range(10):
        for p, q, g in zip(ours, theirs, seeded_grads(shapes, step)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_agree(kernel):
    torch.manual_seed(0)
    shapes = [(33, 17), (5, 4, 3), (40,)]
    base = [torch.randn(s) for s in shapes]
    results = {}
    for name in ("eager", kernel):
        params = [b.clone().requires_grad_() for b in base]
        opt = SM3(params, lr=0.1, momentum=0.9, beta=0.5, **KERNELS[name])
        for step in range(5):
            for p, g in zip(params, seeded_grads(shapes, step)):
                p.grad = g
            opt.step()
        results[name] = params
    for p, q in zip(results["eager"], results[kernel]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(dtype):
    torch.manual_seed(0)
    w32 = torch.randn(8, 6)
    p = w32.to(dtype).requires_grad_()
    opt = SM3([p], lr=0.01, momentum=0.9)
    ref = ReferenceSM3([p.detach().float()], lr=0.01, momentum=0.9)
    for step in range(4):
        g = seeded_grads([(8, 6)], step)[0]
        p.grad = g.to(dtype)
        opt.step()
        ref.step([g.to(dtype).float()])
    assert p.dtype == dtype
    state = opt.state[p]
    assert state[MOMENTUM_KEY].dtype == torch.float32
    assert all(state[accumulator_key(d)].dtype == torch.float32 for d in range(2))
    torch.testing.assert_close(p.float().double(), ref.params[0], rtol=2e-2, atol=2e-2)


def test_state_is_sum_of_dims_without_momentum():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    conv = torch.nn.Conv2d(3, 8, kernel_size=(3, 5))
    params = [*model.parameters(), *conv.parameters()]
    opt = SM3(params, lr=0.1, momentum=0.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    expected = sum(sum(p.shape) if p.dim() >= 2 else p.numel() for p in params) * 4
    assert local_state_bytes(opt) == expected
    assert all(MOMENTUM_KEY not in opt.state[p] for p in params)
    # and the state is far below Adagrad's numel-sized state
    assert expected < sum(p.numel() for p in params) * 4 / 5


def test_state_with_momentum_adds_numel():
    params = [torch.randn(10, 20, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = SM3(params, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert local_state_bytes(opt) == 4 * ((10 + 20) + 7 + 200 + 7)


def test_bf16_momentum_is_two_bytes_per_parameter():
    params = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    opt = SM3(params, momentum=0.9, momentum_dtype=torch.bfloat16)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[params[0]][MOMENTUM_KEY].dtype == torch.bfloat16
    assert local_state_bytes(opt) == 2 * (64 * 32 + 32) + 4 * ((64 + 32) + 32)


def test_convergence_beats_constant_lr_sgd():
    """A badly scaled regression: SM3's per-row/column adaptivity reaches a loss SGD does not."""
    torch.manual_seed(0)
    x = torch.randn(256, 20) * torch.logspace(-2, 1, 20)
    true_w = torch.randn(20, 5)
    y = x @ true_w

    def train(make):
        torch.manual_seed(1)
        model = torch.nn.Linear(20, 5)
        opt = make(model.parameters())
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        return torch.nn.functional.mse_loss(model(x), y).item()

    sm3_loss = train(lambda p: SM3(p, lr=0.3, momentum=0.9))
    # the best constant learning rate SGD has, among rates up to where it diverges
    sgd_losses = [train(lambda p, lr=lr: torch.optim.SGD(p, lr=lr)) for lr in (0.005, 0.01, 0.02, 0.04, 0.08)]
    sgd_best = min(v for v in sgd_losses if math.isfinite(v))
    assert sm3_loss < 0.05, sm3_loss
    assert sgd_best > 0.05 and sgd_best > 5 * sm3_loss, (sgd_losses, sm3_loss)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    shapes = [(6, 4), (5,)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = SM3(params, lr=0.1, momentum=0.9, beta=0.3)

    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, seeded_grads(shapes, step)):
                p.grad = g
            opt.step()

    run(params, opt, range(3))
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    run(params, opt, range(3, 6))
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = SM3(resumed, lr=0.1, momentum=0.9, beta=0.3)
    opt2.load_state_dict(saved)
    run(resumed, opt2, range(3, 6))
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_load_keeps_fp32_accumulators_for_bf16_params():
    p = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = SM3([p], momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = SM3([p], momentum=0.9)
    opt2.load_state_dict(sd)
    assert opt2.state[p][accumulator_key(0)].dtype == torch.float32
    assert torch.equal(opt2.state[p][accumulator_key(0)], opt.state[p][accumulator_key(0)])


def test_closure_and_param_groups():
    a, b = torch.randn(3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = SM3([{"params": [a], "lr": 0.5}, {"params": [b], "momentum": 0.9}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (a.sum() - 1) ** 2 + (b.sum() + 1) ** 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert MOMENTUM_KEY in opt.state[b] and MOMENTUM_KEY not in opt.state[a]


def test_none_grad_leaves_parameter_and_state_alone():
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    opt = SM3([a, b], momentum=0.9)
    a.grad = torch.randn_like(a)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b, before)
    assert not opt.state.get(b)  # state is made lazily, as torch.optim makes it: none for a parameter never stepped
    b.grad = torch.randn_like(b)
    opt.step()
    assert opt.state[b]["step"].item() == 1.0 and opt.state[a]["step"].item() == 2.0


HYPER_DEFAULTS = dict(rule=UpdateRule(), lr=0.1)

BAD_INPUTS = [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(foreach=True, fused=True), ValueError, "foreach"),
    (dict(momentum_dtype=torch.float16), ValueError, "momentum_dtype"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_INPUTS, ids=[str(b[0]) for b in BAD_INPUTS])
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        SM3([torch.randn(2, 2, requires_grad=True)], **kwargs)


def test_complex_parameters_rejected():
    with pytest.raises(TypeError, match="complex"):
        SM3([torch.randn(2, 2, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "defaults")
def test_float64_parameters_keep_float64_state_and_match_the_reference(hyper):
    torch.manual_seed(0)
    base = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    ref = ReferenceSM3(base, lr=0.05, **hyper)
    runs = {}
    for kernel in ("eager", "foreach"):
        params = [b.clone().requires_grad_() for b in base]
        opt = SM3(params, lr=0.05, **hyper, **KERNELS[kernel])
        for step in range(4):
            for p, g in zip(params, seeded_grads(SHAPES, step)):
                p.grad = g.double()
            opt.step()
        runs[kernel] = (params, opt)
    for step in range(4):
        ref.step([g.double() for g in seeded_grads(SHAPES, step)])
    (eager, opt), (foreach, _) = runs["eager"], runs["foreach"]
    for k, (p, q, r) in enumerate(zip(eager, foreach, ref.params)):
        assert p.dtype == torch.float64 and torch.equal(p, q)
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-13)  # fp64 arithmetic, not fp32
        state = opt.state[p]
        for d, acc in enumerate(ref.accumulators(k)):
            assert state[accumulator_key(d)].dtype == torch.float64
            torch.testing.assert_close(state[accumulator_key(d)], acc, rtol=1e-12, atol=1e-13)
        if MOMENTUM_KEY in state:
            assert state[MOMENTUM_KEY].dtype == torch.float64


def test_float64_parameters_refused_by_the_fused_kernel_with_reason():
    p = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    opt = SM3([p], fused=True)
    p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match=r"fused SM3 kernel for cpu takes .*not torch.float64.*foreach=True"):
        opt.step()
    assert SM3([p]).param_groups[0]["fused"] is None  # the default kernel choice takes them (per tensor)


def test_gradient_of_wrong_shape_rejected():
    p = torch.randn(3, 4, requires_grad=True)
    opt = SM3([p])
    p.grad = torch.zeros_like(p)
    p.grad.data = torch.randn(4, 3)  # what a framework writing .data can leave behind
    with pytest.raises(ValueError, match=r"gradient of shape \(4, 3\)"):
        opt.step()
    with pytest.raises(ValueError, match="grads\\[0\\] has shape"):
        functional.sm3([p.detach()], [torch.randn(4, 3)], [None], [[torch.zeros(3), torch.zeros(4)]], **HYPER_DEFAULTS)


def test_state_from_another_model_rejected():
    p = torch.randn(3, 4, requires_grad=True)
    opt = SM3([p], momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    q = torch.randn(5, 4, requires_grad=True)
    opt2 = SM3([q], momentum=0.9)
    with pytest.raises(ValueError, match="another model"):  # checked when it is loaded
        opt2.load_state_dict(opt.state_dict())


def test_checkpoint_with_other_momentum_dtype_rejected():
    p = torch.randn(3, 4, requires_grad=True)
    opt = SM3([p], momentum=0.9, momentum_dtype=torch.bfloat16)
    p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match="momentum_dtype"):
        SM3([p], momentum=0.9).load_state_dict(opt.state_dict())


def test_lr_as_tensor_and_schedulers():
    p = torch.randn(4, 4, requires_grad=True)
    opt = SM3([p], lr=torch.tensor(0.1), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert math.isclose(float(opt.param_groups[0]["lr"]), 0.1 / 4, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_skips_step_bitwise(bad):
    torch.manual_seed(0)
    params = [torch.randn(4, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = SM3(params, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    params[0].grad = torch.randn_like(params[0])
    params[0].grad[2, 3] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for k, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(value, state_before[k][key]), key
    for p in params:  # training continues
        p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert opt.state_dict()["param_groups"][0]["skipped_steps"] == 1


def test_nonfinite_raise_names_parameter():
    params = [torch.randn(2, 2, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    opt = SM3(params, nonfinite="raise")
    params[0].grad = torch.zeros(2, 2)
    params[1].grad = torch.full((4, 3), float("nan"))
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(4, 3\)\)"):
        opt.step()


def test_nonfinite_ignore_lets_nan_through():
    p = torch.randn(2, 2, requires_grad=True)
    opt = SM3([p], nonfinite="ignore")
    p.grad = torch.full((2, 2), float("inf"))
    opt.step()
    assert not torch.isfinite(p).all()


def test_bad_nonfinite_policy():
    with pytest.raises(ValueError, match="nonfinite"):
        SM3([torch.zeros(1, requires_grad=True)], nonfinite="zero")


def test_load_state_dict_copies_so_training_leaves_the_source_alone():
    p = torch.randn(3, 2, requires_grad=True)
    opt = SM3([p], momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    source = copy.deepcopy(saved)
    opt.load_state_dict(source)
    p.grad = torch.randn_like(p)
    opt.step()
    for key, value in source["state"][0].items():
        assert torch.equal(value, saved["state"][0][key]), key
