"""Bit plans: which logical linear gets which quantization spec.

A plan is data. It maps unit names (see :mod:`moe_ao.discovery`) to a :class:`QuantSpec`,
round-trips through a small versioned JSON format, and is saved with every quantized
checkpoint. Units a plan does not name stay as they are.

JSON format (version 1), meant to be edited by hand::

    {
      "format": "moe_ao.plan",
      "version": 1,
      "defaults": {"group_size": 64, "symmetric": true},
      "allow_low_bit_router": false,
      "units": {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.mlp.experts.5.down_proj": {"bits": 3, "group_size": 32}
      },
      "meta": {"strategy": "uniform", "budget_bits": 2.5}
    }

A unit's value is either its bit width (the defaults fill in the rest) or an object
overriding any spec field. Bits 16 means "keep this unit in floating point" explicitly.
``"act_bits": 8`` (per unit, or in ``defaults`` for every quantized unit) also quantizes
the unit's input activations per token to int8 at run time (W+A, e.g. W4A8).
"""

from __future__ import annotations

import difflib
import json
import operator
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from moe_ao.discovery import as_units

PLAN_FORMAT = "moe_ao.plan"
PLAN_VERSION = 1
ALLOWED_BITS = (2, 3, 4, 8, 16)
ALLOWED_ACT_BITS = (None, 8)  # None: activations stay in the model dtype
FLOAT_BITS = 16  # "not quantized": the unit keeps its floating-point weight
ROUTER_MIN_BITS = 8  # routers below 8 bits flip top-k choices; needs an explicit opt-in
SCALE_BITS = 16  # scales are stored in the model's 16-bit dtype
ZERO_BITS = 8  # asymmetric zero points are stored as uint8
# The JSON form's keys; anything else is refused by name (a typo must not be ignored).
TOP_KEYS = ("format", "version", "defaults", "allow_low_bit_router", "units", "meta")
DEFAULT_KEYS = ("group_size", "symmetric", "act_bits")


def _unknown_key_error(where: str, key: str, allowed: Iterable[str]) -> ValueError:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{where}: unknown key {key!r}{hint} (allowed: {', '.join(allowed)})")


def _as_int(value: Any, what: str) -> int:
    """An integer from an int, a NumPy integer or an integer 0-d tensor; bools and floats are refused."""
    boolean = str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    if isinstance(value, (bool, float)) or getattr(value, "ndim", 0) != 0 or boolean:
        raise TypeError(f"{what}={value!r} must be an int")
    try:
        return operator.index(value)  # int, numpy.int64, torch.tensor(4)
    except TypeError:
        raise TypeError(f"{what}={value!r} must be an int, got {type(value).__name__}") from None


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    raise TypeError(f"{what}={value!r} must be true or false, got {type(value).__name__}")


@dataclass(frozen=True)
class QuantSpec:
    """How one unit is quantized.

    Attributes:
        bits: 2, 3, 4 or 8 for integer codes; 16 keeps the unit in floating point.
        group_size: input columns sharing one scale (and zero point).
        symmetric: implicit zero point (True) or a stored uint8 zero point (False).
        act_bits: None, or 8 to quantize the unit's input activations per token to
            symmetric int8 at run time (quantized units only).
    """

    bits: int
    group_size: int = 128
    symmetric: bool = True
    act_bits: int | None = None

    def __post_init__(self) -> None:
        # Normalised here (numpy / torch integers become int) so that a plan always saves as JSON.
        try:
            bits = _as_int(self.bits, "bits")
        except TypeError as e:
            raise ValueError(f"{e}; allowed: {ALLOWED_BITS}") from None
        if bits not in ALLOWED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; allowed: {ALLOWED_BITS}")
        group_size = _as_int(self.group_size, "group_size")
        if group_size <= 0:
            raise ValueError(f"group_size={self.group_size!r} must be a positive int")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "symmetric", _as_bool(self.symmetric, "symmetric"))
        if isinstance(self.act_bits, bool) or self.act_bits not in ALLOWED_ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits!r} is not supported; allowed: {ALLOWED_ACT_BITS}")
        if self.act_bits is not None and not self.quantized:
            raise ValueError(f"act_bits={self.act_bits} needs quantized weights; bits={self.bits} keeps the unit float")

    @property
    def quantized(self) -> bool:
        """Whether the unit gets integer codes (bits < 16)."""
        return self.bits < FLOAT_BITS

    def storage_bits(self) -> float:
        """True bits per weight: codes plus the amortised scale (and zero point)."""
        if not self.quantized:
            return float(FLOAT_BITS)
        extra = SCALE_BITS + (0 if self.symmetric else ZERO_BITS)
        return self.bits + extra / self.group_size


