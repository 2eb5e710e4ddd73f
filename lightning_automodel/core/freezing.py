"""Parameter freezing by config (the reference's 0.7.0): legacy flags, then ``freeze_modules``, then
``unfreeze_modules`` (unfreeze wins). Unlike the reference, legacy flags match path components by prefix
(its substring match froze ``context_proj`` as text) and a bad selector leaves the model untouched."""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_automodel.core.naming import canonical_name

logger = logging.getLogger(__name__)

# legacy flag -> (attribute that holds the tower, dotted name patterns matched by component prefix)
_LEGACY_RULES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "freeze_vision_tower": ("vision_tower", ("vision", "visual", "image_encoder")),
    "freeze_audio_tower": ("audio_tower", ("audio", "audio_encoder", "speech", "sound")),
    "freeze_language_model": ("language_model", ("language", "text", "llm")),
    "freeze_video_embedder": (None, ("patch_generator.video_embedder",)),
}
LEGACY_FLAGS: tuple[str, ...] = tuple(_LEGACY_RULES)
SELECTOR_FIELDS: tuple[str, ...] = ("freeze_modules", "unfreeze_modules")
FREEZE_CONFIG_KEYS: tuple[str, ...] = (*SELECTOR_FIELDS, *LEGACY_FLAGS)


class FreezeConfigError(TypeError, ValueError):
    """A freeze option of the wrong type: a TypeError for a FreezeConfig built in Python, a ValueError from YAML."""


def _is_list(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


@dataclass(frozen=True)
class ModuleSelector:
    """``path`` (exact) or ``glob`` (``fnmatchcase``, ``*`` crosses dots) over canonical module and parameter names."""

    path: str | None = None
    glob: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.glob is None):
            raise ValueError(
                f"A module selector needs exactly one of `path` or `glob`; got path={self.path!r}, glob={self.glob!r}. "
                "Write it as {path: model.vision_tower} or {glob: 'model.layers.*.mlp'}."
            )
        value = self.path if self.path is not None else self.glob
        if not isinstance(value, str) or not value:
            raise ValueError(f"A module selector value must be a non-empty string; got {value!r}.")

    def matches(self, name: str) -> bool:
        return name == self.path if self.path is not None else fnmatch.fnmatchcase(name, self.glob)  # type: ignore[arg-type]

    def describe(self) -> str:
        """The selector as written in YAML (``path: X`` / ``glob: X``), for messages and rule labels."""
        return f"path: {self.path}" if self.path is not None else f"glob: {self.glob}"


@dataclass(frozen=True)
class FreezeConfig:
    """Validated freeze config; ``freeze_vision_tower=None`` is True only when no selector list is declared."""

    freeze_vision_tower: bool | None = None
    freeze_audio_tower: bool = False
    freeze_language_model: bool = False
    freeze_video_embedder: bool = False
    freeze_modules: tuple[ModuleSelector, ...] | None = None
    unfreeze_modules: tuple[ModuleSelector, ...] | None = None

    def __post_init__(self) -> None:
        for key in SELECTOR_FIELDS:
            value = getattr(self, key)
            if value is None:
                continue
            selectors = tuple(value) if _is_list(value) else None  # lists become tuples: hashable, immutable
            if selectors is None or not all(isinstance(entry, ModuleSelector) for entry in selectors):
                raise TypeError(
                    f"FreezeConfig.{key} must be a sequence of ModuleSelector; got {value!r}. "
                    "Use parse_freeze_config to build one from {path: ...} / {glob: ...} mappings."
                )
            object.__setattr__(self, key, selectors)
        for key in LEGACY_FLAGS:
            value = getattr(self, key)
            if not isinstance(value, bool) and not (value is None and key == "freeze_vision_tower"):
                raise FreezeConfigError(f"freeze_config.{key} must be true or false; got {value!r}.")

    def effective_flags(self) -> dict[str, bool]:
        """The four legacy flags with ``freeze_vision_tower=None`` resolved (declared selectors turn it off)."""
        flags = {flag: getattr(self, flag) for flag in LEGACY_FLAGS}
        if flags["freeze_vision_tower"] is None:
            flags["freeze_vision_tower"] = self.freeze_modules is None and self.unfreeze_modules is None
        return flags


