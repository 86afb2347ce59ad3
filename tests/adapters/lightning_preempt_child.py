"""Child process of ``test_lightning_preemption.py``: Lightning ``fit`` stopped by a real signal.

``python lightning_preempt_child.py preempt BASE``: twice (``BASE/sync``, then ``BASE/async``
with ``async_save=True``), trains ``TinyModule`` (dropout, Adam, StepLR) for 3 epochs of 8
batches from a resumable train loader with our ``ModelCheckpoint(save_on_preemption=True)``
ranking by ``val_loss`` (``save_last`` not set). Each run prints ``ready`` at batch 2 of
epoch 2 and waits there until the parent has sent SIGTERM (Lightning runs the checkpoint
callback's hooks last, so it sees the signal at that very batch end). Then ``BASE/val``:
the run signals itself at the start of epoch 2's validation (Lightning would end ``fit``
with its ``SIGTERMException`` at the next validation batch). After each ``fit`` returns it
prints one JSON line.

``python lightning_preempt_child.py resume BASE``: resumes each of the runs ``BASE/sync``,
``BASE/async`` and ``BASE/val`` with ``trainer.fit(ckpt_path="last")`` and trains to the end;
then trains a model straight through, and prints (one JSON line per run) the largest
difference of the weights and optimizer states between the resumed run and the straight one.

``python lightning_preempt_child.py ddp BASE``: the same training under DDP (2 CPU
processes, gloo; Lightning starts rank 1 by running this script again). Rank 0 prints
``ready`` at batch 2 of epoch 2, where rank 1 waits until the parent has sent SIGUSR1 to
rank 1 only. Each rank writes ``BASE/report-RANK.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch_lightning_model import TinyModule, loaders, trainer  # noqa: E402

from checkpointer.adapters.lightning import ModelCheckpoint, SafeCheckpointIO  # noqa: E402
from checkpointer.adapters.torch import to_state  # noqa: E402

EPOCHS = 3


class Batches:
    """A sized, resumable train loader: the same 8 batches in the same order every epoch.
    Lightning stores ``state_dict()`` in its checkpoints and hands it back on resume, so an
    epoch resumed after ``pos`` batches yields only the batches not seen yet."""

    def __init__(self, n: int = 64, batch: int = 8) -> None:
        g = torch.Generator().manual_seed(99)
        x = torch.randn(n, 4, generator=g)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
        self.batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
        self.pos, self._start = 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self._start = self._start, 0
        for i in range(start, len(self.batches)):
            self.pos = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = state["pos"] if state["pos"] < len(self.batches) else 0


class Pacer(pl.Callback):
    """Counts batch ends; at batch 2 of epoch 2 rank 0 says ``ready`` and rank ``waiter``
    waits for the signal, whose handler (:meth:`note`, installed before ``fit``) notes the
    batches run then."""

    def __init__(self, waiter: int = 0) -> None:
        self.batches, self.waiter = 0, waiter
        self.at_signal: int | None = None

    def note(self, signum: int, frame: Any) -> None:
        if self.at_signal is None:
            self.at_signal = self.batches

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self.batches += 1
        at = (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        if at != (1, 2):
            return
        if trainer.global_rank == 0:
            print("ready", flush=True)
        deadline = time.monotonic() + 120
        while trainer.global_rank == self.waiter and self.at_signal is None:
            assert time.monotonic() < deadline, "no signal came"
            time.sleep(0.01)


def run(root: Path, dirpath: Path, async_save: bool, ckpt_path: str | None,
        extra: list[Any]) -> tuple[pl.Trainer, TinyModule, ModelCheckpoint]:  # fmt: skip
    pl.seed_everything(7, verbose=False)
    model = TinyModule()
    cb = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2,
                         async_save=async_save, save_on_preemption=True)  # fmt: skip
    t = trainer(str(root), EPOCHS, [cb, *extra], plugins=[SafeCheckpointIO()])
    t.fit(model, Batches(), loaders()[1], ckpt_path=ckpt_path)
    return t, model, cb


class SignalInValidation(pl.Callback):
    """Sends this process SIGTERM when epoch 2's validation starts."""

    def on_validation_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.current_epoch == 1 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def preempt(base: Path) -> None:
    for how in ("sync", "async", "val"):
        _preempt(base / how, how)


def _preempt(root: Path, how: str) -> None:
    pacer = Pacer()
    signal.signal(signal.SIGTERM, pacer.note)  # installed first: the handlers chain it
    extra = [pacer] if how != "val" else [SignalInValidation()]
    t, model, cb = run(root, root / "ck", how == "async", None, extra)
    print(json.dumps({
        "run": how,
        "at_signal": pacer.at_signal,
        "step": t.global_step,
        "preempted": cb.preempted,
        "last": os.path.basename(cb.last_model_path),
        "listing": sorted(os.listdir(root / "ck")),
        "handler_restored": signal.getsignal(signal.SIGTERM) == pacer.note,
    }), flush=True)  # fmt: skip


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    out = 0.0
    for key in a:
        u, v = a[key], b[key]
        if isinstance(u, dict):
            out = max(out, max_diff(u, v))
        elif hasattr(u, "shape"):
            out = max(out, float(abs(torch.as_tensor(u).double() - torch.as_tensor(v)).max()))
        else:
            assert u == v, (key, u, v)
    return out


def ddp(base: Path) -> None:
    pacer = Pacer(waiter=1)
    signal.signal(signal.SIGUSR1, pacer.note)  # on both ranks: this script runs on each
    pl.seed_everything(7, verbose=False)
    cb = ModelCheckpoint(dirpath=base / "ck", monitor="val_loss", save_top_k=2,
                         save_on_preemption=True)  # fmt: skip
    t = trainer(str(base), EPOCHS, [cb, pacer], strategy="ddp", devices=2,
                num_sanity_val_steps=0)  # fmt: skip
    t.fit(TinyModule(), Batches(), loaders()[1])
    report = {"rank": t.global_rank, "step": t.global_step, "preempted": cb.preempted,
              "last": os.path.basename(cb.last_model_path)}  # fmt: skip
    (base / f"report-{t.global_rank}.json").write_text(json.dumps(report))


class FirstStep(pl.Callback):
    """Records the global step at the first training batch."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self.step is None:
            self.step = trainer.global_step


def resume(base: Path) -> None:
    t, model, _ = run(base / "straight", base / "straight" / "ck", False, None, [])
    straight = to_state({"model": model, "optimizer": t.optimizers[0]})
    for how in ("sync", "async", "val"):
        first = FirstStep()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t, model, cb = run(base / how, base / how / "ck", how == "async", "last", [first])
        resumed = to_state({"model": model, "optimizer": t.optimizers[0]})
        print(json.dumps({
            "run": how,
            "first_step": first.step,
            "steps": t.global_step,
            "resumed_vs_straight": max_diff(resumed, straight),
            "preempted": cb.preempted,
            "not_resumable_warning": any("not resumable" in str(w.message) for w in caught),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    {"preempt": preempt, "resume": resume, "ddp": ddp}[sys.argv[1]](Path(sys.argv[2]))
