"""Parameter freezing by configuration.

Semantics follow the reference's newest freeze config (NeMo AutoModel 0.7.0): four legacy modality
flags, then ``freeze_modules`` selectors, then ``unfreeze_modules`` selectors (unfreeze wins on
overlap). Two things differ on purpose:

* Legacy flags match dotted path *components* by prefix, case-insensitively: ``visual_extra`` is a
  vision module, ``context_proj`` is not a text module (the reference's substring match froze it).
* Freezing is planned first and applied second, so a bad selector leaves the model untouched, and
  the result says which rule froze each parameter.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_automodel.core.naming import canonical_name

logger = logging.getLogger(__name__)

LEGACY_FLAGS: tuple[str, ...] = (
    "freeze_vision_tower",
    "freeze_audio_tower",
    "freeze_language_model",
    "freeze_video_embedder",
)
SELECTOR_FIELDS: tuple[str, ...] = ("freeze_modules", "unfreeze_modules")
FREEZE_CONFIG_KEYS: tuple[str, ...] = (*SELECTOR_FIELDS, *LEGACY_FLAGS)

# flag -> (attribute that holds the tower, dotted name patterns matched by component prefix)
_LEGACY_RULES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "freeze_vision_tower": ("vision_tower", ("vision", "visual", "image_encoder")),
    "freeze_audio_tower": ("audio_tower", ("audio", "audio_encoder", "speech", "sound")),
    "freeze_language_model": ("language_model", ("language", "text", "llm")),
    "freeze_video_embedder": (None, ("patch_generator.video_embedder",)),
}


@dataclass(frozen=True)
class ModuleSelector:
    """Selects modules (with their whole subtree) or parameters by canonical name.

    Exactly one of ``path`` (exact match) or ``glob`` (``fnmatch.fnmatchcase``; ``*`` crosses dots)
    is set. Both are tested against every canonical module path (wrapper components stripped,
    relative to the model) and every canonical parameter name, so ``{path: model.vision_tower}``
    selects a tower, ``{path: model.norm.weight}`` one tensor and ``{glob: '*.bias'}`` every bias.
    Matching is case-sensitive, as in the reference.
    """

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

    def matches(self, canonical_path: str) -> bool:
        """Whether this selector matches one canonical module path or parameter name."""
        if self.path is not None:
            return canonical_path == self.path
        return fnmatch.fnmatchcase(canonical_path, self.glob)  # type: ignore[arg-type]

    def describe(self) -> str:
        """The selector as written in YAML (``path: X`` / ``glob: X``), for messages and rule labels."""
        return f"path: {self.path}" if self.path is not None else f"glob: {self.glob}"


@dataclass(frozen=True)
class FreezeConfig:
    """Typed freeze configuration.

    ``freeze_vision_tower=None`` means True only when neither selector list is declared (a config
    that uses selectors states trainability explicitly and gets no implicit vision freeze).
    ``None`` for a selector field means "not declared"; an empty tuple is declared but empty.
    """

    freeze_vision_tower: bool | None = None
    freeze_audio_tower: bool = False
    freeze_language_model: bool = False
    freeze_video_embedder: bool = False
    freeze_modules: tuple[ModuleSelector, ...] | None = None
    unfreeze_modules: tuple[ModuleSelector, ...] | None = None

    def __post_init__(self) -> None:
        # Built directly from Python (not through parse_freeze_config): lists become tuples so the
        # config stays hashable and immutable, and wrong types fail here rather than mid-freeze.
        for key in SELECTOR_FIELDS:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                raise TypeError(f"FreezeConfig.{key} must be a sequence of ModuleSelector; got {value!r}.")
            selectors = tuple(value)
            bad = [entry for entry in selectors if not isinstance(entry, ModuleSelector)]
            if bad:
                raise TypeError(
                    f"FreezeConfig.{key} entries must be ModuleSelector instances; got {bad!r}. "
                    "Use parse_freeze_config to build one from {path: ...} / {glob: ...} mappings."
                )
            object.__setattr__(self, key, selectors)
        for key in LEGACY_FLAGS:
            value = getattr(self, key)
            if value is None and key == "freeze_vision_tower":
                continue
            if not isinstance(value, bool):
                raise TypeError(f"FreezeConfig.{key} must be a bool; got {value!r}.")

    def effective_flags(self) -> dict[str, bool]:
        """The four legacy flags with ``freeze_vision_tower=None`` resolved (declared selectors turn it off)."""
        flags = {flag: getattr(self, flag) for flag in LEGACY_FLAGS}
        if flags["freeze_vision_tower"] is None:
            flags["freeze_vision_tower"] = self.freeze_modules is None and self.unfreeze_modules is None
        return flags


@dataclass
class FreezePlan:
    """Target ``requires_grad`` per canonical parameter name, with the rule that decided it."""

    requires_grad: dict[str, bool] = field(default_factory=dict)
    rule: dict[str, str] = field(default_factory=dict)
    #: the planned parameters by name, so applying needs no second traversal of the model
    params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    #: what the user may not expect: a flag that reached nothing, a freeze that also freezes a tied alias
    notes: list[str] = field(default_factory=list)

    def set(self, name: str, value: bool, rule: str) -> None:
        self.requires_grad[name] = value
        self.rule[name] = rule


@dataclass
class FreezeReport:
    """What freezing did: canonical parameter name -> rule label."""

    frozen: dict[str, str] = field(default_factory=dict)
    unfrozen: dict[str, str] = field(default_factory=dict)
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
    """Validate a raw freeze configuration (YAML mapping) into a :class:`FreezeConfig`.

    ``None`` gives the default config (which freezes the vision tower, as the reference's ``{}``).

    Raises:
        TypeError: ``config`` is not a mapping.
        ValueError: unknown keys (the message lists the valid ones), non-boolean flags, malformed
            selectors.
    """
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
    flags: dict[str, bool] = {}
    for key in LEGACY_FLAGS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise ValueError(f"freeze_config.{key} must be true or false; got {value!r}.")
        flags[key] = value
    selectors: dict[str, tuple[ModuleSelector, ...]] = {}
    for key in SELECTOR_FIELDS:
        if key not in config or config[key] is None:
            continue
        entries = config[key]
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
            raise ValueError(f"freeze_config.{key} must be a list of {{path: ...}} / {{glob: ...}} selectors; got {entries!r}.")
        selectors[key] = tuple(_parse_selector(entry, key) for entry in entries)
    return FreezeConfig(**flags, **selectors)


def matches_component_prefix(module_path: str, pattern: str) -> bool:
    """Whether a dotted path has components matching ``pattern`` (its last component by prefix).

    ``vision`` matches ``model.vision_tower`` and ``model.visual_extra``... but ``text`` does not match
    ``model.context_proj``. A dotted pattern (``patch_generator.video_embedder``) must match
    consecutive components. Case-insensitive.
    """
    lowered, wanted_text = module_path.lower(), pattern.lower()
    if wanted_text not in lowered:
        return False  # cheap rejection for the vast majority of paths
    components = lowered.split(".")
    wanted = wanted_text.split(".")
    head, last = wanted[:-1], wanted[-1]
    span = len(wanted)
    for start in range(len(components) - span + 1):
        if components[start : start + span - 1] == head and components[start + span - 1].startswith(last):
            return True
    return False


class _ParameterIndex:
    """Canonical parameter names, deduplicated by identity (tied weights once), and the module paths above them.

    Module paths are derived from parameter names, so matching needs no module traversal: a module
    selected by path selects every parameter name under that path (through any alias of a tied weight).
    """

    def __init__(self, model: nn.Module) -> None:
        self.first_name: dict[int, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.aliases: list[tuple[str, str]] = []  # (canonical alias name, canonical first name)
        first_name, params, aliases = self.first_name, self.params, self.aliases
        for name, param in model.named_parameters(remove_duplicate=False):
            alias = canonical_name(name)
            first = first_name.setdefault(id(param), alias)
            params.setdefault(first, param)
            aliases.append((alias, first))
        self._module_paths: set[str] | None = None

    @property
    def module_paths(self) -> set[str]:
        """Every module path that has a parameter under it."""
        if self._module_paths is None:
            paths: set[str] = set()
            for alias, _ in self.aliases:
                cut = alias.rfind(".")
                while cut > 0 and alias[:cut] not in paths:
                    paths.add(alias[:cut])
                    cut = alias.rfind(".", 0, cut)
            self._module_paths = paths
        return self._module_paths

    def names_under(self, matched_paths: set[str]) -> list[str]:
        """First names of every parameter that sits under one of ``matched_paths``."""
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
    patterns = tuple(patterns)
    tower = getattr(model, attribute, None) if attribute else None
    names = [index.first_name[id(p)] for p in tower.parameters()] if isinstance(tower, nn.Module) else []
    matched = {path for path in index.module_paths if any(matches_component_prefix(path, p) for p in patterns)}
    return names + index.names_under(matched)


def _selector_targets(index: _ParameterIndex, selector: ModuleSelector) -> list[str]:
    """Parameters a selector reaches: under every matched module path, plus parameters it names."""
    if selector.path is not None:
        names = index.names_under({selector.path})  # empty when no module has that path
    else:
        names = index.names_under({path for path in index.module_paths if selector.matches(path)})
    # A selector may also name parameters by their full canonical name: `path: model.norm.weight`, a
    # bare nn.Parameter such as attention sinks, or `glob: '*.bias'` (BitFit). The reference matches
    # module paths only, so those selectors matched nothing there.
    if selector.path is not None:
        names.extend(first for alias, first in index.aliases if alias == selector.path)
    else:
        names.extend(first for alias, first in index.aliases if selector.matches(alias))
    return names


def plan_parameter_freezing(
    model: nn.Module, config: FreezeConfig | Mapping[str, Any] | None, *, strict: bool = True
) -> FreezePlan:
    """Work out the ``requires_grad`` changes a freeze config makes, without touching the model.

    Raises:
        ValueError: with ``strict``, when a selector matches no parameter (the selector is named).
    """
    cfg = parse_freeze_config(config)
    index = _ParameterIndex(model)
    plan = FreezePlan(params=index.params)
    for flag, enabled in cfg.effective_flags().items():
        if enabled:
            targets = _tower_targets(model, index, *_LEGACY_RULES[flag])
            # the implicit vision freeze (None) says nothing when the model has no vision part
            if not targets and getattr(cfg, flag) is True:
                plan.notes.append(f"{flag} matched no parameters: this model has no such part, so it froze nothing.")
            for name in targets:
                plan.set(name, False, flag)
    for field_name, value in (("freeze_modules", False), ("unfreeze_modules", True)):
        for i, selector in enumerate(getattr(cfg, field_name) or ()):
            names = _selector_targets(index, selector)
            if strict and not names:
                raise ValueError(
                    f"freeze_config.{field_name}[{i}] selector `{selector.describe()}` matched no parameters. "
                    "Selectors match full canonical module paths relative to the Hugging Face model "
                    "(e.g. `model.vision_tower`, glob `model.layers.*.mlp`); pass strict=False to allow this."
                )
            for name in names:
                plan.set(name, value, f"{field_name}[{selector.describe()}]")
    plan.notes.extend(_tied_alias_notes(index, plan))
    return plan


def _tied_alias_notes(index: _ParameterIndex, plan: FreezePlan) -> list[str]:
    """One note per tensor a rule changed that another module shares (a tied LM head and its embedding)."""
    notes = []
    for alias, first in index.aliases:
        if alias != first and first in plan.requires_grad:
            state = "trainable" if plan.requires_grad[first] else "frozen"
            notes.append(f"{plan.rule[first]} made {first} {state}; {alias} is the same tensor (tied), so it is {state} too.")
    return notes


def apply_parameter_freezing(
    model: nn.Module, config: FreezeConfig | Mapping[str, Any] | None, *, strict: bool = True
) -> FreezeReport:
    """Freeze (and unfreeze) parameters by config; all or nothing.

    Returns:
        A :class:`FreezeReport` naming every parameter the config froze or unfroze and the rule.
    """
    plan = plan_parameter_freezing(model, config, strict=strict)
    report = FreezeReport(notes=list(plan.notes))
    for name, value in plan.requires_grad.items():
        plan.params[name].requires_grad_(value)
        (report.unfrozen if value else report.frozen)[name] = plan.rule[name]
    if report.frozen:
        logger.debug("Froze %d parameter tensors by freeze config.", len(report.frozen))  # the callback says it, once per job
    return report


def freeze_module_by_attribute_and_patterns(
    model: nn.Module, attribute_name: str | None, name_patterns: Iterable[str]
) -> list[str]:
    """Freeze the module at ``attribute_name`` and every module whose path matches a pattern.

    Patterns match dotted path components by prefix (see :func:`matches_component_prefix`). An
    attribute that is missing or ``None`` is skipped. Returns the canonical names frozen.
    """
    index = _ParameterIndex(model)
    wanted = set(_tower_targets(model, index, attribute_name, name_patterns))
    for name in wanted:
        index.params[name].requires_grad_(False)
    return sorted(wanted)
