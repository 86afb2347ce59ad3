"""One of two JAX processes (jax.distributed on 127.0.0.1, 2 CPU devices each).

  save DIR          an 8x6 array sharded 2x2 over the 4 global devices, saved twice
  restore DIR OUT   restored onto another sharding (rows over 4 devices); every process checks
                    its own shards and process 0 writes the whole array to OUT
  async DIR         the save of "save", three times with async_save=True (the writer threads
                    agree through the key-value store of jax.distributed), running jitted
                    cross-process computations while each save is in flight
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{os.environ['PORT']}", num_processes=2,
                           process_id=int(os.environ["PROC"]))

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer import CheckpointManager  # noqa: E402
from checkpointer.adapters.jax import from_state, to_state  # noqa: E402
from checkpointer.adapters.jax_distributed import template  # noqa: E402

mode, directory = sys.argv[1], sys.argv[2]
expected = np.arange(48, dtype=np.float32).reshape(8, 6) / 7


def make(sharding):
    return jax.make_array_from_callback(expected.shape, sharding, lambda idx: expected[idx])


devices = np.array(jax.devices())
if mode == "save":
    x = make(NamedSharding(Mesh(devices.reshape(2, 2), ("a", "b")), P("a", "b")))
    mgr = CheckpointManager(directory)
    assert type(mgr._coord).__name__ == "JaxCoordinator"
    mgr.save(to_state({"x": x, "step": 1}), step=1)
    mgr.save(to_state({"x": x, "step": 2}), step=2)
elif mode == "async":
    from checkpointer.distributed import KeyValueCoordinator  # noqa: E402

    sharding = NamedSharding(Mesh(devices.reshape(2, 2), ("a", "b")), P("a", "b"))
    mgr = CheckpointManager(directory, async_save=True, keep_last=2)
    assert isinstance(mgr._bg, KeyValueCoordinator)
    for step in range(1, 4):
        x = make(sharding) * step
        info = mgr.save(to_state({"x": x, "step": step}), step=step)
        assert info.nbytes == 0  # returned before the commit
        total = jax.jit(lambda a: a.sum())(x)  # computations across both processes meanwhile
        assert np.isclose(float(total), float(expected.sum() * step), rtol=1e-5)
    mgr.close()
    assert [c.name for c in mgr.checkpoints] == ["step-000000002", "step-000000003"]
else:
    like = {"x": make(NamedSharding(Mesh(devices, ("r",)), P("r", None))) * 0, "step": 0}
    mgr = CheckpointManager(directory)
    ckpt = mgr.restore("latest", template=template(like))
    restored = from_state(like, ckpt.state)
    assert restored["step"] == 2
    assert restored["x"].sharding == like["x"].sharding
    for shard in restored["x"].addressable_shards:
        assert np.array_equal(np.asarray(shard.data), expected[shard.index]), shard.index
    if jax.process_index() == 0:
        checkpointer.save(sys.argv[3], {"x_first_rows": np.asarray(restored["x"].addressable_shards[0].data)})
jax.distributed.shutdown()