@dataclass
class FreezeReport:
    """What freezing did (or would do): canonical parameter name -> rule label."""

    frozen: dict[str, str] = field(default_factory=dict)
    unfrozen: dict[str, str] = field(default_factory=dict)
    #: what the user may not expect: a flag that reached nothing, a freeze that also freezes a tied alias
    notes: list[str] = field(default_factory=list)


def _parse_selector(entry: Any, field_name: str) -> ModuleSelector:
    if isinstance(entry, ModuleSelector):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"freeze_config.{field_name} entries must be mappings with exactly one of `path` or `glob` "
            f"(e.g. {{glob: 'model.vision_tower.*'}}); got {entry!r}."
        )
    unknown = sorted(set(entry) - {"path", "glob"})
    if unknown:
        raise ValueError(
            f"freeze_config.{field_name} entry {dict(entry)!r} has unsupported key(s) {unknown}; "
            "use exactly one of `path` or `glob`."
        )
    return ModuleSelector(path=entry.get("path"), glob=entry.get("glob"))


def parse_freeze_config(config: FreezeConfig | Mapping[str, Any] | None) -> FreezeConfig:
    """Validate a raw freeze config (TypeError/ValueError naming the field); ``None`` gives the default."""
    if config is None:
        return FreezeConfig()
    if isinstance(config, FreezeConfig):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"freeze_config must be a mapping of freeze options; got {type(config).__name__}: {config!r}.")
    unknown = sorted(set(config) - set(FREEZE_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"freeze_config has unsupported option(s) {unknown}; valid options are {sorted(FREEZE_CONFIG_KEYS)}."
        )
    values: dict[str, Any] = {key: config[key] for key in LEGACY_FLAGS if config.get(key) is not None}
    for key in SELECTOR_FIELDS:
        entries = config.get(key)
        if entries is None:
            continue
        if not _is_list(entries):
            raise ValueError(f"freeze_config.{key} must be a list of {{path: ...}} / {{glob: ...}} selectors; got {entries!r}.")
        values[key] = tuple(_parse_selector(entry, key) for entry in entries)
    return FreezeConfig(**values)


def matches_component_prefix(module_path: str, pattern: str) -> bool:
    """Whole path components match ``pattern``, the last by prefix, any case: ``text`` misses ``context_proj``."""
    return re.search(rf"(?:^|\.){re.escape(pattern)}[^.]*(?:\.|$)", module_path, re.IGNORECASE) is not None


class _ParameterIndex:
    """Canonical parameter names, tied weights once, and the module paths above them (no module traversal)."""

    def __init__(self, model: nn.Module) -> None:
        self.first_name: dict[int, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.aliases: list[tuple[str, str]] = []  # (canonical alias name, canonical first name)
        self.module_paths: set[str] = set()  # every module path with a parameter under it
        for name, param in model.named_parameters(remove_duplicate=False):
            alias = canonical_name(name)
            first = self.first_name.setdefault(id(param), alias)
            self.params.setdefault(first, param)
            self.aliases.append((alias, first))
            cut = alias.rfind(".")
            while cut > 0 and alias[:cut] not in self.module_paths:
                self.module_paths.add(alias[:cut])
                cut = alias.rfind(".", 0, cut)

    def names_under(self, matched_paths: set[str]) -> list[str]:
        """First names of every parameter (through any alias) under one of ``matched_paths``."""
        names = []
        for alias, first in self.aliases if matched_paths else ():
            cut = alias.rfind(".")  # walk the name's ancestors: cost per name is its depth, not len(matched_paths)
            while cut > 0:
                if alias[:cut] in matched_paths:
                    names.append(first)
                    break
                cut = alias.rfind(".", 0, cut)
        return names


def _tower_targets(model: nn.Module, index: _ParameterIndex, attribute: str | None, patterns: Iterable[str]) -> list[str]:
    """Parameters of the module at ``attribute`` (if it is one) plus those under paths matching a pattern."""
    tower = getattr(model, attribute, None) if attribute else None
    names = [index.first_name[id(p)] for p in tower.parameters()] if isinstance(tower, nn.Module) else []
    matched = {path for path in index.module_paths if any(matches_component_prefix(path, p) for p in patterns)}
    return names + index.names_under(matched)


def _selector_targets(index: _ParameterIndex, selector: ModuleSelector) -> list[str]:
    """Parameters under matched module paths, plus those named in full (``*.bias``: nothing in the reference)."""
    paths = {selector.path} if selector.path is not None else {p for p in index.module_paths if selector.matches(p)}
    return index.names_under(paths) + [first for alias, first in index.aliases if selector.matches(alias)]


def _plan(
    model: nn.Module, config: FreezeConfig | Mapping[str, Any] | None, strict: bool
) -> tuple[FreezeReport, dict[str, nn.Parameter]]:
    cfg = parse_freeze_config(config)
    index = _ParameterIndex(model)
    report = FreezeReport()
    changes: list[tuple[list[str], bool, str]] = []
    for flag, enabled in cfg.effective_flags().items():
        if enabled:
            targets = _tower_targets(model, index, *_LEGACY_RULES[flag])
            # the implicit vision freeze (None) says nothing when the model has no vision part
            if not targets and getattr(cfg, flag) is True:
                report.notes.append(f"{flag} matched no parameters: this model has no such part, so it froze nothing.")
            changes.append((targets, False, flag))
    for field_name, value in (("freeze_modules", False), ("unfreeze_modules", True)):
        for i, selector in enumerate(getattr(cfg, field_name) or ()):
            names = _selector_targets(index, selector)
            if strict and not names:
                raise ValueError(
                    f"freeze_config.{field_name}[{i}] selector `{selector.describe()}` matched no parameters. "
                    "Selectors match full canonical module paths relative to the Hugging Face model "
                    "(e.g. `model.vision_tower`, glob `model.layers.*.mlp`); pass strict=False to allow this."
                )
            changes.append((names, value, f"{field_name}[{selector.describe()}]"))
    decided: dict[str, tuple[bool, str]] = {}  # later rules win; the order is the first decision's
    for names, value, rule in changes:
        for name in names:
            decided[name] = (value, rule)
    for name, (value, rule) in decided.items():
        (report.unfrozen if value else report.frozen)[name] = rule
    for alias, first in index.aliases:  # a tensor a rule changed that another module shares (a tied head)
        if alias != first and first in decided:
            value, rule = decided[first]
            state = "trainable" if value else "frozen"
            report.notes.append(f"{rule} made {first} {state}; {alias} is the same tensor (tied), so it is {state} too.")
    return report, index.params


def plan_parameter_freezing(
    model: nn.Module, config: FreezeConfig | Mapping[str, Any] | None, *, strict: bool = True
) -> FreezeReport:
    """What :func:`apply_parameter_freezing` would do; with ``strict``, an unmatched selector is a ValueError."""
    return _plan(model, config, strict)[0]


def apply_parameter_freezing(
    model: nn.Module, config: FreezeConfig | Mapping[str, Any] | None, *, strict: bool = True
) -> FreezeReport:
    """Freeze (and unfreeze) parameters by config, all or nothing; the report names each parameter's rule."""
    report, params = _plan(model, config, strict)
    for names, value in ((report.frozen, False), (report.unfrozen, True)):
        for name in names:
            params[name].requires_grad_(value)
    if report.frozen:
        logger.debug("Froze %d parameter tensors by freeze config.", len(report.frozen))  # the callback says it, once per job
    return report


def freeze_module_by_attribute_and_patterns(
    model: nn.Module, attribute_name: str | None, name_patterns: Iterable[str]
) -> list[str]:
    """Freeze the module at ``attribute_name`` (if any) and paths matching a pattern; returns the names frozen."""
    index = _ParameterIndex(model)
    wanted = set(_tower_targets(model, index, attribute_name, tuple(name_patterns)))
    for name in wanted:
        index.params[name].requires_grad_(False)
    return sorted(wanted)
