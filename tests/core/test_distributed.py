"""Rank helpers with and without a process group; cross-rank name comparison."""

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.pg import single_rank_group
from distributed import run_torchrun
from lightning_automodel.core.distributed import (
    all_reduce_sum_,
    digest_names,
    first_mismatch_across_ranks,
    get_rank_safe,
    get_world_size_safe,
    is_distributed,
    is_rank_0,
)


def test_defaults_without_env_or_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (get_rank_safe(), get_world_size_safe(), is_rank_0(), is_distributed()) == (0, 1, True, False)


def test_env_is_read_without_a_group(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (get_rank_safe(), get_world_size_safe(), is_rank_0()) == (2, 4, False)


@pytest.mark.parametrize(("var", "value"), [("RANK", "zero"), ("RANK", "1.5"), ("WORLD_SIZE", "two"), ("RANK", "")])
def test_non_integer_env_names_the_variable_and_the_fix(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    fn = get_rank_safe if var == "RANK" else get_world_size_safe
    with pytest.raises(ValueError) as err:
        fn()
    message = str(err.value)
    assert var in message and repr(value) in message and "Unset it" in message


def test_is_rank_0_raises_on_bad_rank(monkeypatch):
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        is_rank_0()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=8), max_size=6), st.randoms())
def test_digest_depends_only_on_the_set_of_names(names, rnd):
    shuffled = list(names) * 2
    rnd.shuffle(shuffled)
    assert digest_names(shuffled) == digest_names(names)
    expected = hashlib.sha256(b"".join(n.encode() + b"\0" for n in sorted(set(names)))).hexdigest()
    assert digest_names(names) == expected


def test_digest_separates_names():
    assert digest_names(["ab", "c"]) != digest_names(["a", "bc"])
    assert digest_names([]) != digest_names([""])


def test_helpers_without_and_with_a_single_rank_group(monkeypatch):
    monkeypatch.setenv("RANK", "5")  # ignored once a process group exists
    assert first_mismatch_across_ranks(["a"]) is None
    t = torch.ones(2)
    assert torch.equal(all_reduce_sum_(t), torch.ones(2))
    with single_rank_group():
        assert is_distributed() and get_rank_safe() == 0 and get_world_size_safe() == 1 and is_rank_0()
        assert first_mismatch_across_ranks(["a", "b"]) is None
        assert torch.equal(all_reduce_sum_(torch.full((2,), 3.0)), torch.full((2,), 3.0))


@pytest.mark.multiprocess
def test_two_ranks_find_the_first_mismatch():
    run_torchrun("core_rank_helpers.py", nproc=2, timeout=180)