class Plan(Mapping[str, QuantSpec]):
    """An ordered mapping from unit name to :class:`QuantSpec`.

    Args:
        units: unit name -> bits (int) or QuantSpec or a dict of QuantSpec fields.
        group_size: default group size for units given as plain bits.
        symmetric: default symmetry for units given as plain bits.
        act_bits: default activation bits of the quantized units (None or 8).
        allow_low_bit_router: permit routers below 8 bits.
        meta: free-form provenance (strategy, budget, scores), saved with the plan.

    Raises:
        ValueError: a spec is malformed (names the unit and the allowed values).
    """

    def __init__(
        self,
        units: Mapping[str, int | QuantSpec | Mapping[str, Any]] | None = None,
        *,
        group_size: int = 128,
        symmetric: bool = True,
        allow_low_bit_router: bool = False,
        meta: Mapping[str, Any] | None = None,
        act_bits: int | None = None,
    ) -> None:
        try:
            self.defaults = QuantSpec(bits=4, group_size=group_size, symmetric=symmetric, act_bits=act_bits)
        except (ValueError, TypeError) as e:
            raise ValueError(f"plan defaults: {e}") from None
        self.allow_low_bit_router = _as_bool(allow_low_bit_router, "allow_low_bit_router")
        if meta is not None and not isinstance(meta, Mapping):
            raise TypeError(f"plan meta must be a mapping (a JSON object), got {type(meta).__name__}")
        self.meta: dict[str, Any] = dict(meta or {})
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"plan meta must hold JSON values only (it is saved with the checkpoint): {e}") from None
        if units is not None and not isinstance(units, Mapping):
            raise TypeError(f"plan units must map unit names to specs (a JSON object), got {type(units).__name__}")
        self._specs: dict[str, QuantSpec] = {}
        for name, value in (units or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"plan unit names must be non-empty strings, got {name!r}")
            try:
                self._specs[name] = self._as_spec(value)
            except (ValueError, TypeError) as e:
                raise ValueError(f"plan entry {name!r}: {e}") from None

    def _as_spec(self, value: int | QuantSpec | Mapping[str, Any]) -> QuantSpec:
        if isinstance(value, QuantSpec):
            return value
        base = {"group_size": self.defaults.group_size, "symmetric": self.defaults.symmetric}
        if isinstance(value, Mapping):
            allowed = [f.name for f in fields(QuantSpec)]
            for key in value:
                if key not in allowed:
                    raise _unknown_key_error("spec", key, allowed)
            if "bits" not in value:
                raise ValueError(f"spec {dict(value)!r} lacks 'bits'")
            return QuantSpec(**(base | self._default_act(value["bits"]) | dict(value)))
        return QuantSpec(bits=value, **base, **self._default_act(value))

    def _default_act(self, bits: Any) -> dict[str, Any]:
        """The default act_bits, for quantized bits only (a float unit has no activations to quantize)."""
        quantized = bits in ALLOWED_BITS and bits != FLOAT_BITS
        return {"act_bits": self.defaults.act_bits} if quantized and self.defaults.act_bits is not None else {}

    # Mapping protocol
    def __getitem__(self, name: str) -> QuantSpec:
        return self._specs[name]

    def __iter__(self):
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Plan)
            and list(self._specs.items()) == list(other._specs.items())
            and self.allow_low_bit_router == other.allow_low_bit_router
        )

    def __repr__(self) -> str:
        hist: dict[int, int] = {}
        for s in self._specs.values():
            hist[s.bits] = hist.get(s.bits, 0) + 1
        return f"Plan({len(self)} units, bits histogram {dict(sorted(hist.items()))})"

    # Validation against a model's units
    def validate(self, units: Iterable[Any]) -> None:
        """Checks every entry against the model's units before anything changes.

        Args:
            units: the model's :class:`moe_ao.unit.Unit` list.

        Raises:
            ValueError: unknown unit, unsupported kind, group size not dividing
                in_features, a router below 8 bits without ``allow_low_bit_router``,
                or fused units that disagree on group size / symmetry.
        """
        by_name = {u.name: u for u in units}
        fused: dict[str, tuple[str, QuantSpec]] = {}
        for name, spec in self._specs.items():
            unit = by_name.get(name)
            if unit is None:
                close = difflib.get_close_matches(name, list(by_name), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"plan names unit {name!r}, which the model does not have{hint}")
            in_features = unit.shape[1]
            if spec.quantized and in_features % spec.group_size:
                divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0] + [in_features]
                raise ValueError(
                    f"{name}: group_size={spec.group_size} does not divide in_features={in_features};"
                    f" allowed e.g. {sorted(set(divisors))}"
                )
            if unit.kind == "router" and spec.bits < ROUTER_MIN_BITS and not self.allow_low_bit_router:
                raise ValueError(
                    f"{name}: router at {spec.bits} bits needs allow_low_bit_router=True;"
                    f" allowed without it: {[b for b in ALLOWED_BITS if b >= ROUTER_MIN_BITS]}"
                )
            if unit.expert is not None and unit.fused and spec.quantized:
                other = fused.setdefault(unit.param, (name, spec))
                if (other[1].group_size, other[1].symmetric, other[1].act_bits) != (
                        spec.group_size, spec.symmetric, spec.act_bits):
                    raise ValueError(
                        f"{name} and {other[0]} share the fused parameter {unit.param} and must use the"
                        f" same group_size, symmetric and act_bits; got {spec} vs {other[1]}"
                    )

    # Accounting
    def avg_bits(self, model_or_units: Any) -> float:
        """The paper's average bits: Σ bits·params / Σ params over planned linears.

        Routers, scales and zero points are excluded, as in QuantMoE-Bench.
        """
        return self._weighted(model_or_units, lambda s: float(s.bits))

    def true_avg_bits(self, model_or_units: Any) -> float:
        """Like :meth:`avg_bits` but with scales and zero points counted, routers included."""
        return self._weighted(model_or_units, QuantSpec.storage_bits, include_router=True)

    def _weighted(self, model_or_units: Any, bits_of, include_router: bool = False) -> float:
        num = den = 0.0
        for u in as_units(model_or_units):
            spec = self._specs.get(u.name)
            if spec is None or (u.kind == "router" and not include_router):
                continue
            num += bits_of(spec) * u.numel
            den += u.numel
        if den == 0:
            raise ValueError("the plan names none of the model's quantizable units")
        return num / den

    # JSON
    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-ready form (plain bits where a spec equals the defaults)."""
        units: dict[str, Any] = {}
        for name, spec in self._specs.items():
            if self._as_spec(spec.bits) == spec:
                units[name] = spec.bits
            else:
                # act_bits is written when it is not what plain bits would get (plans without W+A stay as before)
                fields = asdict(spec)
                if fields["act_bits"] == self._default_act(spec.bits).get("act_bits"):
                    del fields["act_bits"]
                units[name] = fields
        defaults = {"group_size": self.defaults.group_size, "symmetric": self.defaults.symmetric}
        if self.defaults.act_bits is not None:
            defaults["act_bits"] = self.defaults.act_bits
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "defaults": defaults,
            "allow_low_bit_router": self.allow_low_bit_router,
            "units": units,
            "meta": self.meta,
        }

    def to_json(self, path: str | None = None) -> str:
        """Serialises the plan (deterministically); writes it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Parses the dict form, checking format, version and every field's type.

        Raises:
            ValueError: not a plan, an unknown key (named, with a "did you mean"), a
                missing ``units``, or a field of the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a plan is a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a moe_ao plan: format={data.get('format')!r}, expected {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION or isinstance(data.get("version"), bool):
            raise ValueError(f"plan version {data.get('version')!r} is not supported; allowed: ({PLAN_VERSION},)")
        for key in data:
            if key not in TOP_KEYS:
                raise _unknown_key_error("plan", key, TOP_KEYS)
        if "units" not in data:
            raise ValueError("plan has no 'units' (unit name -> bits or spec); an empty plan would quantize nothing")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, Mapping):
            raise ValueError(f"plan 'defaults' must be an object, got {type(defaults).__name__}")
        for key in defaults:
            if key not in DEFAULT_KEYS:
                raise _unknown_key_error("plan defaults", key, DEFAULT_KEYS)
        for key in ("units", "meta"):
            if key in data and not isinstance(data[key], Mapping):
                raise ValueError(f"plan {key!r} must be an object, got {type(data[key]).__name__}")
        try:
            return cls(
                data["units"],
                group_size=defaults.get("group_size", 128),
                symmetric=defaults.get("symmetric", True),
                act_bits=defaults.get("act_bits"),
                allow_low_bit_router=data.get("allow_low_bit_router", False),
                meta=data.get("meta", {}),
            )
        except TypeError as e:
            raise ValueError(str(e)) from None

    @classmethod
    def from_json(cls, text_or_path: str) -> Plan:
        """Loads a plan from a JSON string or a file path."""
        text = text_or_path
        if not text_or_path.lstrip().startswith(("{", "[")):
            try:
                with open(text_or_path) as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"cannot read plan file {text_or_path!r}: {e}") from None
        where = "plan" if text is text_or_path else f"plan file {text_or_path}"
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


