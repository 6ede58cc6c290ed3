"""The CLI / YAML spelling of a method, ``NAME`` or ``NAME:key=value,...``, to its config object and back.

``rotate_gptaq:rotate_activations=dynamic_per_token`` is ``RotateConfig(solver=GPTAQConfig(),
activations="dynamic_per_token")``. Each option key is a method's prefix and a field
(`BaseQuantConfig.spec_keys`); a part of a composed method is named by its key (``gptq_activations=repq``,
``rotate_solver=gptaq``) and takes its own keys from the same list. This module is the one place
that reads the spelling: the recipe, ``hf-cd quantize``, `evaluate_quantized`, the deprecated
``QuantConfig(pipeline=..., extra=...)`` and the benchmarks all go through `config_from_options`.
Every result row records `config_to_spec` of the config it ran.

The deprecated ``QuantConfig(pipeline="rotate_gptaq", extra={"rotate_activations": "dynamic_per_token"})``
is the same spelling as an object; `to_typed` converts it, and it keeps working for one release.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hf_cd.quant.config import SHARED_FIELDS, BaseQuantConfig
from hf_cd.quant.method_configs import GPTQConfig, RotateConfig
from hf_cd.quant.registry import (
    PIPELINES,
    SPELLINGS,
    Pipeline,
    UnknownPipelineError,
    available_pipelines,
    get_pipeline,
    register_handler,
)

PART_KEYS: dict[tuple[type, str], str] = {
    (GPTQConfig, "activations"): "gptq_activations",
    (RotateConfig, "solver"): "rotate_solver",
}
"""Fields that hold a part (a config), and the option key that names the part's method."""
NO_SOLVER = "rtn"
"""``rotate_solver=rtn``: round to nearest, ``RotateConfig(solver=None)``."""


