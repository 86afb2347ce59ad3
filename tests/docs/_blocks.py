"""The Python blocks of the README and of ``docs/*.md``: found, and run as a reader runs them.

Every fenced ```` ```python ```` block is a program that a reader can paste and run alone,
in an empty folder: each runs in a fresh interpreter, in a folder of its own, and the
blocks run side by side.

A block is marked by an HTML comment on the line right before its fence (invisible when
rendered); several marks are separated by ``;``:

- ``<!-- excerpt -->``: a fragment, not run (keep these few);
- ``<!-- continues -->``: runs after the block before it on its page, in that block's
  folder (it reads what that one wrote);
- ``<!-- twice -->``: run twice in its folder, as a reader does to see it resume;
- ``<!-- run: CMD; again: CMD2 -->``: run with ``CMD``, then once more with ``CMD2`` (the
  same script, e.g. on another number of processes);
- ``<!-- run: torchrun --standalone --nproc_per_node=2 fsdp_save.py -->``: written to the
  file the command names (its last word) and run with that command, from the venv.

The environment is a reader's: ``AWS_*`` credentials and ``AWS_ENDPOINT_URL`` point at a
local moto S3 server (started when a block names ``s3://``, with every bucket the blocks
name created), ``KERAS_BACKEND`` picks a Keras backend, one thread per process.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_WORD = r"(?:excerpt|continues|twice|run:[^;]+?|again:[^;]+?)"
MARK = re.compile(rf"^<!--\s*({_WORD}(?:\s*;\s*{_WORD})*)\s*-->$")
BUCKET = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/")
TIMEOUT_S = 240  # per block, generous: a loaded 2-core machine imports torch slowly
SUMMARY: list[str] = []  # lines for the terminal summary (conftest.py prints them)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Block:
    """One ```` ```python ```` block: its page, its place, its code and its mark."""

    page: Path
    number: int  # 1-based, among the page's Python blocks
    line: int  # of the opening fence, 1-based
    code: str
    marks: tuple[str, ...]  # "excerpt", "continues", "twice", "run: CMD", "again: CMD"

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.number}@L{self.line}"

    @property
    def excerpt(self) -> bool:
        return "excerpt" in self.marks

    @property
    def continues(self) -> bool:
        return "continues" in self.marks

    @property
    def command(self) -> str | None:
        """The ``run:`` command, if any."""
        return self._mark("run:")

    @property
    def reruns(self) -> bool:
        """Whether it runs a second time (``twice`` or ``again:``)."""
        return "twice" in self.marks or self._mark("again:") is not None

    @property
    def again(self) -> str | None:
        """The command of the second run: ``again:``'s, else the first one's."""
        return self._mark("again:") or self.command

    def _mark(self, prefix: str) -> str | None:
        return next((m[len(prefix):].strip() for m in self.marks if m.startswith(prefix)), None)


@dataclass(frozen=True)
class Fence:
    """Any fenced block: its info string (language) and its first line."""

    page: Path
    line: int
    language: str


def fences(page: Path) -> Iterator[tuple[Fence, str, tuple[str, ...]]]:
    """Every fenced block of ``page``: (fence, code, the marks on the line before)."""
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, language = m.groups()
        before = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        mark = MARK.match(before)
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        code = "\n".join(x[len(indent):] for x in lines[i + 1:end]) + "\n"
        marks = tuple(m.strip() for m in mark.group(1).split(";")) if mark else ()
        yield Fence(page, i + 1, language), code, marks
        i = end + 1


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    """Every Python block of ``pages``, in page order."""
    found: list[Block] = []
    for page in pages:
        n = 0
        for fence, code, marks in fences(page):
            if fence.language == "python":
                n += 1
                found.append(Block(page, n, fence.line, code, marks))
    return found


@dataclass(frozen=True)
class Run:
    """How one block ran."""

    block: Block
    returncode: int
    output: str  # stdout + stderr, for the failure message
    seconds: float
    ran: bool = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def s3_server(buckets: set[str]) -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback holding ``buckets``; the environment that reaches it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        for bucket in sorted(buckets):
            client.create_bucket(Bucket=bucket)
        yield {**AWS_ENV, "AWS_ENDPOINT_URL": url}
    finally:
        server.stop()


def block_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KERAS_"))}
    env.update({"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
                "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


def _command(block: Block, folder: Path, command: str | None) -> list[str]:
    if command is None:
        script = folder / f"block{block.number:02d}.py"
        script.write_text(block.code)
        return [sys.executable, script.name]
    words = shlex.split(command)
    (folder / words[-1]).write_text(block.code)
    if words[0] == "python":
        words[0] = sys.executable
    elif (BIN / words[0]).exists():
        words[0] = str(BIN / words[0])
    return words


def run_block(block: Block, folder: Path, env: dict[str, str], command: str | None) -> Run:
    """Run one block in ``folder`` (a fresh interpreter), with ``command`` if given."""
    start = time.monotonic()
    try:
        proc = subprocess.run(_command(block, folder, command), cwd=folder, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = -9, f"timed out after {TIMEOUT_S} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return Run(block, code, out, time.monotonic() - start)


def chains(found: list[Block]) -> list[list[Block]]:
    """The runnable blocks grouped: a block and the ``continues`` blocks after it."""
    out: list[list[Block]] = []
    for b in found:
        if b.excerpt:
            continue
        if b.continues:
            assert out and out[-1][-1].page == b.page and out[-1][-1].number == b.number - 1, (
                f"{b.id}: 'continues' needs a runnable block right before it on its page")
            out[-1].append(b)
        else:
            out.append([b])
    return out


def run_chain(chain: list[Block], folder: Path, env: dict[str, str]) -> list[Run]:
    """The chain's blocks in order, in one folder; after a failure the rest are not run."""
    folder.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    for block in chain:
        if runs and runs[-1].returncode != 0:
            runs.append(Run(block, -1, f"not run: {runs[-1].block.id} failed before it", 0.0,
                            ran=False))
            continue
        run = run_block(block, folder, env, block.command)
        if block.reruns and run.returncode == 0:
            again = run_block(block, folder, env, block.again)
            run = Run(block, again.returncode, f"{run.output}\n--- second run ---\n{again.output}",
                      run.seconds + again.seconds)
        runs.append(run)
    return runs


# rough start-up costs (imports) on a 2-core machine, to start the slowest chains first
_COST = {"lightning": 12.0, "torchrun": 12.0, "keras": 8.0, "flax": 5.0, "torch": 4.0,
         "jax": 3.0, "s3://": 1.0}


def cost(chain: list[Block]) -> float:
    return sum(1.0 + max((c for word, c in _COST.items() if word in b.code + (b.command or "")),
                         default=0.0) for b in chain)


def run_all(found: list[Block], root: Path, workers: int = 3) -> dict[str, Run]:
    """Every runnable block of ``found``, chains side by side; block id -> run."""
    todo = sorted(chains(found), key=cost, reverse=True)
    buckets = {m for chain in todo for b in chain for m in BUCKET.findall(b.code)}
    with s3_server(buckets) if buckets else _no_server() as extra:
        env = block_env(extra)
        folder = {id(c): root / f"{c[0].page.stem}-{c[0].number:02d}" for c in todo}
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(lambda c: run_chain(c, folder[id(c)], env), todo)
            return {r.block.id: r for runs in results for r in runs}


@contextmanager
def _no_server() -> Iterator[dict[str, str]]:
    yield {}
