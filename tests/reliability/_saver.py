"""Child process of the kill tests: a fork server whose children save checkpoints in a loop.

Run as ``python _saver.py``: it imports numpy and checkpointer once (s3fs too when asked),
then reads one JSON request per line on stdin. Each request forks a fresh child that opens
a :class:`CheckpointManager` on the requested directory and saves until it is killed; the
server answers ``{"pid": N}``. ``SIGCHLD`` is ignored so killed children are reaped at once
(a zombie would still look alive to the engine's dead-owner test).

A child appends to its ``log`` file: ``ready`` once the manager is open, ``s<step>`` after
each committed save, ``E<message>`` (and exits 3) on any exception: a save loop must never
fail on its own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

import numpy as np

import checkpointer

STATE_WORDS = 1 << 18  # 1 MiB of float32 per array


def make_state(step: int, words: int = STATE_WORDS) -> dict[str, Any]:
    """The state saved at ``step``; :func:`check_state` recognises it."""
    return {
        "step": step,
        "w": np.full(words, step, dtype=np.float32),
        "b": np.arange(words // 4, dtype=np.int64) + step,
        "opt": {"lr": 0.1, "moments": (np.full(words // 2, -step, dtype=np.float16), None)},
        "tag": f"step {step}",
    }


def check_state(state: Any, step: int | None) -> None:
    """Raise AssertionError unless ``state`` is exactly what :func:`make_state` wrote."""
    s = state["step"]
    assert step is None or s == step, f"state step {s} != info step {step}"
    assert state["tag"] == f"step {s}"
    w, b, m = state["w"], state["b"], state["opt"]["moments"][0]
    assert w.dtype == np.float32 and bool((w == s).all()), "w corrupted"
    assert b.dtype == np.int64 and bool((b == np.arange(b.size) + s).all()), "b corrupted"
    assert m.dtype == np.float16 and bool((m == np.float16(-s)).all()), "moments corrupted"
    assert state["opt"]["lr"] == 0.1 and state["opt"]["moments"][1] is None


def loss_of(step: int) -> float:
    """A deterministic, non-monotonic metric, so the best moves around."""
    return float((step * 7919) % 101) / 100.0


def manager_kwargs(req: dict[str, Any]) -> dict[str, Any]:
    """The manager options a request asks for (also used by the checking parent)."""
    kw: dict[str, Any] = {
        "monitor": "loss",
        "keep_last": 2,
        "keep_best": 1,
        "max_file_bytes": 3 << 19,
    }
    if req.get("storage_options"):
        kw["storage_options"] = req["storage_options"]
    if req.get("replace"):
        kw["filename"] = "slot{epoch}"
    return kw


def _note(fd: int, text: str) -> None:
    os.write(fd, (text + "\n").encode())


def child(req: dict[str, Any]) -> None:
    """Save forever (until killed) into ``req["directory"]``."""
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        mgr = checkpointer.CheckpointManager(
            req["directory"], async_save=bool(req.get("async")), **manager_kwargs(req)
        )
        _note(fd, "ready")
        step = (
            (mgr.latest.step + 1) if mgr.latest is not None and mgr.latest.step is not None else 0
        )
        while True:
            mgr.save(
                make_state(step, req.get("words", STATE_WORDS)),
                step=step,
                epoch=step % 3,
                metrics={"loss": loss_of(step)},
            )
            if req.get("async"):
                mgr.wait()
            _note(fd, f"s{step}")
            step += 1
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        _note(fd, "E" + "".join(traceback.format_exception(exc)).replace("\n", " | "))
        os._exit(3)


def serve() -> None:
    """Fork one saving child per request line."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.stdin.close()
            child(req)
            os._exit(0)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


def warm_s3() -> None:
    """Import s3fs and load botocore's data files once, so that forked children start fast.

    botocore parses its JSON models again for every new session (every child); a process-wide
    memo filled here, before any fork, turns that ~0.3 s per child into ~0.01 s. No thread,
    socket or event loop is created here.
    """
    import aiobotocore.endpoint  # noqa: F401
    import aiobotocore.httpsession  # noqa: F401
    import botocore.loaders
    import botocore.session
    import s3fs  # noqa: F401

    def memoized(method: Any) -> Any:
        memo: dict[Any, Any] = {}

        def call(self: Any, *args: Any) -> Any:
            if args not in memo:
                memo[args] = method(self, *args)
            return memo[args]

        return call

    botocore.loaders.JSONFileLoader.load_file = memoized(botocore.loaders.JSONFileLoader.load_file)
    for name in ("list_available_services", "determine_latest_version", "list_api_versions"):
        setattr(botocore.loaders.Loader, name, memoized(getattr(botocore.loaders.Loader, name)))
    botocore.session.get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


if __name__ == "__main__":
    if "--s3" in sys.argv:
        warm_s3()
    serve()