def parse_spec_string(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` → (name, options); values are JSON where they parse (``true``, ``0.5``), else text."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"A quantization method is spelt NAME or NAME:key=value,..., got {spec!r}.")
    name, _, text = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(
                f"{spec!r}: option {item!r} is not key=value (e.g. rotate_activations=dynamic_per_token)."
            )
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name.strip(), options


def parse_quant_spec(
    spec: str | BaseQuantConfig,
    *,
    w_bits: int | None = None,
    a_bits: int | None = None,
    extra: Mapping[str, Any] | None = None,
    **shared: Any,
) -> BaseQuantConfig:
    """The config of ``spec`` (``"repq"``, ``"rotate_gptaq:rotate_activations=dynamic_per_token"``).

    ``w_bits``, ``a_bits`` and ``shared`` (``num_calibration=16``, ``protocol=...``) set the shared
    settings. The spec's own options must all belong to its method (a misspelt one raises, with a
    did-you-mean); ``extra`` holds options for several methods at once (``--quant_extra``): each
    method takes its own keys from it and leaves the others. A config object passed as ``spec``
    gets only the bits and shared settings.
    """
    values = {**shared, **{k: v for k, v in (("w_bits", w_bits), ("a_bits", a_bits)) if v is not None}}
    if isinstance(spec, BaseQuantConfig):
        spec = to_typed(spec)
        return spec.replace(**values) if values else spec
    name, options = parse_spec_string(spec)
    return config_from_options(name, options, values, extra=extra or {})


def config_from_options(
    name: str, options: Mapping[str, Any], shared: Mapping[str, Any], *, extra: Mapping[str, Any] = {}
) -> BaseQuantConfig:
    """The config of method ``name`` with ``options`` (all must be its own) and ``extra`` (each method's own keys)."""
    if name not in SPELLINGS:
        if name in PIPELINES:  # registered by name only (deprecated register_pipeline)
            return legacy_config(name, {**extra, **options}, shared)
        close = difflib.get_close_matches(str(name), list(PIPELINES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPipelineError(
            f"Unknown quantization method {name!r}.{hint} Known: {', '.join(available_pipelines())}. "
            "Add one with hf_cd.quant.register_handler(ConfigType, pipeline)."
        )
    used: set[str] = set()
    config = _build(name, dict(options), dict(extra), dict(shared), used, frozenset())
    unknown = [key for key in options if key not in used]
    if unknown:
        known = sorted(_known_keys(config))
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown option {unknown[0]!r} for {name!r}.{hint} Its options: {', '.join(known) or 'none'}."
        )
    return config


def _build(
    name: str, options: dict, extra: dict, shared: dict, used: set[str], named: frozenset[str]
) -> BaseQuantConfig:
    """One config of the tree; ``named``: the part keys that already named a part above it (never read again)."""
    factory = SPELLINGS[name]
    defaults = factory()
    config_type = type(defaults)
    keys = config_type.spec_keys()
    values: dict[str, Any] = _runtime_settings(config_type, extra)
    for source, strict in ((extra, False), (options, True)):
        for key, value in source.items():
            if key in keys and key not in named:
                values[keys[key]] = value
                if strict:
                    used.add(key)
            elif not strict and key.startswith(config_type.spec_prefixes) and key not in _all_known_keys():
                known = sorted(keys)
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"Unknown {name} option {key!r}.{hint} Known: {', '.join(known)}.")
    for (klass, field_name), key in PART_KEYS.items():
        if isinstance(defaults, klass) and field_name in values:
            part = values[field_name]
            if isinstance(part, str):
                values[field_name] = (
                    None
                    if part == NO_SOLVER and klass is RotateConfig
                    else _part(part, options, extra, shared, used, key, named)
                )
        elif isinstance(defaults, klass) and getattr(defaults, field_name) is not None:
            values[field_name] = _part(
                getattr(defaults, field_name).name, options, extra, shared, used, key, named
            )
    try:
        return config_type(**{**defaults.options(), **values, **shared})
    except TypeError as error:
        raise ValueError(f"{name}: {error}") from None


def _runtime_settings(config_type: type, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A runtime's settings from the deprecated ``extra[config_type.extra_key]``: a settings object or a dict."""
    key = getattr(config_type, "extra_key", None)
    if key is None or key not in extra:
        return {}
    value = extra[key]
    own = [f.name for f in fields(config_type) if f.name not in SHARED_FIELDS]
    if is_dataclass(value):
        return {name: getattr(value, name) for name in own if hasattr(value, name)}
    if isinstance(value, Mapping):
        for name in value:
            if name not in own:
                close = difflib.get_close_matches(str(name), own, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"Unknown {config_type.__name__} setting {name!r} in extra[{key!r}].{hint} "
                    f"Known: {', '.join(own)}."
                )
        return dict(value)
    raise TypeError(
        f"extra[{key!r}] must be a {config_type.__name__} or a dict of its fields, got "
        f"{type(value).__name__}."
    )


def _part(
    name: str, options: dict, extra: dict, shared: dict, used: set[str], key: str, named: frozenset[str]
) -> BaseQuantConfig:
    if name not in SPELLINGS:
        raise ValueError(f"{key}={name!r} is not a registered method; known: {', '.join(sorted(SPELLINGS))}.")
    return _build(name, options, extra, shared, used, named | {key})


def _known_keys(config: BaseQuantConfig) -> set[str]:
    keys = set(type(config).spec_keys())
    for value in config.options().values():
        if isinstance(value, BaseQuantConfig):
            keys |= _known_keys(value)
    if isinstance(config, RotateConfig) and config.solver is None:
        keys |= set(GPTQConfig.spec_keys()) - {"gptq_activations"}
    return keys


def _all_known_keys() -> set[str]:
    return {key for factory in SPELLINGS.values() for key in type(factory()).spec_keys()}


def spec_options(config: BaseQuantConfig) -> dict[str, Any]:
    """The options of ``config`` that differ from its name's defaults, keyed as ``NAME:key=value`` spells them."""
    if isinstance(config, QuantConfig):
        return dict(config.extra)
    defaults = SPELLINGS[config.name]() if config.name in SPELLINGS else type(config)()
    keys = {field_name: key for key, field_name in type(config).spec_keys().items()}
    out: dict[str, Any] = {}
    for field_name, value in config.options().items():
        default = getattr(defaults, field_name)
        if isinstance(value, BaseQuantConfig):
            part_key = keys[field_name]
            if not isinstance(config, RotateConfig) and value.name != getattr(default, "name", None):
                out[part_key] = value.name
            out.update(spec_options(value))
        elif value != default and not (isinstance(config, RotateConfig) and field_name == "solver"):
            out[keys[field_name]] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def config_to_dict(config: BaseQuantConfig) -> dict[str, Any]:
    """Shared settings, ``pipeline`` (the name) and ``extra`` (the options, as ``NAME:key=value`` keys).

    The shape of the files written before the typed configs (saved models, result fingerprints, QAT
    settings); `config_from_options` reads it back.
    """
    extra = dict(config.extra) if isinstance(config, QuantConfig) else spec_options(config)
    return {**config.shared(), "pipeline": config.name, "extra": extra}


def config_to_spec(config: BaseQuantConfig) -> str:
    """The canonical ``NAME:key=value,...`` of ``config`` (only options that differ from the name's defaults)."""
    options = dict(config.extra) if isinstance(config, QuantConfig) else spec_options(config)
    text = ",".join(
        f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
        for key, value in options.items()
    )
    return f"{config.name}:{text}" if text else config.name


# --- the deprecated spelling as an object ------------------------------------------------------------

DEPRECATION = (
    "hf_cd.quant.QuantConfig(pipeline=..., extra=...) is deprecated and will be removed in the next release; "
    "use the method's config instead, e.g. RepQConfig(w_bits=4, a_bits=4) or "
    "RotateConfig(solver=GPTAQConfig(), activations='dynamic_per_token'), or parse_quant_spec('repq')."
)


@dataclass(frozen=True)
class QuantConfig(BaseQuantConfig):
    """Deprecated: one config for every method, named by ``pipeline``, its options in ``extra``."""

    pipeline: str = "repq"
    extra: dict[str, Any] = field(default_factory=dict)
    """Options keyed as ``NAME:key=value`` spells them (``{"repq_weights": "symmetric"}``)."""

    def __post_init__(self) -> None:
        if not getattr(self, "_quiet", False):
            warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=3)
        super().__post_init__()
        get_pipeline(self.pipeline)  # raises, listing the known pipelines
        to_typed(self)  # a misspelt or bad option in extra raises here, before any work

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.pipeline

    def replace(self, **changes: Any) -> QuantConfig:
        return _quietly(lambda: super(QuantConfig, self).replace(**changes))

    def to_typed(self) -> BaseQuantConfig:
        """The typed config this one stands for (itself for a pipeline registered by name only)."""
        return to_typed(self)


def _quietly(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return make()


def to_typed(config: BaseQuantConfig) -> BaseQuantConfig:
    """A typed config as it is; a deprecated `QuantConfig` converted (``pipeline`` + ``extra`` → its method's config)."""
    if not isinstance(config, QuantConfig) or config.pipeline not in SPELLINGS:
        return config
    return config_from_options(config.pipeline, {}, config.shared(), extra=config.extra)


def legacy_config(name: str, extra: dict[str, Any], shared: dict[str, Any]) -> QuantConfig:
    """A `QuantConfig` for a pipeline registered by name only (no config type of its own), without the warning."""
    return _quietly(lambda: QuantConfig(pipeline=name, extra=dict(extra), **shared))


class NamedPipeline(Pipeline):
    """Runs a `QuantConfig` whose ``pipeline`` was registered by name only (the deprecated `register_pipeline`).

    Such a pipeline may be any callable; its optional methods are looked up here, in the deprecated
    path only.
    """

    def __call__(self, model, config: QuantConfig, calibration_images):
        return get_pipeline(config.pipeline)(model, config, calibration_images)

    def _method(self, config: QuantConfig, name: str):
        return getattr(get_pipeline(config.pipeline), name, None)

    def check(self, config: QuantConfig) -> None:
        check = self._method(config, "check")
        if callable(check):
            check(config)

    def row_fields(self, config: QuantConfig) -> dict[str, Any]:
        describe = self._method(config, "row_fields")
        return describe(config) if callable(describe) else {}

    def weight_scheme(self, site, config: QuantConfig) -> str:
        scheme = self._method(config, "weight_scheme")
        return scheme(site, config) if callable(scheme) else super().weight_scheme(site, config)

    def evaluate(self, model, config: QuantConfig, calibration_images, eval_data):
        evaluate = self._method(config, "evaluate")
        return evaluate(model, config, calibration_images, eval_data) if callable(evaluate) else None

    def runtime_for(self, config: QuantConfig) -> str:
        return get_pipeline(config.pipeline).runtime


register_handler(QuantConfig, NamedPipeline(), names={}, overwrite=True)
