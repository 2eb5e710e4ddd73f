"""The hub layout of a model's weights, planned on meta per conversion group (``save_pretrained``: all at once)."""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_automodel._compat.transformers import loaded_weight_conversions, weight_conversions_set
from lightning_automodel.core.discovery import find_hf_model

#: where a checkpoint records what export needs (written by the callbacks, read by ``export``)
EXPORT_INFO_KEY = "lightning_automodel_hf_model"


class ExportError(RuntimeError):
    """The checkpoint cannot be exported; the message says why and what to do."""


@dataclass(frozen=True)
class HubModelInfo:
    """What rebuilding the Hugging Face model needs, stored in a checkpoint (``prefix``: e.g. ``"model."``)."""

    prefix: str
    model_class: str
    config: dict[str, Any]
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # A JSON string: Lightning unpickles metadata with weights_only=True, which refuses some config values (tuples).
        return {"prefix": self.prefix, "model_class": self.model_class, "config_json": json.dumps(self.config), "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HubModelInfo:
        try:
            config = json.loads(data["config_json"])
            prefix, model_class = data["prefix"], data["model_class"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the checkpoint's {EXPORT_INFO_KEY!r} entry is malformed ({type(exc).__name__}: {exc})") from None
        if not isinstance(config, dict) or not isinstance(prefix, str) or not isinstance(model_class, str):
            raise ValueError(f"the checkpoint's {EXPORT_INFO_KEY!r} entry is malformed")
        source = data.get("source")
        return cls(prefix=prefix, model_class=model_class, config=config, source=source if isinstance(source, str) else None)


def hub_model_info(prefix: str, model: nn.Module, source: str | None = None) -> HubModelInfo:
    """The :class:`HubModelInfo` of a Hugging Face ``model`` found at ``prefix`` inside a training module."""
    # the transformers class, also once FSDP2 has swapped the model's class for ``FSDP<Class>``
    model_class = next(
        (c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.") and hasattr(c, "config_class")),
        type(model).__name__,
    )
    return HubModelInfo(prefix=prefix, model_class=model_class, config=model.config.to_dict(), source=source)


def source_directory(root: nn.Module) -> str | None:
    """The local directory the weights came from (for the tokenizer), when the module's hparams or config say so."""
    hparams = getattr(root, "hparams", None) or {}
    candidate = hparams.get("pretrained_path") if hasattr(hparams, "get") else None
    if candidate is None:
        _, model = find_hf_model(root)
        candidate = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return str(Path(candidate).resolve()) if candidate and Path(candidate).is_dir() else None


def record_export_info(root: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Store what ``export`` needs in ``checkpoint``, so any LightningModule's checkpoint exports (no-op without a HF model)."""
    prefix, model = find_hf_model(root)
    if hasattr(getattr(model, "config", None), "to_dict"):
        checkpoint[EXPORT_INFO_KEY] = hub_model_info(prefix, model, source_directory(root)).to_dict()


@dataclass(frozen=True)
class HubTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ConversionGroup:
    """Module tensors reverted together and the hub tensors they become; ``inputs``: the state tensors to
    fetch when they differ from ``sources`` (LoRA: each adapted base with its adapters, merged before the reversion)."""

    sources: tuple[str, ...]
    outputs: tuple[HubTensor, ...]
    inputs: tuple[str, ...] = ()
    renamed: bool = False  # one source no converter matches: its data is the hub tensor's

    @property
    def fetch_names(self) -> tuple[str, ...]:
        return self.inputs or self.sources

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class HubLayout:
    """Every hub tensor of a model, grouped by the module tensors that produce it."""

    groups: list[ConversionGroup]

    def shards(self, max_shard_bytes: int) -> list[list[ConversionGroup]]:
        """Whole groups packed in order into files of at most ``max_shard_bytes`` (a larger group gets a file alone)."""
        shards: list[list[ConversionGroup]] = [[]]
        size = 0
        for group in self.groups:
            if shards[-1] and size + group.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(group)
            size += group.nbytes
        return shards


_CONVERSIONS: weakref.WeakKeyDictionary[nn.Module, list[Any] | None] = weakref.WeakKeyDictionary()


def _weight_conversions(model: nn.Module) -> list[Any] | None:
    """The conversions ``revert_weight_conversion`` applies to ``model`` (transformers' selection), once per model:
    transformers walks every module for them, which per group made planning quadratic in depth (160 layers: 29 s)."""
    if model in _CONVERSIONS:
        return _CONVERSIONS[model]
    conversions = loaded_weight_conversions(model)
    if conversions is None:
        from lightning_automodel._compat.transformers import PrefixChange, get_model_conversion_mapping

        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)] or None
    _CONVERSIONS[model] = conversions
    return conversions


def conversion_groups(model: nn.Module, names: list[str]) -> list[tuple[tuple[str, ...], bool]]:
    """``names`` grouped as ``revert_weight_conversion`` matches them; ``True``: a group alone, renamed (same data)."""
    from lightning_automodel._compat.transformers import WeightConverter, apply_converters, dot_natural_key

    reverse = [c.reverse_transform() for c in (_weight_conversions(model) or [])[::-1]]
    converters = [c for c in reverse if isinstance(c, WeightConverter)]
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=dot_natural_key):
        target, pattern = apply_converters(name, converters) if converters else (name, None)
        groups.setdefault(target if pattern is not None else f"\0{name}", []).append(name)
    return [(tuple(members), key.startswith("\0")) for key, members in groups.items()]


def revert_group(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' reversion of one conversion group (module names -> hub names), not walking the model again."""
    from lightning_automodel._compat.transformers import revert_weight_conversion

    conversions = _weight_conversions(model)
    if conversions is None:
        return dict(tensors)  # what transformers returns when no conversion applies
    with weight_conversions_set(model, conversions):
        reverted = revert_weight_conversion(model, dict(tensors))
    return {name: (value[0] if isinstance(value, list) else value) for name, value in reverted.items()}


def check_state(meta_model: nn.Module, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], omit: set[str]) -> None:
    """The state is exactly the model's tensors (names, shapes, int/float); else one line, before anything is written:
    ``from_pretrained`` ignores an unknown name, initializing its weight randomly (peft's ``base_layer`` names did)."""
    expected = meta_model.state_dict()
    unknown = [n for n in specs if n not in expected and n not in omit]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        hint = " LoRA names: merge the adapters (or write the adapter directory)." if any(".base_layer." in n or ".lora_" in n for n in unknown) else ""
        raise ValueError(
            f"{unknown[0]}{more} is not a tensor of {type(meta_model).__name__}: from_pretrained would ignore it "
            f"and initialize that weight randomly, so nothing was written.{hint}"
        )
    missing = [k for k in expected if k not in specs and k not in omit]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"the weights have no tensor for {', '.join(missing[:3])}{more}, which the model's config needs.")
    for name, (shape, dtype) in specs.items():
        want = expected[name]
        if tuple(shape) != tuple(want.shape) or dtype.is_floating_point != want.is_floating_point():
            raise ValueError(
                f"tensor {name} is {dtype} {list(shape)}; the model's config needs "
                f"{'a floating-point' if want.is_floating_point() else 'an integer'} tensor of shape {list(want.shape)}."
            )


