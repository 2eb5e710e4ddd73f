import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_automodel.core.thd import squeeze_input_for_thd

SENTINEL = -1000


def test_reference_example():
    attn = {
        "cu_seqlens": torch.tensor([[0, 3, 5, SENTINEL]], dtype=torch.int32),
        "max_seqlen": torch.tensor([3]),
        "qkv_format": "thd",
        "mask": torch.ones(1, 5),
    }
    ids, pos, pad, out = squeeze_input_for_thd(torch.arange(5)[None], torch.arange(5)[None], None, attn)
    assert out is attn
    assert ids.shape == (5,) and pos.shape == (5,) and pad is None
    assert attn["cu_seqlens"].tolist() == [0, 3, 5] and attn["cu_seqlens"].dtype == torch.int32
    assert attn["max_seqlen"] == 3 and isinstance(attn["max_seqlen"], int)
    assert attn["qkv_format"] == "thd" and attn["mask"].shape == (5,)


def test_input_ids_none_passes_through():
    ids, pos, _, _ = squeeze_input_for_thd(None, torch.zeros(1, 4), torch.ones(1, 4), {})
    assert ids is None and pos.shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"position_ids": None, "attn": {}}, "position_ids"),
        ({"position_ids": torch.zeros(1, 4), "attn": {"max_seqlen": torch.tensor([3, 4])}}, "max_seqlen"),
        ({"position_ids": torch.zeros(1, 4), "attn": {"cu_seqlens": torch.zeros(2, 3)}}, "one packed row"),
    ],
)
def test_bad_input_is_clear_and_leaves_kwargs(kwargs, match):
    attn = dict(kwargs["attn"], other=torch.zeros(1, 4))
    snapshot = dict(attn)
    with pytest.raises(ValueError, match=match):
        squeeze_input_for_thd(torch.zeros(1, 4), kwargs["position_ids"], None, attn)
    assert attn.keys() == snapshot.keys() and all(attn[k] is snapshot[k] for k in attn)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    pad=st.integers(0, 4),
    as_tensor=st.booleans(),
)
def test_property_against_independent_model(lengths, pad, as_tensor):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor([bounds + [SENTINEL] * pad], dtype=torch.int32)
    total = bounds[-1]
    attn = {"cu_seqlens": cu, "cu_seqlens_padded": cu.clone(), "max_seqlen": torch.tensor([max(lengths)]) if as_tensor else max(lengths)}
    ids, pos, pad_mask, out = squeeze_input_for_thd(
        torch.arange(total)[None], torch.arange(total)[None], torch.zeros(1, total, dtype=torch.bool), attn
    )
    assert out["cu_seqlens"].tolist() == bounds and out["cu_seqlens_padded"].tolist() == bounds
    assert out["cu_seqlens"].is_contiguous() and out["cu_seqlens"].dtype == torch.int32
    assert out["max_seqlen"] == max(lengths)
    assert ids.tolist() == list(range(total)) and pad_mask.shape == (total,)
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    attn2 = {"cu_seqlens": cu, "cu_seqlens_padded": cu.clone(), "max_seqlen": torch.tensor([max(lengths)])}
    *_, ref_out = ref.squeeze_input_for_thd(torch.arange(total)[None], torch.arange(total)[None], None, attn2)
    assert ref_out["cu_seqlens"].tolist() == bounds and ref_out["max_seqlen"] == out["max_seqlen"]


# ---- no device sync per step: ``meta`` stands in for the GPU (reading a meta tensor back raises) ----

STAND_IN = torch.device("meta")


def _packed_batch_on_stand_in(lengths: list[int], room: int) -> dict:
    from lightning_automodel.core.packing import pack_thd

    batch = pack_thd([[7] * n for n in lengths], max_sequences=room)
    return {k: v.to(STAND_IN) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_squeeze_of_a_collated_batch_on_the_device_reads_nothing_back():
    """A boolean mask, ``nonzero`` or ``.item()`` on the device would raise here (data-dependent on meta)."""
    from lightning_automodel.callbacks import THDSqueeze

    batch = _packed_batch_on_stand_in([3, 2, 4], room=6)
    THDSqueeze().on_train_batch_start(None, None, batch, 0)
    assert batch["cu_seqlens"].device == STAND_IN and batch["cu_seqlens"].shape == (4,)
    assert batch["cu_seqlens_padded"].shape == (4,) and batch["cu_seqlens"].dtype == torch.int32
    assert batch["input_ids"].shape == (9,) and batch["labels"].shape == (9,) and batch["max_seqlen"] == 4


def test_the_count_cut_keeps_exactly_the_boundaries():
    bounds = [0, 3, 5, 9]
    attn = {"cu_seqlens": torch.tensor([bounds + [SENTINEL] * 3], dtype=torch.int32), "num_sequences": 3}
    squeeze_input_for_thd(None, torch.zeros(1, 9), None, attn)
    assert attn["cu_seqlens"].tolist() == bounds and attn["cu_seqlens"].is_contiguous()


@pytest.mark.parametrize("count", [0, 4, 2.0, True])
def test_a_wrong_sequence_count_is_one_clear_line(count):
    attn = {"cu_seqlens": torch.tensor([[0, 3, 5, SENTINEL]], dtype=torch.int32), "num_sequences": count}
    with pytest.raises(ValueError, match="num_sequences"):
        squeeze_input_for_thd(None, torch.zeros(1, 5), None, attn)


def test_a_device_batch_without_the_count_warns_once(monkeypatch, caplog):
    """Without the host count the squeeze has to read the device: it says so once, naming the fix."""
    import lightning_automodel.core.thd as thd

    monkeypatch.setattr(thd, "_warned_sync", False)
    for _ in range(2):
        attn = {"cu_seqlens": torch.tensor([[0, 3, 5, SENTINEL]], dtype=torch.int32).to(STAND_IN)}
        with caplog.at_level("WARNING", logger=thd.__name__), pytest.raises(NotImplementedError):
            squeeze_input_for_thd(None, torch.zeros(1, 5), None, attn)
    lines = [r.getMessage() for r in caplog.records if "syncs with the device" in r.getMessage()]
    assert len(lines) == 1 and "num_sequences" in lines[0], lines
