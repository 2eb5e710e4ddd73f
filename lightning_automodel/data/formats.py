"""Samples -> token ids, loss labels and a truncation status (kept, cut, dropped: never silent); the file readers."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, Literal

from lightning_automodel.core.hf_weight_files import open_regular

IGNORE = -100
KEPT, CUT, DROPPED = 0, 1, 2
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
FormatName = Literal["auto", "messages", "prompt_completion", "text"]
READ_CHUNK_BYTES = 1 << 20  # bytes read from a .txt file at a time
# Longer paragraphs (a 100 MB file on one line) are cut at a space into pieces of this size: no whole-file line held.
MAX_PIECE_CHARS = 1 << 18


class DataError(ValueError):
    """Bad training data or data settings (the CLI prints it as one line, exit code 2)."""


def _decoded_chunks(path: Path) -> Iterator[str]:
    """The file as UTF-8 text in chunks of about ``READ_CHUNK_BYTES``; a bad byte is a DataError with its offset and line."""
    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 0  # bytes and newlines decoded so far
    with open_regular(path) as f:
        for raw in chain(iter(partial(f.read, READ_CHUNK_BYTES), b""), [b""]):  # b"": the end (a cut character fails)
            data = decoder.getstate()[0] + raw  # a character split by the last chunk, then this chunk
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                line = lines + data.count(b"\n", 0, exc.start) + 1
                raise DataError(
                    f"Data file {str(path)!r} is not valid UTF-8: byte offset {offset + exc.start} (line {line}): "
                    f"{exc.reason} (byte 0x{data[exc.start]:02x}). Re-encode it as UTF-8."
                ) from None
            consumed = len(data) - len(decoder.getstate()[0])
            offset, lines = offset + consumed, lines + data.count(b"\n", 0, consumed)
            yield text


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most ``MAX_PIECE_CHARS``, cut after a space where one is near the limit."""
    while len(text) > MAX_PIECE_CHARS:
        cut = text.rfind(" ", MAX_PIECE_CHARS // 2, MAX_PIECE_CHARS) + 1 or MAX_PIECE_CHARS
        yield text[:cut]
        text = text[cut:]
    yield text


def read_paragraphs(path: Path) -> Iterator[str]:
    """The non-empty paragraphs (separated by blank lines) of a ``.txt`` file, streamed, long ones in pieces."""
    pending = ""
    for chunk in chain(_decoded_chunks(path), ["\n\n"]):  # a last separator hands out the last paragraph
        *complete, pending = (pending + chunk).split("\n\n")
        if len(pending) > MAX_PIECE_CHARS:  # one paragraph longer than a piece: hand out all but the tail
            *head, pending = _pieces(pending)
            complete += head
        yield from (p.strip() for paragraph in complete for p in _pieces(paragraph) if p.strip())


def _record(text: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not a JSON line ({exc}).") from None
    except RecursionError:  # pyarrow's JSON reader would overflow the C stack (a segfault) on such a line
        raise DataError(f"{path}:{lineno}: the JSON line is nested too deeply to be a record.") from None


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON Lines file, streamed (or of a ``.json`` file holding one array, read whole)."""
    chunks = _decoded_chunks(path)
    first = next(chunks, "")
    if first.lstrip().startswith("["):
        numbered: Iterator[tuple[int, Any]] = enumerate(_record(first + "".join(chunks), path, 1), start=1)
    else:
        numbered = ((n, _record(line, path, n)) for n, line in enumerate(_lines(chain([first], chunks)), start=1) if line.strip())
    for lineno, record in numbered:
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: each JSON record must be an object of columns; got {type(record).__name__}.")
        yield record


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    pending = ""
    for chunk in chunks:
        *complete, pending = (pending + chunk).split("\n")
        yield from complete
    yield pending


@dataclass(frozen=True)
class Columns:
    """Which dataset column holds which field (``data.columns: {prompt: question, completion: answer}``)."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str] | None) -> Columns:
        if unknown := sorted(set(mapping or {}) - set(cls.__dataclass_fields__)):
            raise DataError(
                f"data.columns: unknown field {unknown[0]!r}; the fields are {', '.join(cls.__dataclass_fields__)} "
                "(map each to a column name of your dataset)."
            )
        return cls(**(mapping or {}))

    def needed(self, fmt: str) -> list[str]:
        return {"messages": [self.messages], "prompt_completion": [self.prompt, self.completion], "text": [self.text]}[fmt]


def resolve_format(fmt: FormatName, column_names: Sequence[str], columns: Columns, source: str) -> str:
    """The concrete format for a dataset with ``column_names``; one clear line when the columns are missing."""
    names = set(column_names)
    if fmt == "auto":
        for candidate in ("messages", "prompt_completion", "text"):
            if set(columns.needed(candidate)) <= names:
                return candidate
        raise DataError(
            f"{source}: columns {sorted(names)} fit no SFT format: need {columns.messages!r} (chat messages), "
            f"{columns.prompt!r} + {columns.completion!r}, or {columns.text!r}. Map yours with data.columns, "
            "e.g. {prompt: question, completion: answer}."
        )
    if fmt not in ("messages", "prompt_completion", "text"):
        raise DataError(f"data.format must be auto, messages, prompt_completion or text; got {fmt!r}.")
    if missing := [c for c in columns.needed(fmt) if c not in names]:
        raise DataError(
            f"{source}: format {fmt!r} needs column(s) {missing} but the data has {sorted(names)}. "
            "Map them with data.columns (e.g. {" + f"{fmt.split('_')[0]}: your_column" + "}) or pick data.format."
        )
    return fmt


def _with_specials(tokenizer: Any, text: str, bos: bool = True, eos: bool = True) -> list[int]:
    """``text``'s ids between the tokenizer's BOS and EOS (each only where it has one)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    first, last = tokenizer.bos_token_id if bos else None, tokenizer.eos_token_id if eos else None
    return ([first] if first is not None else []) + ids + ([last] if last is not None else [])


def _truncate(ids: list[int], labels: list[int], seq_length: int) -> tuple[list[int], list[int], int]:
    """Cut from the right; dropped when no target survives, cut when targets were lost."""
    if len(ids) <= seq_length:
        return ids, labels, KEPT
    kept = labels[:seq_length]
    if all(label == IGNORE for label in kept[1:]):  # the first label is never a target once shifted
        return [], [], DROPPED
    return ids[:seq_length], kept, CUT


def tokenize_prompt_completion(
    tokenizer: Any, prompt: str, completion: str, seq_length: int, mask_prompt: bool = True
) -> tuple[list[int], list[int], int]:
    prompt_ids = _with_specials(tokenizer, prompt, eos=False)
    completion_ids = _with_specials(tokenizer, completion, bos=False)
    labels = (list(prompt_ids) if not mask_prompt else [IGNORE] * len(prompt_ids)) + completion_ids
    return _truncate(prompt_ids + completion_ids, labels, seq_length)


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, template: str | None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template)


def assistant_char_spans(
    tokenizer: Any, messages: list[dict[str, Any]], template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and its assistant turns' character spans, located by incremental renders."""
    full = _render(tokenizer, messages, False, template)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True, template) if i else ""
        end_text = _render(tokenizer, messages[: i + 1], False, template)
        if not (full.startswith(start_text) and full.startswith(end_text) and end_text.startswith(start_text)):
            raise DataError(
                "the chat template does not render conversations incrementally (a shorter conversation is not a prefix "
                "of the longer one), so assistant turns cannot be located for the loss mask; use data.mask_prompt: false "
                "or a template without history-dependent rewriting."
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def tokenize_messages(
    tokenizer: Any, messages: list[dict[str, Any]], seq_length: int, mask_prompt: bool = True, template: str | None = None
) -> tuple[list[int], list[int], int]:
    full, spans = assistant_char_spans(tokenizer, messages, template)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast tokenizer: chat loss masks need its "
            "offset mapping. Save the tokenizer with a tokenizer.json (transformers converts most slow tokenizers)."
        )
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not mask_prompt:
        return _truncate(ids, list(ids), seq_length)
    labels = [  # a target: a token starting inside an assistant span (empty-offset tokens never are)
        i if start != end and any(s <= start < e for s, e in spans) else IGNORE for i, (start, end) in zip(ids, enc["offset_mapping"])
    ]
    return _truncate(ids, labels, seq_length)


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}; got {type(messages).__name__}.")
    for turn, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise DataError(
                f"{where}: message {turn} has role {role!r}; the roles are {', '.join(sorted(ROLES))} "
                "(rename it in the data, e.g. human -> user, gpt -> assistant)."
            )
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {turn} ({role}) needs a string 'content'.")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to train on.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass(frozen=True)
class SampleTokenizer:
    """``datasets.map`` function (batched, with indices): rows -> ``input_ids``, ``labels``, ``status``; picklable."""

    tokenizer: Any
    fmt: str
    columns: Columns
    seq_length: int
    mask_prompt: bool
    source: str
    chat_template: str | None = None

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        # text trains on every token: no labels column (it would double the cache and its reads)
        out: dict[str, list[Any]] = {"input_ids": [], "status": []} | ({} if self.fmt == "text" else {"labels": []})
        for row, index in enumerate(indices):
            if self.fmt == "text":  # BOS + text + EOS in windows of seq_length; a window of one id predicts nothing
                ids = _with_specials(self.tokenizer, batch[self.columns.text][row] or "")
                windows = [w for i in range(0, len(ids), self.seq_length) if len(w := ids[i : i + self.seq_length]) >= 2]
                out["input_ids"] += windows
                out["status"] += [KEPT] * len(windows)
                continue
            if self.fmt == "messages":
                messages = check_messages(batch[self.columns.messages][row], f"{self.source} row {index}")
                ids, labels, status = tokenize_messages(self.tokenizer, messages, self.seq_length, self.mask_prompt, self.chat_template)
            else:
                prompt, completion = batch[self.columns.prompt][row], batch[self.columns.completion][row]
                if not isinstance(prompt, str) or not isinstance(completion, str):
                    raise DataError(
                        f"{self.source} row {index}: {self.columns.prompt!r} and {self.columns.completion!r} must be "
                        f"strings; got {type(prompt).__name__} and {type(completion).__name__}."
                    )
                ids, labels, status = tokenize_prompt_completion(self.tokenizer, prompt, completion, self.seq_length, self.mask_prompt)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
        return out
