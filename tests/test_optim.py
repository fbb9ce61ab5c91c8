"""The training loop's optimizers step exactly as ``torch.optim``'s, share its checkpoint
layout, and keep ``torch._dynamo`` (about 2 s of CPU per training) out of a training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from deconflow.training import optim

HYPER = {"lr": 0.05, "weight_decay": 5e-4}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _pair(kind: str):
    ours, theirs = _model(), _model()
    if kind == "sgd":
        return (
            ours,
            optim.SGD(ours.parameters(), momentum=0.9, **HYPER),
            theirs,
            (torch.optim.SGD(theirs.parameters(), momentum=0.9, **HYPER)),
        )
    return (
        ours,
        optim.AdamW(ours.parameters(), betas=(0.9, 0.999), **HYPER),
        theirs,
        (torch.optim.AdamW(theirs.parameters(), betas=(0.9, 0.999), **HYPER)),
    )


def _steps(model: nn.Module, opt, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = HYPER["lr"] * (1 + i) / n  # the loop sets lr every step
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_steps_are_bit_identical_to_torch_optim(kind) -> None:
    ours, opt, theirs, ref = _pair(kind)
    _steps(ours, opt, 7, seed=1)
    _steps(theirs, ref, 7, seed=1)
    _assert_same_weights(ours, theirs)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_checkpoint_of_either_resumes_in_the_other(kind, tmp_path) -> None:
    """Checkpoints written before this optimizer (by torch.optim) resume bit-identically,
    through torch.save/torch.load as the checkpoints go; and the other way round."""
    ours, opt, theirs, ref = _pair(kind)
    _steps(ours, opt, 3, seed=2)
    _steps(theirs, ref, 3, seed=2)
    torch.save(ref.state_dict(), tmp_path / "theirs.pt")
    torch.save(opt.state_dict(), tmp_path / "ours.pt")

    resumed, resumed_opt, other, other_ref = _pair(kind)
    resumed.load_state_dict(theirs.state_dict())
    other.load_state_dict(ours.state_dict())
    resumed_opt.load_state_dict(torch.load(tmp_path / "theirs.pt", weights_only=True))
    other_ref.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True))
    assert opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]

    _steps(theirs, ref, 4, seed=3)
    _steps(resumed, resumed_opt, 4, seed=3)
    _steps(other, other_ref, 4, seed=3)
    _assert_same_weights(resumed, theirs)
    _assert_same_weights(other, theirs)


def test_a_state_of_another_model_is_refused() -> None:
    _, opt, _, _ = _pair("sgd")
    small = optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="another number of parameters"):
        small.load_state_dict(opt.state_dict())


def test_a_training_step_imports_no_dynamo_or_scipy() -> None:
    code = (
        "import sys, torch\n"
        "from deconflow.sweep import parse_key\n"
        "from deconflow.training.train import build_optimizer\n"
        "import deconflow.training.curve_plot, deconflow.training.run\n"
        "m, cell = torch.nn.Linear(3, 2), parse_key('base__lr0.1_wd0.0001_s0')\n"
        "for kind in ('sgd', 'adamw'):\n"
        "    opt = build_optimizer(cell, kind, list(m.parameters()))\n"
        "    m(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad(False)\n"
        "    opt.load_state_dict(opt.state_dict())\n"
        "print(sorted(n for n in ('torch._dynamo', 'scipy.signal', 'scipy.stats',"
        " 'matplotlib.pyplot') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
