"""JAX adapter: any pytree to a plain state tree and back (flax nnx/linen, optax, PRNG keys).

``to_state(pytree)`` gives the plain tree the core stores (nested ``dict``/``list``/``tuple``,
numpy leaves, dtypes kept exactly: bfloat16 and float8 are never widened).
``from_state(template, state)`` rebuilds the template's exact structure (optax namedtuples,
flax ``State``/``FrozenDict``, custom nodes), checks every shape and dtype, and places each
array on the template leaf's sharding. ``save``/``load``/``restore`` are the one-liners on top.

How a pytree maps to a state tree:

- plain ``dict``/``list``/``tuple`` stay what they are (non-``str`` dict keys become ``str``);
- any other pytree node becomes a ``dict`` keyed by its children's key names: a namedtuple by
  field name (``ScaleByAdamState(count, mu, nu)`` -> ``{"count":…, "mu":…, "nu":…}``), an nnx
  ``Variable`` by ``"value"``, a custom node without keys by ``"0"``, ``"1"``, …;
- a typed PRNG key (``jax.random.key``) becomes ``{"__jax_prng_key__": impl, "data": uint32}``
  (``jax.random.key_impl`` / ``jax.random.key_data``); raw uint32 keys are ordinary arrays;
- an array of a dtype the format cannot hold natively (int4, float8_e4m3fnuz, complex128, …)
  becomes ``{"__jax_array_bits__": dtype_name, "bits": uint8[..., itemsize]}``: its exact bytes;
- a ``jax.Array`` spread over several processes becomes a
  :class:`~checkpointer.sharding.ShardedArray` of the pieces this process writes (replicas
  once); restored through ``template(tree)`` of :mod:`checkpointer.adapters.jax_distributed`,
  ``from_state`` rebuilds it from this process's pieces on the template's sharding.

Example::

    from checkpointer.adapters import jax as cj

    state = {"params": params, "opt_state": opt_state, "step": step, "key": key}
    mgr.step_end(step, lambda: cj.to_state(state))       # extracted only when a save happens
    state = cj.restore(mgr, state).state                  # same structure, dtypes, shardings
"""

from __future__ import annotations

from ._require import require

with require(__name__, "JAX, flax and optax", "jax"):
    import jax  # noqa: F401  (fail here, naming the extra, not deep inside)

import os
from typing import Any

import checkpointer
from checkpointer import CheckpointInfo
from checkpointer.errors import StateTreeError
from checkpointer.hints import refuse_checkpoint

from ._jax_tree import BITS_MARK, KEY_MARK, Decoder, decode_plain, encode, prefetch

__all__ = ["to_state", "from_state", "save", "load", "restore", "KEY_MARK", "BITS_MARK"]

_MAX_LISTED = 40


def to_state(pytree: Any) -> Any:
    """Convert a JAX pytree into a plain state tree, materialized on the host.

    Every array is copied to host memory when this is called (waiting for pending
    computations), so donating, deleting or mutating the inputs afterwards never changes the
    result. The input is not modified.

    Args:
        pytree: any pytree of ``jax.Array``, numpy arrays and scalars, Python scalars,
            ``str``, ``bytes``, ``None`` and typed or raw PRNG keys, in any registered nodes.

    Returns:
        A nested ``dict``/``list``/``tuple`` tree with numpy (and scalar) leaves.

    Raises:
        StateTreeError: a leaf that is not an array, scalar or registered pytree node, or two
            dict keys that collide once made ``str`` (the message names the path).

    Example::

        >>> import jax.numpy as jnp
        >>> to_state({"w": jnp.ones(2, jnp.bfloat16)})["w"].dtype
        dtype(bfloat16)
    """
    prefetch(pytree)
    return encode(pytree)


