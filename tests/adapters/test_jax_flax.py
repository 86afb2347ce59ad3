"""flax (nnx, linen, TrainState) and optax states through the core: manager, save, load."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
flax = pytest.importorskip("flax")

import checkpointer  # noqa: E402
from checkpointer.adapters import jax as cj  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # works whether or not tests/ is a package
from jax_testlib import JAX_DTYPES, leaves_equal, sample  # noqa: E402


class Net(nnx.Module):
    """bf16 linear, batch norm (batch stats), dropout (Rngs) and a f32 head."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(3, 8, param_dtype=jnp.bfloat16, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(self.drop(self.bn(self.l1(x).astype(jnp.float32))))


def tx() -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 20)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-2))


def trained_nnx(seed: int) -> tuple[Net, nnx.Optimizer]:
    model = Net(nnx.Rngs(params=seed, dropout=seed + 1))
    opt = nnx.Optimizer(model, tx(), wrt=nnx.Param)
    _train_step(model, opt, jnp.ones((4, 3)))
    return model, opt


@nnx.jit
def _forward(model: Net, x: jax.Array) -> jax.Array:
    return model(x)


@nnx.jit
def _train_step(model: Net, opt: nnx.Optimizer, x: jax.Array) -> None:
    opt.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))


def test_nnx_model_and_optimizer_round_trip_through_the_manager(tmp_path: Path) -> None:
    model, opt = trained_nnx(0)
    with checkpointer.CheckpointManager(tmp_path, every_n_epochs=None, every_n_steps=2) as mgr:
        assert (
            mgr.step_end(1, lambda: cj.to_state({"m": nnx.state(model), "o": nnx.state(opt)}))
            is None
        )
        info = mgr.step_end(2, lambda: cj.to_state({"m": nnx.state(model), "o": nnx.state(opt)}))
        assert info is not None and info.step == 2
    fresh, fresh_opt = trained_nnx(5)
    template = {"m": nnx.state(fresh), "o": nnx.state(fresh_opt)}
    assert not leaves_equal(template["m"], nnx.state(model))
    ckpt = cj.restore(checkpointer.CheckpointManager(tmp_path), template)
    assert isinstance(ckpt.state["m"], nnx.State) and ckpt.info.step == 2
    nnx.update(fresh, ckpt.state["m"])
    nnx.update(fresh_opt, ckpt.state["o"])
    assert leaves_equal(nnx.state(fresh), nnx.state(model))  # structure, dtypes, bytes
    assert leaves_equal(nnx.state(fresh_opt), nnx.state(opt))
    assert fresh.l1.kernel.dtype == jnp.bfloat16
    # The restored dropout stream continues where the saved one was: same masks, same outputs.
    assert jax.random.key_impl(fresh.drop.rngs.key[...]) == "threefry2x32"
    x = jnp.ones((4, 3))
    np.testing.assert_array_equal(_forward(fresh, x), _forward(model, x))


def test_nnx_restore_into_an_abstract_model(tmp_path: Path) -> None:
    model, _ = trained_nnx(0)
    cj.save(tmp_path / "ckpt", nnx.state(model))
    abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(params=0, dropout=1)))
    graphdef, abstract_state = nnx.split(abstract)
    restored = nnx.merge(graphdef, cj.load(tmp_path / "ckpt", abstract_state))
    assert leaves_equal(nnx.state(restored), nnx.state(model))


def test_linen_params_and_optax_chain_through_save_and_load(tmp_path: Path) -> None:
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.Dense(1, param_dtype=jnp.bfloat16)(nn.relu(nn.Dense(4)(x)))

    params = MLP().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    opt_state = tx().init(params)
    state = {"params": params, "opt_state": opt_state, "step": 7, "key": jax.random.key(3)}
    state["frozen"] = flax.core.freeze(params)  # older flax hands out FrozenDicts
    cj.save(tmp_path / "ckpt", state, metadata={"note": "linen"})
    back = cj.load(tmp_path / "ckpt", state)
    assert leaves_equal(back, state)
    assert type(back["opt_state"][1][0]).__name__ == "ScaleByAdamState"
    assert back["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16
    assert isinstance(back["frozen"], flax.core.FrozenDict)
    plain = cj.load(tmp_path / "ckpt")  # no template: plain containers, jax arrays, typed key
    assert isinstance(plain["opt_state"][1][0], dict) and isinstance(plain["step"], int)
    assert jax.dtypes.issubdtype(plain["key"].dtype, jax.dtypes.prng_key)


def test_flax_train_state_round_trip(tmp_path: Path) -> None:
    from flax.training import train_state

    params = {"w": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.zeros(2)}
    ts = train_state.TrainState.create(apply_fn=lambda p, x: x, params=params, tx=tx())
    ts = jax.jit(lambda t, g: t.apply_gradients(grads=g))(ts, params)  # one compile, not many
    cj.save(tmp_path / "ts", ts)
    template = jax.tree_util.tree_map(jnp.zeros_like, ts)
    back = cj.load(tmp_path / "ts", template)
    assert isinstance(back, train_state.TrainState) and back.step == 1
    assert leaves_equal(back, ts)


def test_every_dtype_through_storage(tmp_path: Path) -> None:
    tree = {name: sample(name) for name in JAX_DTYPES}
    tree["keys"] = jax.random.split(jax.random.key(0, impl="rbg"), 2)
    cj.save(tmp_path / "dtypes", tree)
    assert leaves_equal(cj.load(tmp_path / "dtypes", tree), tree)


def test_async_save_captures_values_at_call_time(tmp_path: Path) -> None:
    x = jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256)
    y = jax.jit(lambda a: a @ a / 1e6)(x)  # still being computed when the save is called
    expected = np.array(jax.jit(lambda a: a @ a / 1e6)(x))
    with checkpointer.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(cj.to_state({"y": y}), step=1)
        jax.jit(lambda a: a * 0.0, donate_argnums=0)(y)
        mgr.wait()
    state = checkpointer.CheckpointManager(tmp_path).restore().state
    np.testing.assert_array_equal(state["y"], expected)


def test_orbax_style_options_in_readme(tmp_path: Path) -> None:
    params = {"w": jnp.zeros(3)}
    mgr = checkpointer.CheckpointManager(
        tmp_path, every_n_epochs=None, every_n_steps=2, keep_last=2,
        monitor="loss", mode="min", keep_best=1,
    )  # fmt: skip
    losses = {2: 0.5, 4: 0.1, 6: 0.9, 8: 0.8}
    for step in range(1, 9):
        params = {"w": params["w"] + 1}
        mgr.step_end(step, lambda p=params: cj.to_state(p), metrics={"loss": losses.get(step, 9.0)})
    mgr.close()
    assert [c.step for c in mgr.checkpoints] == [4, 6, 8] and mgr.best.step == 4
    best = cj.restore(mgr, {"w": jnp.zeros(3)}, "best").state
    np.testing.assert_array_equal(best["w"], [4, 4, 4])
    assert cj.from_state(None, mgr.restore(6).state)["w"].dtype == jnp.float32
