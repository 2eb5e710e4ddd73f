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
