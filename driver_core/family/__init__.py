"""Device families declared in YAML: load, validate, and run their codec.

A family (``custom_components/<domain>/family.yaml``) is pure data: the hw_types it
covers, the CBOR map its devices POST to ``/rx``, the Home Assistant entities, the
downlink commands and configurations, simulation ranges and worked examples.
Everything is checked once at load time (a bad file fails loudly with its key path)
and the codec is compiled into small per-key closures, because ``decode`` runs for
every uplink. See docs/families.md for the file format.

The package keeps one job per module: ``spec`` (what a family declares), ``schema``
(the YAML shape), ``builder`` (semantic checks, compile), ``codec`` (decode/encode),
``sim`` (simulation samplers), ``model`` (the Family) and ``loader`` (load_family).
This module re-exports the public names, so ``from driver_core.family import X`` works.
"""

from __future__ import annotations

from .codec import Decoder
from .loader import load_family
from .model import Family
from .spec import (
    BINARY_SENSOR_DEVICE_CLASSES,
    CHARSETS,
    COMMAND_PARAMETER,
    DEFAULT_CHARSET,
    DEVICE_CLASSES,
    FIELD_TYPES,
    NUMERIC_TYPES,
    RESERVED_FIELD_NAMES,
    SENSOR_DEVICE_CLASSES,
    CommandSpec,
    EntitySpec,
    Example,
    FamilyError,
    FieldSpec,
    ParameterError,
    PayloadDecodeError,
)

__all__ = [
    "BINARY_SENSOR_DEVICE_CLASSES",
    "CHARSETS",
    "COMMAND_PARAMETER",
    "DEFAULT_CHARSET",
    "DEVICE_CLASSES",
    "FIELD_TYPES",
    "NUMERIC_TYPES",
    "RESERVED_FIELD_NAMES",
    "SENSOR_DEVICE_CLASSES",
    "CommandSpec",
    "Decoder",
    "EntitySpec",
    "Example",
    "Family",
    "FamilyError",
    "FieldSpec",
    "ParameterError",
    "PayloadDecodeError",
    "load_family",
]
