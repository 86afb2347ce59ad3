"""Hostile files, fuzzed: the safetensors header parser (small inputs, and up to 64 KiB),
the manifest decoder and a full load. The shapes of real checkpoints (shards, block
checksums, hundreds of leaves, every entry point) are fuzzed in ``test_fuzz_shapes.py``.

Every input must end in a value or a ``CheckpointError`` subclass: never another exception,
never a hang (hypothesis deadline), never an allocation beyond a few MB (tracemalloc peak
per case). Hand-crafted attacker files are in ``test_crafted.py``.
"""

from __future__ import annotations

import io
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from _hostile import (
    GOOD,
    VALID,
    bounded_memory,
    frame,
    framed_header,
    mutations,
    noise_blobs,
    only_checkpoint_errors,
    parse_header,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpointer
from checkpointer import format as fmt
from checkpointer.dtypes import SAFETENSORS_TO_NUMPY
from checkpointer.frame import decode_framed
from checkpointer.load import load_checkpoint
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME
from checkpointer.storage import open_store

FUZZ = settings(
    max_examples=1500,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
COUNTS: Counter[str] = Counter()


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)
tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(
            st.sampled_from(["F32", "I8", "BF16", "F8_E4M3", "U64", "X", "f32"]), json_values
        ),
        "shape": st.one_of(
            st.lists(st.one_of(st.integers(-2, 2**63), st.just(0)), max_size=5), json_values
        ),
        "data_offsets": st.one_of(
            st.lists(st.integers(-5, 2**64), min_size=0, max_size=3), json_values
        ),
    }
)
headers = st.dictionaries(
    st.one_of(st.text(max_size=5), st.just("__metadata__")),
    st.one_of(tensor_entries, json_values),
    max_size=4,
)


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    from _relcommon import _COUNTS

    _COUNTS.update(COUNTS)


def test_fuzz_safetensors_header() -> None:
    with bounded_memory() as run:

        @FUZZ
        @given(
            st.one_of(
                st.binary(max_size=300),
                mutations(VALID),
                st.builds(
                    framed_header,
                    headers,
                    st.binary(max_size=64),
                    st.one_of(st.none(), st.integers(0, 2**64 - 1)),
                ),
            )
        )
        def case(data: bytes) -> None:
            COUNTS["fuzz cases: safetensors header"] += 1
            run(lambda: parse_header(data))

        case()


def _large_file() -> bytes:
    """A data file the engine's writer made, of 400 tensors of every allow-listed dtype:
    a 30 KiB header."""
    codes = sorted(SAFETENSORS_TO_NUMPY)
    buf = io.BytesIO()
    fmt.write_safetensors(buf, "data-00000.safetensors", [
        (f"layers/{i}/{codes[i % len(codes)]}", np.zeros((i % 3, 2), SAFETENSORS_TO_NUMPY[codes[i % len(codes)]]))
        for i in range(400)])
    return buf.getvalue()


LARGE = _large_file()


def test_fuzz_large_safetensors_headers() -> None:
    """Headers up to 64 KiB and beyond: a real 400-tensor header with bytes edited and
    ranges copied, noise, and random headers of up to 64 entries."""
    with bounded_memory() as run:

        @settings(FUZZ, max_examples=300)
        @given(st.one_of(
            mutations(LARGE, grow=8 << 10),
            noise_blobs(),
            noise_blobs().map(lambda blob: struct.pack("<Q", len(blob)) + blob),
            st.builds(framed_header, st.dictionaries(st.text(max_size=12), tensor_entries, max_size=64),
                      st.binary(max_size=256), st.none()),
        ))
        def case(data: bytes) -> None:
            COUNTS["fuzz cases: large safetensors headers"] += 1
            COUNTS["fuzz cases: large safetensors headers over 16 KiB"] += len(data) > 16 << 10
            run(lambda: parse_header(data))

        case()


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=6), kids, max_size=5)
    ),
    max_leaves=8,
)


def manifest_like() -> st.SearchStrategy[Any]:
    """Manifests that pass the frame check: random objects, or the good one with one field
    replaced by a random value, so decoding reaches the validation and the tree builder."""

    def patch(key: str, value: Any) -> dict[str, Any]:
        return {**GOOD, key: value}

    return st.one_of(
        msgpack_values, st.builds(patch, st.sampled_from(sorted(GOOD)), msgpack_values)
    )


def test_fuzz_manifest_decoder() -> None:
    good = frame(msgpack.packb(GOOD, use_bin_type=True))
    with bounded_memory() as run:

        @FUZZ
        @given(
            st.one_of(st.binary(max_size=200), mutations(good), st.binary(max_size=200).map(frame))
        )
        def case(data: bytes) -> None:
            COUNTS["fuzz cases: manifest frame"] += 1
            run(
                lambda: only_checkpoint_errors(
                    lambda: decode_framed(data, MANIFEST_MAGIC, "fuzz")
                )
            )

        case()


def test_fuzz_read_manifest_and_load() -> None:
    """A manifest with a valid frame but hostile content, through read_manifest and a full
    load of the folder (the data file of the good checkpoint sits beside it)."""
    store = open_store(f"memory://hostile-{uuid.uuid4().hex[:8]}")
    checkpointer.save(store.url_of("c"), {"x": np.arange(4.0), "y": [1, "s", None, (b"b",)]})
    with bounded_memory() as run:

        @settings(FUZZ, max_examples=1000)
        @given(manifest_like())
        def case(obj: Any) -> None:
            COUNTS["fuzz cases: manifest content + full load"] += 1
            try:
                body = msgpack.packb(obj, use_bin_type=True)
            except (ValueError, TypeError, OverflowError):
                return
            store.put_bytes(f"c/{MANIFEST_NAME}", frame(body))
            run(lambda: only_checkpoint_errors(lambda: load_checkpoint(store, "c")))

        case()
