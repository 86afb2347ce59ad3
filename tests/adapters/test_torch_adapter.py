"""Unit tests of checkpointer.adapters.torch: state trees from torch objects and back."""

from __future__ import annotations

import logging
import random

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkpointer import tree  # noqa: E402
from checkpointer.adapters.torch import (  # noqa: E402
    LoadReport,
    load_state,
    rng_state,
    set_rng_state,
    to_state,
)
from checkpointer.errors import CheckpointError, StateTreeError  # noqa: E402


def _through_tree(state):
    """What a save/load does to the tree, minus storage: flatten and rebuild."""
    skeleton, arrays = tree.flatten(state)
    return tree.unflatten(skeleton, {k: np.array(a) for k, a in arrays})


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_module_round_trip_is_exact_and_keeps_names() -> None:
    src, dst = _net(0), _net(1)
    src(torch.randn(6, 3))  # moves BatchNorm running stats
    state = to_state(src)
    assert {k for k in state if k != "__torch__"} == set(src.state_dict())
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if k != "__torch__")
    report = load_state(dst, _through_tree(state))
    assert not report
    _assert_same(src.state_dict(), dst.state_dict())


def test_to_state_shares_memory_and_never_mutates() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = to_state(net)
    weight = net[0].weight
    assert np.shares_memory(state["0.weight"], weight.detach().numpy())
    _assert_same(before, net.state_dict())
    assert isinstance(net[0].weight, torch.nn.Parameter) and weight.requires_grad


@pytest.mark.parametrize(
    "dtype, np_dtype",
    [
        (torch.float32, np.float32),
        (torch.float16, np.float16),
        (torch.float64, np.float64),
        (torch.bfloat16, ml_dtypes.bfloat16),
        (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
        (torch.float8_e5m2, ml_dtypes.float8_e5m2),
        (torch.int64, np.int64),
        (torch.int8, np.int8),
        (torch.uint8, np.uint8),
        (torch.bool, np.bool_),
    ],
)
def test_dtypes_round_trip_bit_for_bit(dtype, np_dtype) -> None:
    raw = torch.randint(0, 255, (4, 6), dtype=torch.uint8)
    t = raw.to(torch.bool) if dtype == torch.bool else raw.view(torch.int8).to(dtype)
    if dtype.is_floating_point and dtype.itemsize == 2:
        t = torch.randn(4, 6).to(dtype)
    state = to_state({"t": t})
    arr = state["t"]
    assert arr.dtype == np.dtype(np_dtype)
    assert arr.__array_interface__["data"][0] == t.data_ptr()  # a view, not a float32 copy
    back = _decoded(state)["t"]
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bits, not values


def _decoded(state):
    from checkpointer.adapters._torch_codec import decode

    return decode(_through_tree(state))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(24.0).reshape(4, 6)[::2, 1::3],
        lambda: torch.arange(16).to(torch.bfloat16).reshape(4, 4).t(),
        lambda: torch.zeros(0, 3),
        lambda: torch.zeros(0, dtype=torch.bfloat16),
        lambda: torch.tensor(3.5),
    ],
    ids=["transposed", "strided", "bf16-transposed", "zero-size", "zero-bf16", "0-d"],
)
def test_non_contiguous_zero_size_and_scalar_tensors(make) -> None:
    t = make()
    back = _decoded(to_state({"x": t}))["x"]
    assert back.shape == t.shape and back.dtype == t.dtype
    assert torch.equal(back.float(), t.float())


def test_tied_weights_stored_once_and_retied() -> None:
    src = _Tied()
    state = to_state(src)
    assert state["out.weight"] is None
    assert state["__torch__"]["aliases"] == [[["out.weight"], ["emb.weight"]]]
    _, arrays = tree.flatten(state)
    assert [k for k, _ in arrays] == ["emb.weight"]
    decoded = _decoded(state)
    assert decoded["out.weight"] is decoded["emb.weight"]
    dst = _Tied()
    assert not load_state(dst, _through_tree(state))
    assert dst.out.weight is dst.emb.weight
    assert torch.equal(dst.emb.weight, src.emb.weight)


def _adam_after_steps(net: torch.nn.Module, steps: int = 3):
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        net.train()
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return opt, sched


def test_optimizer_and_scheduler_round_trip_then_identical_steps() -> None:
    net = _net(0)
    opt, sched = _adam_after_steps(net)
    state = _through_tree(to_state({"model": net, "optimizer": opt, "scheduler": sched}))
    assert state["optimizer"]["state"]["__torch__"]["int_keys"] == ["0", "1", "2", "3", "4", "5"]
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)

    net2 = _net(1)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7)
    assert not load_state({"model": net2, "optimizer": opt2, "scheduler": sched2}, state)
    assert sched2.state_dict() == sched.state_dict()
    for k, v in opt.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(opt2.state_dict()["state"][k][name], t), (k, name)
    x = torch.randn(5, 3)
    for o, n in ((opt, net), (opt2, net2)):
        o.zero_grad()
        n(x).pow(2).mean().backward()
        o.step()
    _assert_same(net.state_dict(), net2.state_dict())


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    ],
    ids=["onecycle", "plateau", "cosine"],
)
def test_other_schedulers_round_trip(make_sched) -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = make_sched(opt)
    opt.step()
    sched.step(1.0) if isinstance(
        sched, torch.optim.lr_scheduler.ReduceLROnPlateau
    ) else sched.step()
    fresh = make_sched(torch.optim.SGD(_net().parameters(), lr=0.1, momentum=0.9))
    load_state(fresh, _through_tree(to_state(sched)))
    assert fresh.state_dict() == sched.state_dict()


