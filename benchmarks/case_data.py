"""Case 11: the SFT data pipeline: packing vs DataCollatorWithFlattening vs padding, and memory vs corpus size.

11a. The same tokenized SFT samples (lognormal lengths, median ~250 tokens, prompt tokens masked) turned into
batches three ways: ours (best-fit packing into 2048-token rows, then ``SFTCollator`` rows with per-document
positions), transformers' ``DataCollatorWithFlattening`` (the batch's samples concatenated into one row), and
padding to the batch's longest sample. Tokens per second of the host-side pipeline and the share of
produced tokens that is padding.

11b. Resident memory of a process that builds ``SFTDataModule`` on a corpus on disk and then reads batches,
at two corpus sizes: the slope (MiB per million tokens) says whether memory grows with the corpus.
``BENCH_DATA_TOKENS=2e6,2e8`` sets the sizes (default 1e6,4e6; smoke 5e4,2e5). The corpus is written under
/tmp and deleted afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import CaseResult, Row, alternate, rss_kib, run_probe

OURS = "ours: best-fit packed rows (SFTCollator)"
FLATTEN = "transformers DataCollatorWithFlattening"
PADDING = "padding to the batch's longest"
ROW = 2048


def samples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = max(8, min(ROW, int(rng.lognormvariate(5.5, 0.8))))
        ids = [rng.randrange(10, 30000) for _ in range(length)]
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def ours(data: list[dict[str, list[int]]], rows_per_batch: int) -> list[dict]:
    from lightning_automodel.data.sft_datamodule import PackRows, SFTCollator

    pack, collate = PackRows(ROW, packing=True), SFTCollator(pad_token_id=0, pad_to=ROW)
    rows: list[dict] = []
    for start in range(0, len(data), 1000):  # the packing window of the data module
        window = data[start : start + 1000]
        packed = pack({"input_ids": [s["input_ids"] for s in window], "labels": [s["labels"] for s in window]})
        rows += [dict(zip(packed, values)) for values in zip(*packed.values())]
    return [collate(rows[i : i + rows_per_batch]) for i in range(0, len(rows) - rows_per_batch + 1, rows_per_batch)]


def flatten(data: list[dict[str, list[int]]], per_batch: int) -> list[dict]:
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_tensors="pt")
    return [collate(data[i : i + per_batch]) for i in range(0, len(data), per_batch)]


def padding(data: list[dict[str, list[int]]], per_batch: int) -> list[dict]:
    out = []
    for i in range(0, len(data), per_batch):
        batch = data[i : i + per_batch]
        longest = max(len(s["input_ids"]) for s in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for r, s in enumerate(batch):
            ids[r, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
            labels[r, : len(s["labels"])] = torch.tensor(s["labels"])
            mask[r, : len(s["input_ids"])] = 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def pipeline_case(smoke: bool, repeats: int) -> CaseResult:
    data = samples(400 if smoke else 8000)
    tokens = sum(len(s["input_ids"]) for s in data)
    per_batch = max(1, round(4 * ROW / (tokens / len(data))))  # samples in ~4 rows' worth of tokens
    impls = {OURS: lambda: ours(data, 4), FLATTEN: lambda: flatten(data, per_batch), PADDING: lambda: padding(data, per_batch)}
    produced, real = {}, {}
    for name, fn in impls.items():
        out = fn()
        produced[name] = sum(b["input_ids"].numel() for b in out)
        real[name] = sum(int((b["input_ids"] != 0).sum()) for b in out)  # sample ids are >= 10; padding is 0
    times = alternate(impls, repeats)
    r = CaseResult(f"11. SFT data pipeline: {len(data)} samples, {tokens:,} tokens, lognormal lengths into {ROW}-token rows",
                   ours=OURS, target="at most 5% padding with packing")
    for name, values in times.items():
        r.rows.append(Row(name, [tokens / t for t in values], "tokens/s", metric="throughput"))
    waste = {name: 100 * (1 - real[name] / produced[name]) for name in impls}
    for name in impls:
        r.rows.append(Row(name, [waste[name]], "% of tokens", metric="padding"))
    r.met = None if smoke else waste[OURS] <= 5.0
    r.notes.append(f"Batches: ours 4 rows of {ROW} tokens; the others {per_batch} samples (about the same tokens). "
                   "Padding share = 1 - real tokens / tokens produced; ours drops an incomplete last batch (drop_last).")
    r.notes.append("DataCollatorWithFlattening pads nothing but its rows vary in length with the samples drawn (memory and "
                   "step time vary with them); ours has fixed rows and so fixed memory per step.")
    return r


# ---- 11b: memory vs corpus size (a fresh process per size) -----------------------------------------


WORDS = "Ada Bo Cy Dee Eli Fay has had finds found more apples books cats stones boats lamps the end so then".split()


def write_corpus(path: Path, n_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    written = 0
    with path.open("w") as f:
        while written < n_tokens:
            n = max(16, int(rng.lognormvariate(6.5, 0.7)))
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=n))}) + "\n")
            written += n + 2


def probe(n_tokens: int, workdir: str) -> None:
    """Build the module on ``n_tokens`` and read 200 batches; print resident memory as JSON."""
    from lightning_automodel.data.sft_datamodule import SFTDataModule

    tokenizer = Path(__file__).resolve().parent.parent / "lightning_automodel/data/corpus/sft/tiny-tokenizer"
    base = rss_kib()
    start = time.perf_counter()
    dm = SFTDataModule(train_files=str(Path(workdir) / "corpus.jsonl"), tokenizer_path=str(tokenizer), format="text",
                       seq_length=ROW, batch_size=4, cache_dir=str(Path(workdir) / "cache"), num_proc=2, packing=True,
                       val_fraction=0)
    dm.setup("fit")
    built = time.perf_counter() - start
    after_setup = rss_kib()
    for i, _batch in enumerate(dm.train_dataloader()):
        if i == 200:
            break
    print(json.dumps({"base_kib": base, "setup_kib": after_setup, "read_kib": rss_kib(), "peak_kib": rss_kib("VmHWM"),
                      "anon_kib": rss_kib("RssAnon"), "file_kib": rss_kib("RssFile"),
                      "tokens": dm.stats["tokens"], "build_s": built}))


def memory_case(smoke: bool) -> CaseResult:
    default = "5e4,2e5" if smoke else "1e6,4e6"
    sizes = [int(float(s)) for s in os.environ.get("BENCH_DATA_TOKENS", default).split(",")]
    results = []
    for size in sizes:
        workdir = tempfile.mkdtemp(prefix="bench-data-", dir="/tmp")
        try:
            write_corpus(Path(workdir) / "corpus.jsonl", size)
            results.append(run_probe("case_data", "probe", str(size), workdir, timeout=7200))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    counts = ", ".join(f"{x['tokens']:,}" for x in results)
    r = CaseResult(f"11b. SFTDataModule resident memory vs corpus size ({counts} tokens)",
                   ours="ours: SFTDataModule", target="report (memory flat in corpus size)")
    for x in results:
        r.rows.append(Row(f"{x['tokens']:,} tokens: RSS after reading 200 batches", [x["read_kib"] / 1024], "MiB", metric=f"{x['tokens']}"))
        r.rows.append(Row(f"{x['tokens']:,} tokens: of which anonymous (RssAnon)", [x["anon_kib"] / 1024], "MiB", metric=f"{x['tokens']}a"))
        r.rows.append(Row(f"{x['tokens']:,} tokens: build (tokenize + pack)", [x["build_s"]], "s", metric=f"{x['tokens']}b"))
    lo, hi = results[0], results[-1]
    million = max(1e-9, (hi["tokens"] - lo["tokens"]) / 1e6)
    slope = (hi["read_kib"] - lo["read_kib"]) / 1024 / million
    anon_slope = (hi["anon_kib"] - lo["anon_kib"]) / 1024 / million
    r.notes.append(f"Slope: {anon_slope:.3f} MiB of anonymous (private) memory per million tokens on disk; {slope:.3f} MiB "
                   "of total RSS, which also counts file-backed pages of the memory-mapped Arrow cache that the build "
                   "touched (page cache the kernel reclaims under pressure, shared by the ranks of a host). A corpus held "
                   "as Python lists of ints costs about 70 MiB per million tokens.")
    return r


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    return [pipeline_case(smoke, repeats), memory_case(smoke)]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "probe":
    probe(int(sys.argv[2]), sys.argv[3])
