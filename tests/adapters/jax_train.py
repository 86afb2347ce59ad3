"""Subprocess script for the exact-resume test: train tiny flax models with adamw and dropout.

Two models train side by side, one train state per flax API, so one process proves both:

- ``linen``: the documented train-state recipe, ``{"params", "opt_state", "step", "key"}``,
  with the dropout key split from ``key`` every step (the PRNG key threads through the state);
- ``nnx``: an ``nnx.Module`` (a bfloat16 layer, ``nnx.Dropout`` drawing from ``nnx.Rngs``) and
  its ``nnx.Optimizer``, saved as ``nnx.state(...)`` and put back with ``nnx.update``.

Usage: ``python jax_train.py first DIR STEPS`` trains STEPS steps into ``DIR/reference``, then,
from scratch again, STEPS/2 steps saved by a ``CheckpointManager`` in ``DIR/run`` (step_end,
every_n_steps); ``python jax_train.py resume DIR STEPS`` restores ``DIR/run`` (into templates
built from *other* seeds, so nothing leaks from initialization), trains to STEPS and saves the
result into ``DIR/resumed``. Prints one JSON line describing what it did.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import checkpointer
from checkpointer.adapters import jax as cj


class LinenMLP(nn.Module):
    """Dense -> dropout -> dense."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(1)(x)


class NnxMLP(nnx.Module):
    """The same network in nnx, the first layer's parameters in bfloat16."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(4, 16, param_dtype=jnp.bfloat16, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(self.drop(nnx.relu(self.l1(x).astype(jnp.float32))))


def make_tx(total: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, total)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-3))


def batch(step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A deterministic batch per step, so both runs see the same data."""
    x = jax.random.normal(jax.random.fold_in(jax.random.key(99), step), (8, 4))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


def init(seed: int, total: int) -> tuple[dict[str, Any], LinenMLP, NnxMLP, nnx.Optimizer]:
    """The linen train state and module, the nnx model and its optimizer."""
    tx = make_tx(total)
    linen = LinenMLP()
    params = linen.init(jax.random.key(seed), jnp.zeros((1, 4)), train=False)["params"]
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": 0,
        "key": jax.random.key(seed + 1),
    }
    model = NnxMLP(nnx.Rngs(params=seed, dropout=seed + 2))
    return state, linen, model, nnx.Optimizer(model, make_tx(total), wrt=nnx.Param)


def make_steps(linen: LinenMLP, total: int) -> tuple[Any, Any]:
    tx = make_tx(total)

    @jax.jit
    def linen_step(state: dict[str, Any]) -> dict[str, Any]:
        key, dropout_key = jax.random.split(state["key"])
        x, y = batch(state["step"])

        def loss(p: Any) -> jax.Array:
            pred = linen.apply({"params": p}, x, train=True, rngs={"dropout": dropout_key})
            return jnp.mean((pred - y) ** 2)

        grads = jax.grad(loss)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "key": key}

    @nnx.jit
    def nnx_step(model: NnxMLP, opt: nnx.Optimizer, step: jax.Array) -> None:
        x, y = batch(step)
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)

    return linen_step, nnx_step


def snapshot(linen_state: dict[str, Any], model: NnxMLP, opt: nnx.Optimizer) -> dict[str, Any]:
    """The whole training state as one pytree."""
    return {"linen": linen_state, "nnx": {"model": nnx.state(model), "opt": nnx.state(opt)}}


def train(
    state: dict[str, Any],
    model: NnxMLP,
    opt: nnx.Optimizer,
    steps: Any,
    until: int,
    mgr: checkpointer.CheckpointManager | None,
) -> dict[str, Any]:
    linen_step, nnx_step = steps
    while state["step"] < until:
        nnx_step(model, opt, jnp.asarray(state["step"]))
        state = linen_step(state)
        state["step"] = int(state["step"])  # keep the step a Python int, as users do
        if mgr is not None:
            saved = mgr.step_end(
                state["step"], lambda s=state: cj.to_state(snapshot(s, model, opt))
            )
            if saved is not None:
                print(f"saved {saved.name} at step {saved.step}", file=sys.stderr)
    return state


def manager(directory: str, total: int) -> checkpointer.CheckpointManager:
    return checkpointer.CheckpointManager(
        f"{directory}/run", every_n_epochs=None, every_n_steps=max(total // 4, 1), keep_last=2
    )


def main(mode: str, directory: str, total: int) -> dict[str, Any]:
    if mode == "first":
        state, linen, model, opt = init(0, total)
        steps = make_steps(linen, total)
        state = train(state, model, opt, steps, total, None)
        cj.save(f"{directory}/reference", snapshot(state, model, opt))
        state, linen, model, opt = init(0, total)
        with manager(directory, total) as mgr:
            train(state, model, opt, steps, total // 2, mgr)
            return {"mode": mode, "saved": [c.step for c in mgr.checkpoints]}
    template, linen, model, opt = init(123, total)  # other seeds: values must come from storage
    with manager(directory, total) as mgr:
        ckpt = cj.restore(mgr, snapshot(template, model, opt))
        restored = ckpt.state
        nnx.update(model, restored["nnx"]["model"])
        nnx.update(opt, restored["nnx"]["opt"])
        state = train(restored["linen"], model, opt, make_steps(linen, total), total, mgr)
        cj.save(f"{directory}/resumed", snapshot(state, model, opt))
        return {
            "mode": mode,
            "restored_step": ckpt.info.step,
            "saved": [c.step for c in mgr.checkpoints],
        }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