def from_state(template: Any, state: Any, *, strict: bool = True) -> Any:
    """Rebuild a pytree shaped like ``template`` from ``state`` (the output of ``to_state``).

    The result has the template's exact structure (namedtuples, flax structures and custom
    nodes come back as themselves) and each array is placed on the template leaf's sharding
    (``jax.device_put(x, leaf.sharding)``), weak type included. Numpy and Python-scalar leaves
    of the template come back as numpy and Python scalars. The template may be abstract
    (``jax.eval_shape`` / ``nnx.eval_shape`` output: ``jax.ShapeDtypeStruct`` leaves).

    Args:
        template: a pytree with the wanted structure, or ``None`` to restore without one:
            containers stay plain ``dict``/``list``/``tuple``, arrays become ``jax.Array``
            (those whose dtype JAX would narrow, 64-bit ones with x64 off, stay numpy) and
            stored PRNG keys become typed keys again.
        state: a state tree, e.g. ``checkpointer.load(url)`` or ``Checkpoint.state``.
        strict: when ``False``, leaves missing from ``state`` keep the template's value and
            entries the template lacks are ignored. Shapes and dtypes must match either way.

    Raises:
        StateTreeError: the state does not match the template; the message lists every
            offending path (missing, unexpected, or a differing shape, dtype or kind).

    Example::

        >>> import jax.numpy as jnp
        >>> t = {"w": jnp.zeros(2)}
        >>> from_state(t, to_state({"w": jnp.ones(2)}))["w"]
        Array([1., 1.], dtype=float32)
    """
    refuse_checkpoint(state)
    if template is None:
        return decode_plain(state)
    decoder = Decoder(strict=strict)
    result = decoder.decode(template, state)
    if decoder.errors:
        listed = decoder.errors[:_MAX_LISTED]
        more = len(decoder.errors) - len(listed)
        raise StateTreeError(
            f"the state does not match the template at {len(decoder.errors)} path(s):\n  "
            + "\n  ".join(listed)
            + (f"\n  ... and {more} more" if more else "")
            + "\n(pass strict=False to tolerate missing or extra leaves, "
            "or template=None to restore plain containers)"
        )
    return result


def save(
    url: str | os.PathLike[str],
    pytree: Any,
    *,
    metadata: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Save ``to_state(pytree)`` as the checkpoint ``url`` with :func:`checkpointer.save`.

    Raises:
        StateTreeError: ``pytree`` holds something that cannot be stored (see :func:`to_state`).
        CheckpointError: any error of :func:`checkpointer.save`.

    Example::

        >>> save("ckpts/final", {"params": params, "step": 100})
    """
    return checkpointer.save(
        url, to_state(pytree), metadata=metadata, storage_options=storage_options
    )


def load(
    url: str | os.PathLike[str],
    template: Any = None,
    *,
    strict: bool = True,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Read the checkpoint ``url`` with :func:`checkpointer.load`, rebuilt like ``template``
    (functional: the template is not changed, the restored pytree is returned).

    Raises:
        StateTreeError: the checkpoint does not match ``template`` (see :func:`from_state`).
        CheckpointError: any error of :func:`checkpointer.load`.

    Example::

        >>> params = load("ckpts/final", {"params": params, "step": 0})["params"]
    """
    state = checkpointer.load(url, verify=verify, storage_options=storage_options)
    return from_state(template, state, strict=strict)


def restore(
    manager: Any,
    template: Any = None,
    which: str | int = "latest",
    *,
    strict: bool = True,
    verify: bool = True,
    fallback: bool = True,
) -> Any:
    """``manager.restore(which)`` with its state rebuilt like ``template``.

    Returns:
        A ``checkpointer.Checkpoint`` whose ``state`` is the rebuilt pytree.

    Example::

        ckpt = restore(mgr, {"params": params, "opt_state": opt_state, "step": 0, "key": key})
        params, opt_state = ckpt.state["params"], ckpt.state["opt_state"]
    """
    ckpt = manager.restore(which, verify=verify, fallback=fallback)
    state = from_state(template, ckpt.state, strict=strict)
    return type(ckpt)(info=ckpt.info, state=state)
