"""``checkpointer demo``: a small numpy training run, interrupted and resumed.

A two-layer network learns to classify three noisy spirals with plain numpy. Each
epoch ends with ``mgr.epoch_end`` (monitor ``val_loss``, best 2 and last 2 kept). The
first run is cut short as if the machine died; a second run opens the same directory,
restores the latest checkpoint (weights, optimizer moments, RNG state, epoch) and
finishes. Offline, a few seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigurationError
from .manager import CheckpointManager

__all__ = ["run_demo"]


def _spirals(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    k = rng.integers(0, 3, n)
    r = rng.uniform(0.1, 1.0, n)
    t = k * 2 * np.pi / 3 + r * 3.0 + rng.normal(0, 0.15, n)
    x = np.stack([r * np.cos(t), r * np.sin(t)], axis=1).astype(np.float32)
    return x, k


def _init(rng: np.random.Generator) -> dict[str, Any]:
    params = {"w1": rng.normal(0, 1.0, (2, 64)).astype(np.float32), "b1": np.zeros(64, np.float32),
              "w2": rng.normal(0, 0.1, (64, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)}
    return {"params": params, "m": {k: np.zeros_like(v) for k, v in params.items()},
            "v": {k: np.zeros_like(v) for k, v in params.items()}, "t": 0}


def _forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.maximum(x @ p["w1"] + p["b1"], 0)
    z = h @ p["w2"] + p["b2"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return h, e / e.sum(axis=1, keepdims=True)


def _loss_acc(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    _, prob = _forward(p, x)
    return float(-np.log(prob[np.arange(len(y)), y] + 1e-9).mean()), float((prob.argmax(1) == y).mean())


def _train_epoch(state: dict[str, Any], rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> None:
    p, lr = state["params"], 0.01
    for idx in np.array_split(rng.permutation(len(y)), 16):
        xb, yb = x[idx], y[idx]
        h, prob = _forward(p, xb)
        dz = prob
        dz[np.arange(len(yb)), yb] -= 1
        dz /= len(yb)
        dh = (dz @ p["w2"].T) * (h > 0)
        grads = {"w2": h.T @ dz, "b2": dz.sum(0), "w1": xb.T @ dh, "b1": dh.sum(0)}
        state["t"] += 1
        for k, g in grads.items():  # Adam
            state["m"][k] = 0.9 * state["m"][k] + 0.1 * g
            state["v"][k] = 0.999 * state["v"][k] + 0.001 * g * g
            mh = state["m"][k] / (1 - 0.9 ** state["t"])
            vh = state["v"][k] / (1 - 0.999 ** state["t"])
            p[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)


def _run(directory: str, epochs: int, stop_after: int | None,
         storage_options: dict[str, Any] | None) -> CheckpointManager:
    data_rng = np.random.default_rng(0)
    x, y = _spirals(data_rng, 2400)
    xt, yt, xv, yv = x[:2000], y[:2000], x[2000:], y[2000:]
    mgr = CheckpointManager(directory, monitor="val_loss", keep_best=2, keep_last=2,
                            filename="epoch{epoch:02d}-val_loss{val_loss:.3f}",
                            storage_options=storage_options)
    rng = np.random.default_rng(1)
    state, start = _init(rng), 1
    if mgr.latest is not None:
        ckpt = mgr.restore("latest")
        state = ckpt.state["train"]
        rng.bit_generator.state = ckpt.state["rng"]
        start = ckpt.info.epoch + 1 if ckpt.info.epoch is not None else 1
        print(f"resumed from {ckpt.info.name} (epoch {ckpt.info.epoch}); continuing at epoch {start}")
    for epoch in range(start, epochs + 1):
        _train_epoch(state, rng, xt, yt)
        val_loss, val_acc = _loss_acc(state["params"], xv, yv)
        info = mgr.epoch_end(epoch, lambda: {"train": state, "rng": rng.bit_generator.state},
                             metrics={"val_loss": val_loss, "val_accuracy": val_acc})
        saved = f"saved {info.name}" if info else "not saved"
        print(f"epoch {epoch:2d}  val_loss {val_loss:.4f}  val_accuracy {val_acc:.3f}  {saved}")
        if stop_after is not None and epoch == stop_after:
            print(f"-- interrupted after epoch {epoch} (as if the machine went away) --")
            break
    mgr.close()
    return mgr


def _refuse_used(directory: str, storage_options: dict[str, Any] | None) -> None:
    """The demo resumes from what it finds: checkpoints already there (another run's, or an
    earlier demo's) would be resumed as if they were its own."""
    with CheckpointManager(directory, storage_options=storage_options) as mgr:
        names = [i.name for i in mgr.checkpoints]
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigurationError(
            f"{directory} already holds {len(names)} checkpoint{'s' * (len(names) != 1)} ({shown}); "
            "the demo needs a new or empty directory: pass another one, e.g. "
            "`checkpointer demo demo-2`, or delete this one")


def run_demo(directory: str, *, epochs: int = 12, interrupt_at: int = 5,
             storage_options: dict[str, Any] | None = None) -> None:
    """Run the demo into ``directory`` (a path or fsspec URL): a first run cut short, a
    second that resumes and finishes (``checkpointer demo`` then lists and verifies them).

    Raises:
        ConfigurationError: ``directory`` already holds checkpoints.
    """
    _refuse_used(directory, storage_options)
    print(f"== first run, checkpoints in {directory}")
    _run(directory, epochs, interrupt_at, storage_options)
    print("== second run: same command, same directory")
    mgr = _run(directory, epochs, None, storage_options)
    best = mgr.restore("best")
    print(f"== best checkpoint {best.info.name}: val_loss {best.info.metrics['val_loss']:.4f}")
    print("   kept: the 2 best, the 2 latest, and the one the second run resumed from")