def test_grad_scaler_round_trip() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    fresh = torch.amp.GradScaler("cpu")
    load_state(fresh, _through_tree(to_state(scaler)))
    assert fresh.state_dict() == scaler.state_dict()


def test_strict_load_lists_missing_unexpected_and_mismatched() -> None:
    state = to_state(torch.nn.Linear(3, 4))
    state["extra"] = np.zeros(2, np.float32)
    dst = torch.nn.Module()
    dst.weight = torch.nn.Parameter(torch.zeros(5, 3))
    dst.other = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(StateTreeError) as info:
        load_state(dst, state)
    msg = str(info.value)
    assert "missing keys: other" in msg and "unexpected keys: bias, extra" in msg
    assert "weight (stored (4, 3), expected (5, 3))" in msg
    assert isinstance(info.value, CheckpointError)


def test_non_strict_load_reports_and_warns(caplog) -> None:
    src = torch.nn.Linear(3, 4)
    dst = torch.nn.Linear(3, 4, bias=False)
    with caplog.at_level(logging.WARNING, logger="checkpointer"):
        report = load_state({"m": dst}, {"m": to_state(src), "epoch": 3}, strict=False)
    assert report == LoadReport(unexpected=("m/bias",))
    assert torch.equal(dst.weight, src.weight)
    assert "m/bias" in caplog.text


def test_missing_object_state_is_an_error_unless_non_strict() -> None:
    net = _net()
    with pytest.raises(StateTreeError, match="no state for 'optimizer'"):
        load_state(
            {"model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=1)},
            {"model": to_state(net)},
        )


def test_optimizer_of_another_shape_is_a_clear_error() -> None:
    opt, _ = _adam_after_steps(_net())
    other = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(StateTreeError, match="Adam.load_state_dict refused"):
        load_state(other, to_state(opt))


class _Odd:
    def __init__(self, value) -> None:
        self.value = value

    def state_dict(self):
        return {"ok": 1, "nested": {"fn": self.value}}

    def load_state_dict(self, state) -> None:
        self.loaded = state


@pytest.mark.parametrize("bad", [lambda: 1, object(), {1.5: 2}, {("a",): 1}])
def test_non_leaf_values_are_refused_naming_the_key(bad) -> None:
    with pytest.raises(StateTreeError, match=r"\['nested'\]"):
        to_state(_Odd(bad))


def test_reserved_key_collision_is_refused() -> None:
    with pytest.raises(StateTreeError, match="reserved"):
        to_state({"__torch__": torch.zeros(1)})


def test_any_state_dict_object_round_trips_int_keys() -> None:
    obj = _Odd({3: torch.ones(2), "3x": (1, None, "s")})
    state = _through_tree(to_state(obj))
    load_state(obj, state)
    assert list(obj.loaded["nested"]["fn"]) == [3, "3x"]
    assert torch.equal(obj.loaded["nested"]["fn"][3], torch.ones(2))


def test_rng_state_round_trip() -> None:
    state = _through_tree(rng_state())
    first = (
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )
    set_rng_state(state)
    again = (
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )
    assert first == again
    assert isinstance(state["numpy"], tuple) and state["numpy"][0] == "MT19937"


def test_rng_state_rejects_unknown_entries() -> None:
    with pytest.raises(StateTreeError, match="unknown entries"):
        set_rng_state({"jax": 1})


def test_load_into_plain_object_is_an_error() -> None:
    with pytest.raises(StateTreeError, match="no load_state_dict"):
        load_state(3, {})


_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.int64,
    torch.bool,
]


def _tensors():
    from hypothesis import strategies as st

    @st.composite
    def make(draw):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
        seed = draw(st.integers(0, 2**16))
        raw = torch.randint(
            0,
            256,
            (max(1, int(np.prod(shape))) * 8,),
            generator=torch.Generator().manual_seed(seed),
        )
        t = raw.to(torch.uint8)[: int(np.prod(shape)) * dtype.itemsize]
        t = (t % 2).to(torch.bool) if dtype == torch.bool else t.view(dtype)
        t = t.reshape(shape)
        return t.t() if t.dim() == 2 and draw(st.booleans()) else t

    return make()


def test_codec_round_trips_any_nest_of_tensors_and_plain_values() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from checkpointer.adapters._torch_codec import decode, encode

    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=5), _tensors()
    )
    keys = st.one_of(
        st.text(min_size=0, max_size=4).filter(lambda k: k != "__torch__"), st.integers(-5, 50)
    )
    nests = st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(keys, inner, max_size=3).filter(
                lambda d: len({str(k) for k in d}) == len(d)
            ),
        ),
        max_leaves=8,
    )

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return (
                isinstance(b, torch.Tensor)
                and a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
            )
        if isinstance(a, dict):
            return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return type(a) is type(b) and a == b

    @settings(max_examples=40, deadline=None)
    @given(
        st.dictionaries(keys, nests, max_size=4).filter(
            lambda d: len({str(k) for k in d}) == len(d)
        )
    )
    def check(state) -> None:
        assert same(state, decode(_through_tree(encode(state))))

    check()
