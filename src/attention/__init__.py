"""Attention variants, selected by name.

Each variant is one module in this package that decorates its class with ``@register("<name>")``, plus one
config ``conf/attention/<name>.yaml``. Every module here is imported on first use, so adding a file is enough.

An attention config is a mapping::

    name: memsizer          # the variant
    dropout: 0.1            # options shared by every role ...
    k: 32
    decoder: {k: 4}         # ... and per-role overrides: encoder / decoder / cross
    cross: {name: softmax}  # a role may name another variant; it then starts from that variant's defaults

``build_attention(cfg, role, d_model, n_heads)`` turns it into a module.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping

from .base import ROLES, Attention, ConfigError, State

REGISTRY: dict[str, type[Attention]] = {}
# Options every variant understands, carried over when a role switches to another variant.
SHARED_OPTIONS = ("dropout",)


def register(name: str):
    def wrap(cls):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"attention name {name!r} registered twice ({REGISTRY[name]} and {cls})")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


def _load_all():
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def get(name: str) -> type[Attention]:
    if not REGISTRY or name not in REGISTRY:
        _load_all()
    if name not in REGISTRY:
        raise ConfigError(f"unknown attention variant {name!r}; available: {sorted(REGISTRY)}. "
                          f"Fix: `attention=<one of those>` (each has a config in conf/attention/).")
    return REGISTRY[name]


def role_options(cfg: Mapping, role: str) -> tuple[str, dict]:
    """Resolve a config for one role into (variant name, constructor kwargs)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; expected one of {ROLES}")
    cfg = dict(cfg)
    per_role = {r: dict(cfg.pop(r, None) or {}) for r in ROLES}
    base_name = cfg.pop("name", None)
    if base_name is None:
        raise ConfigError("attention config has no `name`; e.g. `attention=linear`")
    override = per_role[role]
    name = override.pop("name", base_name)
    if name == base_name:
        opts = {**cfg, **override}
    else:  # another variant: keep only options every variant shares
        opts = {**{k: v for k, v in cfg.items() if k in SHARED_OPTIONS}, **override}
    return name, opts


def build_attention(cfg: Mapping, role: str, d_model: int, n_heads: int, max_len: int | None = None) -> Attention:
    """``max_len`` (the model's longest sequence) is passed to variants that take it (Linformer) unless set."""
    name, opts = role_options(cfg, role)
    cls = get(name)
    params = inspect.signature(cls.__init__).parameters
    if max_len is not None and "max_len" in params and opts.get("max_len") is None:
        opts["max_len"] = max_len
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [p for p in params if p not in ("self", "d_model", "n_heads", "role")]
        unknown = sorted(set(opts) - set(valid))
        if unknown:
            raise ConfigError(f"attention {name!r} has no option(s) {unknown}; its options are {valid}. "
                              f"Fix: drop the override or pick the variant that has it.")
    return cls(d_model=d_model, n_heads=n_heads, role=role, **opts)


__all__ = ["Attention", "State", "ConfigError", "ROLES", "REGISTRY", "register", "get", "build_attention",
           "role_options"]
