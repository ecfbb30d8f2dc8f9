"""Simulation samplers: plausible values for each field, exactly as decode() publishes them."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .codec import Decoder, encode_value
from .spec import FieldSpec


@dataclass(frozen=True, slots=True)
class Sim:
    """How to draw one field's value: a numeric range, a probability or choices."""

    minimum: float | None = None
    maximum: float | None = None
    probability: float | None = None
    choices: tuple[Any, ...] = ()


def make_sampler(spec: FieldSpec, sim: Sim, decoder: Decoder) -> Callable[[random.Random], Any]:
    """Sampling closure producing values exactly as decode() would publish them."""
    kind = spec.type
    if kind in ("uint", "int"):
        assert sim.minimum is not None and sim.maximum is not None
        low = math.ceil((sim.minimum - spec.offset) / spec.scale - 1e-9)
        high = math.floor((sim.maximum - spec.offset) / spec.scale + 1e-9)
        if kind == "uint":
            low = max(low, 0)
        return lambda rng: decoder(rng.randint(low, high))
    if kind == "float":
        digits = spec.decimals if spec.decimals is not None else 3
        lo, hi = sim.minimum, sim.maximum
        return lambda rng: decoder(encode_value(spec, round(rng.uniform(lo, hi), digits)))
    if kind == "bool":
        p = sim.probability or 0.0
        return lambda rng: rng.random() < p
    if kind == "bitfield":
        p = sim.probability or 0.0
        names = [name for _, name in sorted(spec.bits.items())]
        return lambda rng: [name for name in names if rng.random() < p]
    choices = sim.choices or tuple(spec.values.values())
    return lambda rng: rng.choice(choices)
