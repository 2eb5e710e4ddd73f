"""Merge LoRA adapters into their base weights with peft's own per-layer code (no re-derived DoRA/rsLoRA math),
one outermost adapted module of a meta model at a time."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_automodel.core.lora import ADAPTER_NAME, base_checkpoint_name, inject_lora, is_adapter_name

log = logging.getLogger(__name__)

#: parameter classes of quantized bases: their storage is not the weight, so nothing can be added to it
_QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")


class LoraMergeError(ValueError):
    """The adapters cannot be merged into the base weights; the message says which and what to do instead."""


def refuse_quantized_base(model: nn.Module) -> None:
    """One line for a QLoRA model (4-/8-bit base): its adapters are exported alone, never merged."""
    for name, param in model.named_parameters():
        if type(param).__name__ in _QUANTIZED_PARAMETERS:
            raise LoraMergeError(
                f"{name} is a quantized ({type(param).__name__}) base weight: the adapters of a QLoRA model cannot be "
                "merged into it. Write the adapter directory instead (HuggingFaceCheckpoint(adapter_only=True) or "
                "export --adapter_only) and load it with PeftModel.from_pretrained(base, DIR)."
            )


class LoraMerge:
    """The state tensors each merged tensor needs, and the merge, for a LoRA ``config`` (``meta_model`` unchanged)."""

    def __init__(self, meta_model: nn.Module, config: Any, state_names: Iterable[str]) -> None:
        from peft.tuners.lora import LoraLayer

        adapted = copy.deepcopy(meta_model)
        inject_lora(adapted, config)
        # the outermost adapted modules (a ``ParamWrapper`` chain counts once)
        self._layers: dict[str, nn.Module] = {}
        for name, module in adapted.named_modules():
            if isinstance(module, LoraLayer) and not any(name.startswith(f"{outer}.") for outer in self._layers):
                self._layers[name] = module
        state = list(state_names)
        present = set(state)
        self._inputs: dict[str, tuple[str, ...]] = {}  # merged name -> state names of its module
        self._module_of: dict[str, str] = {}  # merged name -> adapted module
        self._spec_of: dict[str, str] = {}  # merged name -> state name with its shape and dtype
        owned: set[str] = set()
        for prefix, layer in self._layers.items():
            sources = tuple(f"{prefix}.{key}" for key in layer.state_dict())
            missing = [n for n in sources if n not in present]
            if missing:
                raise LoraMergeError(
                    f"the LoRA configuration adapts {prefix}, but the weights have no {missing[0]}: they were trained "
                    "with another LoRA configuration (target_modules, target_parameters, use_dora...)."
                )
            owned.update(sources)
            for source in sources:
                if not is_adapter_name(source):
                    merged = base_checkpoint_name(source)
                    self._inputs[merged], self._module_of[merged], self._spec_of[merged] = sources, prefix, source
        stray = [n for n in state if is_adapter_name(n) and n not in owned]
        if stray:
            raise LoraMergeError(
                f"{stray[0]} is a LoRA tensor the LoRA configuration does not create; the weights were trained with "
                "another configuration (target_modules, target_parameters...)."
            )
        for name in state:
            if name not in owned:
                self._spec_of[base_checkpoint_name(name)] = name
        log.debug("LoRA merge: %d adapted modules, %d merged tensors.", len(self._layers), len(self._module_of))

    def names(self) -> dict[str, str]:
        """Merged name -> the state tensor that has its shape and dtype."""
        return dict(self._spec_of)

    def is_merged(self, name: str) -> bool:
        """Whether the tensor ``name`` (an un-adapted name) is changed by the merge."""
        return name in self._module_of

    def inputs(self, merged: Sequence[str]) -> tuple[str, ...]:
        """The state tensors to fetch for ``merged`` (an adapted module: its base and all its adapters; in order, once each)."""
        return tuple(dict.fromkeys(s for name in merged for s in self._inputs.get(name, (self._spec_of[name],))))

    @torch.no_grad()
    def merge(self, merged: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors ``merged`` from the fetched state ``tensors`` (``inputs(merged)``), peft's merge applied."""
        done: dict[str, dict[str, torch.Tensor]] = {}
        out = {}
        for name in merged:
            module = self._module_of.get(name)
            if module is not None and module not in done:
                done[module] = self._merge_module(module, tensors)
            out[name] = done[module][name] if module is not None else tensors[self._spec_of[name]]
        return out

    def _merge_module(self, prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from peft.tuners.lora import LoraLayer

        layer = copy.deepcopy(self._layers[prefix])
        # assign=True keeps the streamed dtypes (a bf16 base stays bf16); bases are cloned because merge adds
        # into them in place and a fetched tensor may be the live parameter itself (one CPU device).
        local = {key: tensors[f"{prefix}.{key}"] for key in layer.state_dict()}
        local = {key: (t if is_adapter_name(key) else t.clone()) for key, t in local.items()}
        layer.load_state_dict(local, strict=True, assign=True)
        try:
            for module in layer.modules():
                if isinstance(module, LoraLayer):
                    module.merge(adapter_names=[ADAPTER_NAME])
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            raise LoraMergeError(f"peft cannot merge the adapters of {prefix} ({type(layer).__name__}): {' '.join(str(exc).split())}") from None
        return {base_checkpoint_name(f"{prefix}.{key}"): t.detach() for key, t in layer.state_dict().items() if not is_adapter_name(key)}
