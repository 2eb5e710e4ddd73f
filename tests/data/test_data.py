import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_automodel.core.packing import pack_thd
from lightning_automodel.data import ByteTokenizer, DataError, PackedSequenceCollator, PaddingCollator, SFTDataModule
from lightning_automodel.data.formats import read_paragraphs
from lightning_automodel.data.sft_datamodule import shipped_corpus


def read_documents(files: list[str]) -> list[str]:
    return [p for name in files for p in read_paragraphs(Path(name))]


def demo(**kwargs) -> SFTDataModule:
    """The embedded demo's settings (formerly TextDataModule's defaults) of the one data module."""
    return SFTDataModule(**{"seq_length": 128, "packing": False, "val_fraction": 0.1, "test_fraction": 0.05, **kwargs})


def texts(dataset) -> list[str]:
    return [ByteTokenizer().decode(row["input_ids"]) for row in dataset]


@settings(max_examples=150, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(3, 258), min_size=1, max_size=12), min_size=1, max_size=6),
    multiple=st.integers(1, 8),
    extra_room=st.integers(0, 3),
)
def test_pack_thd_property(seqs, multiple, extra_room):
    out = pack_thd(seqs, pad_to_multiple_of=multiple, max_sequences=len(seqs) + extra_room)
    lengths = [len(s) for s in seqs]
    padded = [-(-n // multiple) * multiple for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0).tolist()
    cu_p = torch.tensor([0] + padded).cumsum(0).tolist()
    assert out["cu_seqlens"].tolist() == [cu + [-1000] * extra_room]
    assert out["cu_seqlens_padded"].tolist() == [cu_p + [-1000] * extra_room]
    assert out["input_ids"].shape == (1, sum(padded)) and out["max_seqlen"] == max(lengths)
    assert isinstance(out["max_seqlen"], int)
    for s, start in zip(seqs, cu_p[:-1]):
        assert out["input_ids"][0, start : start + len(s)].tolist() == s
        assert out["position_ids"][0, start : start + len(s)].tolist() == list(range(len(s)))
        assert out["labels"][0, start] == -100
        assert out["labels"][0, start + 1 : start + len(s)].tolist() == s[1:]
    assert int((~out["padding_mask"]).sum()) == sum(lengths)
    assert (out["labels"][out["padding_mask"]] == -100).all()


def test_pack_thd_errors():
    with pytest.raises(ValueError, match="no empty sequence"):
        pack_thd([[1], []])
    with pytest.raises(ValueError, match="do not fit"):
        pack_thd([[1], [2]], max_sequences=1)


def test_padding_collator():
    out = PaddingCollator()([[5, 6, 7], [8]])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "héllo"


def test_shipped_corpus_and_module(tmp_path):
    assert shipped_corpus() and read_documents(shipped_corpus())
    dm = demo(seq_length=32, batch_size=4, packing=True, layout="thd", cache_dir=str(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["qkv_format"] == "thd"
    assert len(dm.val_dataset) > 0


def test_jsonl_and_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    dm = demo(train_files=[str(good)], val_fraction=0, test_fraction=0, batch_size=1, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert sorted(texts(dm.train_dataset)) == ["again", "hello world"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match=r"b.jsonl.*fit no SFT format.*'text'"):
        demo(train_files=[str(bad)], cache_dir=str(tmp_path)).setup("fit")
    with pytest.raises(DataError, match="does not exist"):
        demo(train_files=[str(tmp_path / "missing.txt")]).setup("fit")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="contain no text"):
        demo(train_files=[str(empty)], cache_dir=str(tmp_path)).setup("fit")


def test_model_fit_checks():
    dm = demo(seq_length=64)
    with pytest.raises(ValueError, match="tokenizer has 259 ids but the model's embedding has 128 rows"):
        dm.check_model(vocab_size=128, max_positions=512)
    with pytest.raises(ValueError, match="seq_length=64 is above the model's max_position_embeddings=32"):
        dm.check_model(vocab_size=300, max_positions=32)
    dm.check_model(vocab_size=300, max_positions=0)  # unknown maximum: no check


def test_invalid_utf8_names_the_file_and_offset(tmp_path):
    NL = b"\n"
    good = b"hello\n\nwor"
    path = tmp_path / "bad.txt"
    path.write_bytes(good + b"\xff\xfe")
    with pytest.raises(DataError, match=rf"bad.txt' is not valid UTF-8: byte offset {len(good)} \(line {good.count(NL) + 1}\)"):
        read_documents([str(path)])
    with pytest.raises(DataError, match=rf"bad.txt' is not valid UTF-8: byte offset {len(good)}"):  # through datasets too
        demo(train_files=[str(path)], cache_dir=str(tmp_path)).setup("fit")
    jsonl = b'{"text": "a"}\n{"text": "b'
    (tmp_path / "bad.jsonl").write_bytes(jsonl + b'\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"bad\.jsonl' is not valid UTF-8: byte offset {len(jsonl)} \(line 2\)"):
        demo(train_files=[str(tmp_path / "bad.jsonl")], cache_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize("fraction", [1, 1.5, -0.1, float("nan")])
def test_val_fraction_outside_range_is_rejected(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), or 0"):
        demo(val_fraction=fraction)
    demo(val_fraction=0)  # no validation split


@pytest.mark.parametrize("test_fraction, val_fraction", [(-0.1, 0.1), (1, 0.1), (0.5, 0.5), (float("nan"), 0.1)])
def test_test_fraction_outside_range_is_rejected(test_fraction, val_fraction):
    with pytest.raises(ValueError, match="test_fraction must be in"):
        demo(val_fraction=val_fraction, test_fraction=test_fraction)


def test_train_val_test_splits_are_disjoint_whole_documents(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(f"document {i:03d} says {i * 7 % 101}" for i in range(60)))
    make = lambda: demo(  # noqa: E731
        train_files=[str(corpus)], seq_length=64, val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path)
    )
    dm = make()
    dm.setup("fit")
    windows = lambda ds: {tuple(row["input_ids"]) for row in ds}  # noqa: E731 - one window per document here
    train, val, test = windows(dm.train_dataset), windows(dm.val_dataset), windows(dm.test_dataset)
    assert (len(train), len(val), len(test)) == (48, 6, 6)
    assert not (train & val) and not (train & test) and not (val & test)
    again = make()
    again.setup("test")
    assert windows(again.test_dataset) == test  # deterministic
    none = demo(seq_length=32, test_fraction=0, cache_dir=str(tmp_path))
    none.setup("test")
    with pytest.raises(ValueError, match="no test split"):
        none.test_dataloader()


def test_batch_size_larger_than_data_names_the_numbers(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("one short document\n\nanother one\n\nthird\n")
    dm = demo(train_files=[str(small)], val_files=[str(small)], test_fraction=0, seq_length=64, batch_size=8,
                        cache_dir=str(tmp_path))
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "3 documents" in message and "3 windows" in message and "batch_size=8" in message and "tokens" in message
    with pytest.raises(DataError, match="batch_size must be at least 1"):
        demo(batch_size=0)
    ok = demo(train_files=[str(small)], val_files=[str(small)], test_fraction=0, seq_length=64, batch_size=3,
                        cache_dir=str(tmp_path))
    ok.setup("fit")
    assert len(list(ok.train_dataloader())) == 1


@pytest.mark.parametrize("class_path", ["lightning_automodel.data.TextDataModule", "lightning_automodel.data.text_datamodule.TextDataModule"])
def test_a_config_naming_the_merged_text_module_is_one_line(tmp_path, capsys, class_path):
    from lightning_automodel.cli import main

    config = tmp_path / "old.yaml"
    config.write_text(
        "model: {config: {model_type: llama, vocab_size: 260, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
        " num_attention_heads: 2, max_position_embeddings: 128}}\n"
        f"data: {{class_path: {class_path}, init_args: {{seq_length: 32}}}}\n"
    )
    capsys.readouterr()
    assert main(["plan", "--config", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "merged into SFTDataModule" in err[0] and "class_path: lightning_automodel.data.SFTDataModule" in err[0], err
