"""The tiny word-level tokenizer with a chat template of ``lightning_automodel/data/corpus/sft/tiny-tokenizer``, built offline."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

ROLE_TOKENS = ("<|system|>", "<|developer|>", "<|user|>", "<|assistant|>", "<|tool|>")
END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(out_dir: str | Path, texts: Iterable[str], chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Train a word-level tokenizer on ``texts`` and save it (``tokenizer.json`` + config) to ``out_dir``.

    Specials: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2 (BOS), ``</s>`` 3 (EOS), then the role tokens and ``<|end|>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", *ROLE_TOKENS, END_OF_TURN]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[*ROLE_TOKENS, END_OF_TURN],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    return out
