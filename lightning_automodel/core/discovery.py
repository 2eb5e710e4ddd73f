"""Find the Hugging Face model callbacks act on (user-facing names are relative to it, like the checkpoint's)
and its text decoder's layers."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from lightning_automodel.core.freezing import matches_component_prefix
from lightning_automodel.core.naming import canonical_name

_NON_TEXT_TOWERS: tuple[str, ...] = ("vision", "visual", "image", "audio", "speech", "sound", "video")


def find_hf_model(root: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, model)`` of the shallowest, then first, ``PreTrainedModel`` in ``root`` (never a nested LLaVA
    vision tower nor a deeper teacher registered first); ``("", root)`` when ``root`` is it or holds none."""
    if isinstance(root, PreTrainedModel):
        return "", root
    found = [(name.count("."), name, m) for name, m in root.named_modules() if isinstance(m, PreTrainedModel)]
    if not found:
        return "", root
    _, name, model = min(found, key=lambda item: item[0])  # the first of the shallowest
    path = canonical_name(name)  # "" when only wrappers sit above the model
    return (f"{path}." if path else ""), model


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    """Canonical path of ``target`` inside ``model`` (stops at the first hit: decoders sit near the root)."""
    for name, module in model.named_modules():
        if module is target:
            return canonical_name(name)
    return None


def text_decoder_layers_path(model: nn.Module, num_layers: int | None = None) -> str | None:
    """The text decoder's layer list path: via ``get_decoder()``, else the first ``layers`` outside other towers."""
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