def plan_hub_layout(
    meta_model: nn.Module, module_tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], *,
    omit: set[str] = frozenset(),  # type: ignore[assignment]
    inputs: Callable[[Sequence[str]], tuple[str, ...]] | None = None,
) -> HubLayout:
    """The hub layout of ``module_tensors`` (name -> (shape, dtype)) but ``omit``; ``inputs``: ``LoraMerge.inputs``."""
    check_state(meta_model, module_tensors, omit)
    names = [n for n in module_tensors if n not in omit]
    groups = []
    seen: set[str] = set()
    for members, renamed in conversion_groups(meta_model, names):
        fake = {n: torch.empty(module_tensors[n][0], dtype=module_tensors[n][1], device="meta") for n in members}
        outputs = tuple(HubTensor(n, tuple(t.shape), t.dtype) for n, t in revert_group(meta_model, fake).items())
        clash = seen.intersection(t.name for t in outputs)
        if clash:
            raise ValueError(f"two tensor groups revert to the same hub name {sorted(clash)[0]!r}; transformers' conversion rules changed?")
        seen.update(t.name for t in outputs)
        fetched = inputs(members) if inputs is not None else members
        renamed = renamed and len(outputs) == 1
        groups.append(ConversionGroup(members, outputs, inputs=() if fetched == members else fetched, renamed=renamed))
    return HubLayout(groups=groups)


def iter_outputs(model: nn.Module, group: ConversionGroup, tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Revert one group of real tensors and check each output against the plan."""
    planned = {t.name: t for t in group.outputs}
    reverted = revert_group(model, tensors)
    if set(reverted) != set(planned):
        raise ValueError(f"reverting {group.sources[0]!r} gave {sorted(reverted)} instead of the planned {sorted(planned)}")
    for name, tensor in reverted.items():
        if tuple(tensor.shape) != planned[name].shape:
            raise ValueError(f"{name}: reverted shape {list(tensor.shape)} differs from the planned {list(planned[name].shape)}")
        yield name, tensor
