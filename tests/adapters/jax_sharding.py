"""Subprocess script: from_state places arrays on the template's sharding (2 CPU devices).

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``. Prints one JSON line.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from checkpointer.adapters import jax as cj

mesh = Mesh(np.array(jax.devices()), ("x",))
split, replicated = NamedSharding(mesh, PartitionSpec("x")), NamedSharding(mesh, PartitionSpec())
saved = {
    "w": jax.device_put(jnp.arange(8.0, dtype=jnp.bfloat16), split),
    "b": jax.device_put(jnp.ones(3), replicated),
    "key": jax.device_put(jax.random.key(5), jax.devices()[1]),
}
state = cj.to_state(saved)
template = {
    "w": jax.device_put(jnp.zeros(8, jnp.bfloat16), split),
    "b": jax.device_put(jnp.zeros(3), replicated),
    "key": jax.device_put(jax.random.key(0), jax.devices()[1]),
}
back = cj.from_state(template, state)
abstract = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), template
)
abstract = cj.from_state(abstract, state)
print(
    json.dumps(
        {
            "devices": len(jax.devices()),
            "same_sharding": [back[k].sharding == template[k].sharding for k in template],
            "abstract_sharding": [abstract[k].sharding == template[k].sharding for k in template],
            "w_shards": [s.data.tolist() for s in back["w"].addressable_shards],
            "values": bool(np.array_equal(np.asarray(back["w"]), np.asarray(saved["w"]))),
            "key": jax.random.key_data(back["key"]).tolist()
            == jax.random.key_data(saved["key"]).tolist(),
        }
    )
)
