"""Subprocess tests: exact resume in fresh processes, loading without JAX, multi-device sharding.

``jax_train.py first`` trains a reference run to N steps and, from scratch again, N/2 steps
saved by a CheckpointManager (step_end, every_n_steps); ``jax_train.py resume`` restores in a
fresh process and trains to N. ``jax_load_nojax.py`` then loads both with ``checkpointer.load``
in a process that never imports JAX; the two runs must agree bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

HERE = Path(__file__).parent
STEPS = 8


def run(script: str, *args: str, **extra_env: str) -> dict[str, Any]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **extra_env}
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("jax_resume")
    first = run("jax_train.py", "first", str(root), str(STEPS))
    resumed = run("jax_train.py", "resume", str(root), str(STEPS))
    urls = [str(root / "reference"), str(root / "resumed"), str(root / "run" / "step-000000004")]
    return {
        "first": first,
        "resume": resumed,
        "load": run("jax_load_nojax.py", *urls),
        "urls": urls,
    }


def test_resume_in_a_fresh_process_is_bit_exact(runs: dict[str, Any]) -> None:
    assert runs["first"]["saved"] == [STEPS // 4, STEPS // 2]
    assert runs["resume"]["restored_step"] == STEPS // 2
    reference, resumed, midway = (runs["load"]["leaves"][url] for url in runs["urls"])
    assert len(reference) > 30
    assert resumed == reference  # paths, types, dtypes, shapes and bytes of every leaf
    # The comparison is not vacuous: training went on after the checkpoint it resumed from.
    changed = {leaf[0] for leaf, old in zip(reference, midway, strict=True) if leaf != old}
    assert {
        "/linen/params/Dense_0/kernel",
        "/nnx/model/l1/kernel/value",
        "/linen/key/data",
        "/nnx/model/drop/rngs/count/value",
        "/nnx/opt/opt_state/1/0/nu/l2/bias/value",
    } <= changed


def test_jax_checkpoint_loads_without_jax(runs: dict[str, Any]) -> None:
    assert runs["load"]["jax_imported"] is False
    by_path = {leaf[0]: leaf for leaf in runs["load"]["leaves"][runs["urls"][0]]}
    assert by_path["/nnx/model/l1/kernel/value"][1:3] == ["ndarray", "bfloat16"]
    assert by_path["/nnx/opt/opt_state/1/0/mu/l1/kernel/value"][2] == "bfloat16"
    assert by_path["/linen/key/__jax_prng_key__"][1:] == ["str", None, None, "'threefry2x32'"]
    assert by_path["/linen/key/data"][2:4] == ["uint32", [2]]
    assert by_path["/linen/step"][1:] == ["int", None, None, str(STEPS)]


def test_from_state_places_arrays_on_the_template_sharding() -> None:
    flags = "--xla_force_host_platform_device_count=2"
    out = run("jax_sharding.py", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    assert out["devices"] == 2
    assert out["same_sharding"] == [True, True, True]
    assert out["abstract_sharding"] == [True, True, True]  # ShapeDtypeStruct(sharding=...) too
    assert out["w_shards"] == [[0, 1, 2, 3], [4, 5, 6, 7]] and out["values"] and out["key"]
