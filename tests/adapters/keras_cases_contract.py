"""The adapter contract (``contract_lib.CHECKS``) for the Keras adapter, run once per Keras
backend by ``test_keras.py`` (Keras picks its backend at import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from contract_lib import CHECKS, Case, in_place

from checkpointer.adapters import keras as ck


def _make(seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    # Fixed names: the variable paths, which key the state, match across models (a
    # non-strict load pairs by path).
    init = {"bias_initializer": "random_normal"}
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="d1", **init),
         keras.layers.Dense(2, name="d2", **init)], name="net"
    )  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(0.1, name="adam"), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _values(model: Any) -> dict[str, np.ndarray]:
    variables = [*model.weights, *model.optimizer.variables]
    return {str(i): np.array(keras.ops.convert_to_numpy(v.value), copy=True)
            for i, v in enumerate(variables)}  # fmt: skip


CASE = Case(
    name="keras",
    make=_make,
    to_state=ck.to_state,
    save=ck.save,
    **in_place(ck.load_state, ck.load),
    values=_values,
    leaves=("weights",),
    unsupported=lambda model: ({"model": model}, "builtins.dict is not a Keras model or layer"),
)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_contract(check: Any, tmp_path: Path) -> None:
    check(CASE, tmp_path)
