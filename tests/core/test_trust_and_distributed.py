import os
from pathlib import Path

import pytest

from lightning_automodel.core.distributed import digest_names, first_mismatch_across_ranks, get_rank_safe, get_world_size_safe, is_rank_0
from lightning_automodel.model_utils import resolve_trust_remote_code


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("nvidia/Nemotron-H-8B", True),
        (Path("nvidia/Nemotron-H-8B"), True),
        ("NVIDIA/x", False),
        ("nvidia/../x", False),
        ("./nvidia/x", False),
        ("nvidia//x", False),
        ("/nvidia/x", False),
        ("nvidia/x/y", False),
        ("nvidia/..", False),
        ("meta-llama/Llama-3.1-8B", False),
        (None, False),
        ("", False),
    ],
)
def test_trust_whitelist(path, expected):
    assert resolve_trust_remote_code(path) is expected


def test_local_directory_named_like_the_org_is_never_trusted(tmp_path, monkeypatch):
    (tmp_path / "nvidia" / "foo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_trust_remote_code("nvidia/foo") is False


def test_extra_trusted_orgs():
    assert resolve_trust_remote_code("myorg/model", trusted_orgs=("nvidia", "myorg"))


def test_reference_accepts_path_tricks_we_reject():
    mu = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    assert mu.resolve_trust_remote_code("nvidia/../x") is True
    assert resolve_trust_remote_code("nvidia/../x") is False


def test_rank_helpers_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert get_rank_safe() == 3 and get_world_size_safe() == 8 and not is_rank_0()
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero' is not an integer"):
        get_rank_safe()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert get_rank_safe() == 0 and get_world_size_safe() == 1 and is_rank_0()


def test_digest_is_order_independent_and_no_group_no_mismatch():
    assert digest_names(["a", "b"]) == digest_names(["b", "a", "a"])
    assert digest_names(["a"]) != digest_names(["b"])
    assert first_mismatch_across_ranks(["x"]) is None


@pytest.mark.parametrize("path", ["nvidia/x\n", "nvidia/x\r\n", "nvidia/x ", "\nnvidia/x", "nvidia/x\x00"])
def test_trailing_characters_are_not_trusted(path):
    # "$" matched before a trailing newline: "nvidia/x\n" was trusted.
    assert resolve_trust_remote_code(path) is False


def test_trusted_orgs_as_a_string_is_one_org():
    # A plain string used to be iterated: "nvidia" trusted the orgs "n", "v", "i", ...
    assert resolve_trust_remote_code("n/x", trusted_orgs="nvidia") is False
    assert resolve_trust_remote_code("v/x", trusted_orgs="nvidia") is False
    assert resolve_trust_remote_code("nvidia/x", trusted_orgs="nvidia") is True
    assert resolve_trust_remote_code("myorg/x", trusted_orgs="myorg") is True
