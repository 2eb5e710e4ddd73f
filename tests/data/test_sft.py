"""SFT data on `datasets`: formats and loss masks, bad input, caching, packing equivalence, exact resume."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from lightning_automodel.core.packing import pack_thd, plan_rows
from lightning_automodel.data import formats
from lightning_automodel.data.formats import CUT, DROPPED, IGNORE, KEPT, tokenize_messages, tokenize_prompt_completion
from lightning_automodel.data import DataError, SFTCollator, SFTDataModule

REPO = Path(__file__).resolve().parents[2]
SFT = REPO / "lightning_automodel" / "data" / "corpus" / "sft"
TOKENIZER = SFT / "tiny-tokenizer"


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)


def _rows(name: str, n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (SFT / name).read_text().splitlines() if line.strip()]
    return rows[:n] if n else rows


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _module(tmp_path: Path, files, **kwargs) -> SFTDataModule:
    kwargs.setdefault("tokenizer_path", str(TOKENIZER))
    kwargs.setdefault("seq_length", 128)
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("val_fraction", 0.0)
    kwargs.setdefault("packing", True)
    return SFTDataModule(train_files=files, cache_dir=str(tmp_path / "cache"), **kwargs)


# ---- formats and loss masks -----------------------------------------------------------------------


def _independent_chat_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Targets located in the rendered text by a regex over the template's markers (not by prefix renders)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = [(m.start(1), m.end(1)) for m in re.finditer(r"<\|assistant\|>(.*?<\|end\|>)", text)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [i if any(s <= a < e for s, e in spans) and a < b else IGNORE for i, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def test_chat_masks_match_the_rendered_template():
    tokenizer = _tokenizer()
    for row in _rows("sft_chat.jsonl", 12):
        ids, labels, status = tokenize_messages(tokenizer, row["messages"], 512)
        want_ids, want_labels = _independent_chat_labels(tokenizer, row["messages"])
        assert status == KEPT and ids == want_ids and labels == want_labels
        # The targets are exactly the assistant contents, each followed by its end-of-turn token.
        targets = tokenizer.decode([t for t in labels if t != IGNORE])
        expected = " ".join(f"{m['content']} <|end|>" for m in row["messages"] if m["role"] == "assistant")
        assert targets == expected
    ids, labels, _ = tokenize_messages(tokenizer, _rows("sft_chat.jsonl", 1)[0]["messages"], 512, mask_prompt=False)
    assert labels == ids


def test_prompt_completion_masks_and_truncation_is_counted():
    tokenizer = _tokenizer()
    prompt, completion = "Ada has 3 cats and finds 2 more .", "Ada has 5 cats ."
    n_prompt = 1 + len(tokenizer.encode(prompt, add_special_tokens=False))  # BOS + prompt
    n_completion = len(tokenizer.encode(completion, add_special_tokens=False)) + 1  # + EOS
    ids, labels, status = tokenize_prompt_completion(tokenizer, prompt, completion, 128)
    assert status == KEPT and len(ids) == n_prompt + n_completion
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    ids, labels, status = tokenize_prompt_completion(tokenizer, prompt, completion, n_prompt + 2)
    assert status == CUT and len(ids) == n_prompt + 2 and labels[n_prompt:] == ids[n_prompt:]
    assert tokenize_prompt_completion(tokenizer, prompt, completion, n_prompt)[2] == DROPPED


def test_module_reports_cut_and_dropped_samples_and_never_trains_on_a_dropped_answer(tmp_path):
    sentence = "Ada has 3 cats ."  # 5 tokens
    cut_prompt = " ".join([sentence] * 24) + " Bo has"  # BOS + 122 tokens: 5 of the 6 completion tokens fit
    dropped_prompt = " ".join([sentence] * 25) + " Bo has 2"  # BOS + 128 tokens: no completion token fits
    rows = [{"prompt": cut_prompt, "completion": "Ada has 5 cats ."}] * 3
    rows += [{"prompt": dropped_prompt, "completion": "Ada has 5 cats ."}] * 2
    rows += _rows("sft_prompt_completion.jsonl", 20)
    dm = _module(tmp_path, _write_jsonl(tmp_path / "pc.jsonl", rows), seq_length=128)
    dm.setup("fit")
    assert dm.stats["samples"] == 25 and dm.stats["cut"] == 3 and dm.stats["dropped"] == 2
    for row in dm.train_dataset:
        start = 0
        for n in row["seq_lens"]:
            assert any(t != IGNORE for t in row["labels"][start + 1 : start + n])  # every document has a target
            start += n


def test_column_mapping_and_file_types(tmp_path):
    import datasets

    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in _rows("sft_prompt_completion.jsonl", 40)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    results = []
    for files in (_write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "d.parquet"), str(tmp_path / "d.csv"), str(tmp_path / "saved")):
        dm = _module(tmp_path, files, columns={"prompt": "question", "completion": "answer"})
        dm.setup("fit")
        results.append(sorted(map(tuple, dm.train_dataset["input_ids"])))
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        ([{"question": "a", "reply": "b"}], {"format": "prompt_completion"}, r"bad\.jsonl.*needs column.*'prompt'.*data\.columns"),
        ([{"question": "a", "reply": "b"}], {}, r"bad\.jsonl.*fit no SFT format.*data\.columns"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
             {"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}],
            {},
            r"bad\.jsonl row 1: message 0 has role 'human'",
        ),
        ([{"prompt": "Ada has", "completion": "cats ."}] * 3, {"seq_length": 2}, r"no sample left.*Raise data\.seq_length"),
    ],
    ids=["missing-columns", "no-format", "unknown-role", "empty-after-filter"],
)
def test_bad_input_is_one_clear_error(tmp_path, rows, kwargs, match):
    dm = _module(tmp_path, _write_jsonl(tmp_path / "bad.jsonl", rows), **kwargs)
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_missing_and_mixed_sources_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"Data file '.*nope\.jsonl' does not exist"):
        _module(tmp_path, [str(tmp_path / "nope.jsonl")]).setup("fit")
    with pytest.raises(DataError, match=r"unsupported type \.xml"):
        _module(tmp_path, _write_jsonl(tmp_path / "d.xml", [{"text": "a"}])).setup("fit")
    with pytest.raises(DataError, match="one saved dataset directory alone"):
        _module(tmp_path, [str(tmp_path), str(SFT / "sft_text.jsonl")]).setup("fit")


def test_json_that_would_crash_or_leak_a_traceback_is_one_line(tmp_path):
    deep = tmp_path / "deep.jsonl"  # pyarrow's JSON reader overflowed its C stack on this line (a segfault)
    deep.write_text('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:1: the JSON line is nested too deeply"):
        _module(tmp_path, str(deep)).setup("fit")
    bad = tmp_path / "bad.jsonl"  # datasets stored the bad bytes; a raw UnicodeDecodeError came out of map
    good = b'{"prompt": "a", "completion": "b"}\n{"prompt": "'
    bad.write_bytes(good + b'\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=rf"bad\.jsonl' is not valid UTF-8: byte offset {len(good)} \(line 2\)"):
        _module(tmp_path, str(bad)).setup("fit")


def test_a_tokenizer_without_chat_template_is_refused(tmp_path):
    from tiny_tokenizer import build_tiny_tokenizer

    plain = build_tiny_tokenizer(tmp_path / "plain", ["user assistant a b"], chat_template=None)
    dm = _module(tmp_path, str(SFT / "sft_chat.jsonl"), tokenizer_path=str(plain))
    with pytest.raises(DataError, match="has no chat template.*data.chat_template"):
        dm.setup("fit")


def test_tokenization_is_cached_across_restarts(tmp_path, monkeypatch):
    files = str(SFT / "sft_chat.jsonl")
    first = _module(tmp_path, files)
    first.setup("fit")

    def boom(self, *args, **kwargs):
        raise AssertionError("re-tokenized although the cache holds this exact result")

    monkeypatch.setattr(formats.SampleTokenizer, "__call__", boom)
    second = _module(tmp_path, files)
    second.setup("fit")  # a new module (a restarted job): same fingerprint, so the cached Arrow file is read
    assert second.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    changed = _module(tmp_path, files, seq_length=96)  # a setting that changes the result: not the cached one
    with pytest.raises(AssertionError, match="re-tokenized"):
        changed.setup("fit")


# ---- packing ------------------------------------------------------------------------------------


def test_best_fit_packing_wastes_under_5_percent():
    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(5.5, 0.8)) + 8) for _ in range(1000)]  # chat-like: median ~250
    rows = plan_rows(lengths, 2048)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
    waste = 1 - sum(lengths) / (len(rows) * 2048)
    assert waste < 0.05, waste


def _tiny_llama(attn: str):
    from tiny_models import build, tiny_config

    model = build(tiny_config("llama", vocab_size=128, max_position_embeddings=512), seed=0)
    model.config._attn_implementation = attn  # noqa: SLF001 - transformers' switch between attention kernels
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "thd"])
def test_packed_batch_loss_equals_unpacked_documents(tmp_path, attn, layout):
    dm = _module(tmp_path, str(SFT / "sft_chat.jsonl"), seq_length=128, layout=layout)
    dm.setup("fit")
    rows = [dm.train_dataset[i] for i in range(3)]
    batch = dm.collator()(rows)
    model = _tiny_llama(attn)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "labels")}
    with torch.no_grad():
        # use_cache=False as HFCausalLM.forward passes it: transformers derives the documents from position_ids
        # only when there is neither a cache nor an attention mask.
        packed = model(**inputs, use_cache=False)
        docs, doc_labels = [], []
        for row in rows:
            start = 0
            for n in row["seq_lens"]:
                docs.append(row["input_ids"][start : start + n])
                doc_labels.append([IGNORE, *row["labels"][start + 1 : start + n]])
                start += n
        loss_sum, count, logits = 0.0, 0, []
        for ids, labels in zip(docs, doc_labels):
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            n_targets = sum(1 for t in labels[1:] if t != IGNORE)
            loss_sum += float(out.loss) * n_targets
            count += n_targets
            logits.append(out.logits[0])
    real = batch["labels"].reshape(-1) != IGNORE  # padding and document starts hold no target
    assert int(real.sum()) == count
    torch.testing.assert_close(float(packed.loss), loss_sum / count, rtol=1e-5, atol=1e-5)
    # Per token: every real position of the packed batch equals the document run alone.
    flat = packed.logits.reshape(-1, packed.logits.shape[-1])
    if layout == "thd":
        torch.testing.assert_close(flat[: sum(map(len, docs))], torch.cat(logits), rtol=1e-4, atol=1e-4)
    else:
        offset = 0
        for r, row in enumerate(rows):
            start = r * batch["input_ids"].shape[1]
            for n in row["seq_lens"]:
                torch.testing.assert_close(flat[start : start + n], logits[offset], rtol=1e-4, atol=1e-4)
                start += n
                offset += 1
    # Control: without the per-document positions, attention crosses documents and the loss differs.
    with torch.no_grad():
        crossed = model(input_ids=inputs["input_ids"], labels=inputs["labels"], use_cache=False)
    assert (crossed.logits - packed.logits).abs().max() > 1e-2


def test_packed_rows_report_padding_waste(tmp_path):
    dm = _module(tmp_path, str(SFT / "sft_chat.jsonl"), seq_length=128)
    dm.setup("fit")
    tokens = sum(len(r) for r in dm.train_dataset["input_ids"])
    assert dm.stats["tokens"] == tokens
    assert dm.stats["padding_waste"] == pytest.approx(1 - tokens / (128 * len(dm.train_dataset)))
    assert dm.stats["padding_waste"] < 0.15


def test_thd_collator_keeps_the_loss_mask():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "seq_lens": [2, 3]}]
    out = SFTCollator(pad_token_id=0, layout="thd")(rows)
    assert out["labels"].tolist() == [[-100, -100, -100, 8, 9]]
    assert out["cu_seqlens"].tolist() == [[0, 2, 5]] and out["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    rows_out = SFTCollator(pad_token_id=0, pad_to=8)(rows)
    assert rows_out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 4, 5]]
    assert rows_out["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, -100, -100]]
    with pytest.raises(ValueError, match="labels must have one list per sequence"):
        pack_thd([[1, 2]], labels=[[1]])


# ---- exact mid-epoch resume ---------------------------------------------------------------------


def test_mid_epoch_resume_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    from scripts.data_sft_resume import check_resume

    check_resume(tmp_path, devices=1)


@pytest.mark.multiprocess
def test_mid_epoch_resume_on_two_ranks(tmp_path):
    from distributed import run_torchrun

    proc = run_torchrun("data_sft_resume.py", str(tmp_path), timeout=600)
    assert proc.stdout.count("OK data_sft_resume rank") == 2, proc.stdout[-3000:]


def test_a_users_data_keeps_the_sft_defaults_and_the_demo_its_own(tmp_path):
    """One module, two sets of defaults: named train_files train as SFT did (2048-token packed rows, nothing held
    out); the demo corpus (no train_files) is sized for tiny CPU models. Explicit values always win."""
    files = _write_jsonl(tmp_path / "d.jsonl", _rows("sft_prompt_completion.jsonl", 4))
    hp = SFTDataModule(train_files=files, tokenizer_path=str(TOKENIZER)).hparams
    assert (hp.seq_length, hp.packing, hp.val_fraction) == (2048, True, 0.0)
    hp = SFTDataModule().hparams
    assert (hp.seq_length, hp.packing, hp.val_fraction) == (128, False, 0.1)
    hp = SFTDataModule(train_files=files, tokenizer_path=str(TOKENIZER), seq_length=64, packing=False, val_fraction=0.2).hparams
    assert (hp.seq_length, hp.packing, hp.val_fraction) == (64, False, 0.2)
