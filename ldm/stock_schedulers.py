"""The exported ``scheduler/`` config, written so that stock diffusers' sampler swaps match ours.

A user of an exported pipeline swaps samplers the diffusers way::

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

``from_config`` fills every key the saved config lacks with *that class's* default, so a config
saved from one scheduler (say DPM-Solver++) silently turns on DDIM's ``clip_sample=True`` (x0
clipped to [-1, 1] at every step) and DDPM's variance choice. We therefore save one config that
carries, for every sampler we offer, the value of every key it reads; a key is left out only where
leaving it out gives each class its own (correct) default. Where two samplers of the same class
need different values (``dpmpp_2m`` vs ``dpmpp_2m_karras``: ``use_karras_sigmas``) one of them
needs a keyword in the ``from_config`` call; ``stock_scheduler_overrides`` lists them and the
pipeline manifest records them. ``check_stock_swaps`` proves, at export time, that each
``Cls.from_config(saved, **overrides)`` is configured exactly like our ``build_sampler(name)``.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.objective import NoiseScheduleConfig
from ldm.samplers import SAMPLERS, build_sampler

_OMIT = object()


def _init_defaults(cls: type[SchedulerMixin]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "kwargs")}


def _public(config: dict[str, Any]) -> dict[str, Any]:
    """A scheduler config's init keys as JSON values (tuples become lists, as saved on disk)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def usable_samplers(schedule: NoiseScheduleConfig) -> dict[str, SchedulerMixin]:
    """Every sampler name ``build_sampler`` accepts for ``schedule``, built (a refusal skips it)."""
    out = {}
    for name in SAMPLERS:
        try:
            out[name] = build_sampler(name, schedule)
        except ValueError:
            continue
    return out


def _stock_value(cls: type[SchedulerMixin], key: str, choice: Any) -> Any:
    """What ``cls.from_config`` reads for ``key`` when the saved config has ``choice``."""
    if choice is _OMIT:
        return json.loads(json.dumps(_init_defaults(cls).get(key)))
    return choice


def stock_scheduler_config(schedule: NoiseScheduleConfig, default_sampler: str) -> dict[str, Any]:
    """The ``scheduler/scheduler_config.json`` to save: the default sampler, plus every other
    sampler's keys. Per key, the value (or leaving it out) that the most samplers read correctly,
    the default sampler always among them; ties keep the key explicit where the default sampler's
    class takes it, so the file shows e.g. ``clip_sample: false`` rather than relying on defaults."""
    built = usable_samplers(schedule)
    if default_sampler not in built:
        build_sampler(default_sampler, schedule)  # raises the sampler's own clear message
    wanted = {name: _public(s.config) for name, s in built.items()}
    default_cls = type(built[default_sampler])
    default_keys = set(_init_defaults(default_cls))
    config: dict[str, Any] = {"_class_name": default_cls.__name__, "_diffusers_version": diffusers.__version__}
    for key in sorted({k for w in wanted.values() for k in w}):
        users = [name for name, w in wanted.items() if key in w]
        candidates = [_OMIT] + [v for i, v in enumerate(wanted[n][key] for n in users)
                                if v not in [wanted[m][key] for m in users[:i]]]  # fmt: skip

        def score(choice: Any) -> tuple[bool, int, bool]:
            ok = [_stock_value(type(built[n]), key, choice) == wanted[n][key] for n in users]
            default_ok = default_sampler not in users or ok[users.index(default_sampler)]
            explicit = (choice is not _OMIT) == (key in default_keys)
            return default_ok, sum(ok), explicit

        best = max(candidates, key=score)
        if best is not _OMIT:
            config[key] = best
    return config


def stock_scheduler_overrides(schedule: NoiseScheduleConfig, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{sampler: {"class": diffusers class name, "from_config_kwargs": {...}}} for the saved config:
    the keywords ``Cls.from_config(config, **kwargs)`` needs to equal ``build_sampler(sampler)``
    (empty for almost every sampler)."""
    out = {}
    for name, ours in usable_samplers(schedule).items():
        cls = type(ours)
        wanted = _public(ours.config)
        kwargs = {k: v for k, v in wanted.items() if _stock_value(cls, k, config.get(k, _OMIT)) != v}
        out[name] = {"class": cls.__name__, "from_config_kwargs": kwargs}
    return out


def check_stock_swaps(schedule: NoiseScheduleConfig, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Build every sampler the diffusers way from ``config``; each must equal ours. Returns the overrides."""
    overrides = stock_scheduler_overrides(schedule, config)
    for name, ours in usable_samplers(schedule).items():
        cls = type(ours)
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # "config attributes ... not expected": keys for other classes
        try:
            stock = cls.from_config(config, **overrides[name]["from_config_kwargs"])
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        got, wanted = _public(stock.config), _public(ours.config)
        diff = {k: (got.get(k), v) for k, v in wanted.items() if got.get(k) != v}
        if diff:
            raise RuntimeError(
                f"{cls.__name__}.from_config(the exported scheduler config) would not sample like our "
                f"{name!r} sampler (stock value, ours: {diff}); this is a bug in ldm.stock_schedulers."
            )
    return overrides
