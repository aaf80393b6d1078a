"""SophiaG's launch plan (MaskedOptimizer._plan): built once, rebuilt exactly when what it holds changes, and
a step through it equals the op called on its own; bad input still named when a kernel refuses it."""
import pytest
import torch

from simu_fast import SophiaG
from simu_fast.ops import sophia_step
from simu_fast.ops.multi_tensor_checks import run_kernel
from simu_fast.ops.update_mask import full_mask


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (4, 3, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return params


def test_the_plan_is_built_once_and_rebuilt_when_its_parameters_or_masks_change():
    params = _params()
    opt = SophiaG(params, lr=1e-2)
    opt.step()
    plan = opt._plans[0][1]
    opt.step()
    assert opt._plans[0][1] is plan  # reused
    opt.set_mask(params[0], rows=torch.tensor([1, 4]))
    assert 0 not in opt._plans  # a mask invalidates it
    opt.step()
    plan = opt._plans[0][1]
    assert plan[0].masks[0].kind != full_mask(params[0]).kind
    params[1].grad = None  # fewer parameters with a gradient: another plan
    opt.step()
    assert opt._plans[0][1] is not plan and opt._plans[0][1][0].params == [params[0], params[2]]
    opt.load_state_dict(opt.state_dict())
    assert 0 not in opt._plans  # loaded state replaces the tensors the plan held


def test_a_step_through_the_plan_equals_the_op():
    params, reference = _params(1), _params(1)
    opt = SophiaG(params, lr=3e-2, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1, hessian="squared_grad")
    opt.set_mask(params[0], cols=torch.tensor([0, 3]))
    m = [torch.zeros_like(p) for p in reference]
    h = [torch.zeros_like(p) for p in reference]
    masks = [opt.mask_of(params[0])] + [full_mask(p) for p in reference[1:]]
    masks[0] = type(masks[0])(masks[0].kind, masks[0].row_len, masks[0].index.clone())
    for step in range(3):
        opt.step()
        with torch.no_grad():
            sophia_step(reference, [p.grad for p in reference], m, h, masks, lr=3e-2, beta1=0.9, rho=0.04, bs=5120,
                        weight_decay=0.1, hessian_beta2=0.95)
    for p, q in zip(params, reference):
        assert torch.equal(p.detach(), q.detach())
    assert all(int(opt.state[p]["step"]) == 3 for p in params)


def test_a_kernel_failure_reruns_the_checks_for_a_clear_error():
    def kernel(*args):
        raise RuntimeError("a kernel error")

    def failing_checks():
        raise ValueError("sophia_step: gradient of w has shape [3], parameter [4]")

    with pytest.raises(ValueError, match="gradient of w has shape"):
        run_kernel(kernel, (), failing_checks)
    with pytest.raises(RuntimeError, match="a kernel error"):
        run_kernel(kernel, (), lambda: None)  # the checks find nothing: the kernel's own error stands


def test_a_nonfinite_gradient_is_still_caught_through_the_plan():
    params = _params(2)
    opt = SophiaG(params, lr=1e-2)
    opt.step()
    before = [p.detach().clone() for p in params]
    params[2].grad[1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[2\]"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
