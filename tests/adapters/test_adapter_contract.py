"""The adapter contract (``contract_lib.CHECKS``) for the torch and JAX adapters in-process;
Keras runs the same checks in each backend's subprocess (``keras_cases_contract.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from contract_lib import CHECKS, Case, in_place

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from checkpointer.adapters import jax as cj  # noqa: E402
from checkpointer.adapters import torch as ct  # noqa: E402


def _torch_make(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {"model": model, "optim": opt}


def _torch_values(objs: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {f"model/{k}": v.detach().numpy().copy() for k, v in objs["model"].state_dict().items()}
    for i, entry in objs["optim"].state_dict()["state"].items():
        out.update({f"optim/{i}/{k}": v.numpy().copy() for k, v in entry.items()})
    return out


def _jax_make(seed: int) -> dict[str, Any]:
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(k1, (3, 2)), "b": jax.random.normal(k2, (2,), jnp.bfloat16)}
    return {"params": params, "step": seed}


def _jax_values(tree: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree["params"].items()}


CASES = [
    Case(
        name="torch",
        make=_torch_make,
        to_state=ct.to_state,
        save=ct.save,
        **in_place(ct.load_state, ct.load),
        values=_torch_values,
        leaves=("model",),
        unsupported=lambda objs: (
            {**objs, "loader": torch.utils.data.DataLoader([1, 2])},
            r"state\['loader'\]: torch.utils.data.dataloader.DataLoader is not a state leaf",
        ),
    ),
    Case(
        name="jax",
        make=_jax_make,
        to_state=cj.to_state,
        load_state=lambda tree, state, strict: cj.from_state(tree, state, strict=strict),
        save=cj.save,
        load=cj.load,
        values=_jax_values,
        leaves=("params",),
        unsupported=lambda tree: (
            {**tree, "loader": object()},
            r"state\['loader'\]: builtins.object is neither an array",
        ),
    ),
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_contract(case: Case, check: Any, tmp_path: Path) -> None:
    check(case, tmp_path)


def test_lightning_reexports_the_torch_verbs() -> None:
    lightning = pytest.importorskip("checkpointer.adapters.lightning")
    for verb in ("to_state", "load_state", "save", "load"):
        assert getattr(lightning, verb) is getattr(ct, verb)
