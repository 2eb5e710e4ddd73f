"""Find the Hugging Face model that callbacks and tools act on.

A LightningModule usually holds one ``PreTrainedModel`` (``self.model``); names shown to users are
relative to it, so that a YAML selector reads like the Hugging Face checkpoint (``model.layers.0``).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from lightning_automodel.core.freezing import matches_component_prefix
from lightning_automodel.core.naming import canonical_name

_NON_TEXT_TOWERS: tuple[str, ...] = ("vision", "visual", "image", "audio", "speech", "sound", "video")


def find_hf_model(root: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(prefix, model)``: the outermost ``PreTrainedModel`` in ``root`` and its attribute prefix.

    Outermost means the shallowest (fewest dotted components); among equally shallow ones, the first
    registered. A ``PreTrainedModel`` nested inside another (a LLaVA vision tower) is never chosen
    over its parent. The prefix is the dotted path of the model inside ``root`` with a trailing dot (``"model."``), or
    ``""`` when ``root`` itself is the model or holds no Hugging Face model (then ``root`` is
    returned). Wrapper components are stripped from the prefix.
    """
    if isinstance(root, PreTrainedModel):
        return "", root
    # Breadth-first, so a shallow model wins over a deeper one that a depth-first walk meets first
    # (e.g. a teacher nested in a helper module registered before ``self.model``).
    frontier: list[tuple[str, nn.Module]] = [("", root)]
    seen: set[int] = {id(root)}
    while frontier:
        next_frontier: list[tuple[str, nn.Module]] = []
        for prefix, module in frontier:
            for child_name, child in module.named_children():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                name = f"{prefix}{child_name}"
                if isinstance(child, PreTrainedModel):
                    path = canonical_name(name)  # "" when only wrappers sit above the model
                    return (f"{path}." if path else ""), child
                next_frontier.append((name + ".", child))
        frontier = next_frontier
    return "", root


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    """Canonical path of ``target`` inside ``model`` (stops at the first hit: decoders sit near the root)."""
    for name, module in model.named_modules():
        if module is target:
            return canonical_name(name)
    return None


def text_decoder_layers_path(model: nn.Module, num_layers: int | None = None) -> str | None:
    """Canonical path of the text decoder's layer list (``model.layers``, ``model.language_model.layers``).

    Found through ``get_decoder()`` when the model has it (cheap: the decoder sits near the root), else
    the first ``layers`` list (of ``num_layers`` entries when given) outside vision/audio towers.
    """
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:  # noqa: BLE001 - some remote-code models raise here; fall back to the search
            decoder = None
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, nn.ModuleList) and (num_layers is None or len(layers) == num_layers):
            path = "" if decoder is model else _module_path(model, decoder)
            if path is not None:
                return f"{path}.layers" if path else "layers"
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or (num_layers is not None and len(module) != num_layers):
            continue
        path = canonical_name(name)
        if (path == "layers" or path.endswith(".layers")) and not any(
            matches_component_prefix(path, tower) for tower in _NON_TEXT_TOWERS
        ):
            return path
    return None
