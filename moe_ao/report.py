"""memory_report: real bytes per unit kind, before and after quantization.

Bytes are counted from what is stored: packed codes, scales, zero points and the
slot table of each PackedWeight, and plain parameters at their dtype. Each packed
tensor's bytes are split over its units in proportion to their exact storage
(codes + scales + zeros of their slice), so per-kind rows add up to the real total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moe_ao.discovery import units
from moe_ao.tensors.packed import PackedWeight
from moe_ao.tensors.packing import packed_size
from moe_ao.unit import Unit

ORIGINAL_BYTES_PER_WEIGHT = 2  # reference: the bf16/fp16 checkpoint


@dataclass
class KindRow:
    """Totals of one unit kind."""

    kind: str
    units: int = 0
    params: int = 0
    bytes: float = 0.0
    quantized_units: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class MemoryReport:
    """Per-kind storage of a (possibly quantized) model.

    Attributes:
        rows: kind -> totals over that kind's units.
        other_bytes: parameters and buffers outside any unit (norms, biases, ...).
        total_bytes: all parameters and persistent buffers.
        avg_bits_quantized: true bits per weight over quantized units, scales included.
    """

    rows: dict[str, KindRow] = field(default_factory=dict)
    other_bytes: int = 0
    total_bytes: float = 0.0
    avg_bits_quantized: float | None = None

    def __str__(self) -> str:
        lines = [
            "| kind | units | quantized | params | MiB | bits/weight | vs 16-bit |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows.values():
            ratio = 16 / r.bits_per_weight if r.bits_per_weight else 0
            lines.append(
                f"| {r.kind} | {r.units} | {r.quantized_units} | {r.params:,} | {r.bytes / 2**20:.3f} |"
                f" {r.bits_per_weight:.3f} | {ratio:.2f}x |"
            )
        lines.append(f"| other (norms, buffers) | | | | {self.other_bytes / 2**20:.3f} | | |")
        lines.append(f"| **total** | | | | {self.total_bytes / 2**20:.3f} | | |")
        if self.avg_bits_quantized is not None:
            lines.append(f"\nquantized units: {self.avg_bits_quantized:.3f} bits/weight including scales and zeros")
        return "\n".join(lines)


def _slice_bytes(w: PackedWeight, bits: int) -> float:
    R, K = w.rows_per_slice, w.logical_shape[-1]
    if bits == 16:
        return R * K * w.element_size()
    G = K // w.group_size
    return R * packed_size(K, bits) + R * G * (w.element_size() + (0 if w.symmetric else 1))


def _unit_bytes(model: nn.Module, u: Unit) -> tuple[float, bool]:
    p = model.get_parameter(u.param)
    if not isinstance(p, PackedWeight):
        return float(u.numel * p.element_size()), False
    slice_index = (u.expert or 0) * p.n_seg + u.segment if u.fused else 0
    bits = p.slice_bits[slice_index]
    exact = [_slice_bytes(p, b) for b in p.slice_bits]
    share = exact[slice_index] / sum(exact)  # the slot table is spread pro rata
    return p.nbytes_packed() * share, bits < 16


def memory_report(model: nn.Module) -> MemoryReport:
    """Real storage per unit kind. Works on float and quantized models alike."""
    report = MemoryReport()
    all_units = units(model)
    covered: set[str] = set()
    qbits = qparams = 0.0
    for u in all_units:
        row = report.rows.setdefault(u.kind, KindRow(u.kind))
        nbytes, quantized = _unit_bytes(model, u)
        row.units += 1
        row.params += u.numel
        row.bytes += nbytes
        row.quantized_units += int(quantized)
        covered.add(u.param)
        if quantized:
            qbits += 8 * nbytes
            qparams += u.numel
    seen: set[int] = set()
    # state_dict: parameters and persistent buffers, i.e. what a checkpoint stores
    # (named_buffers() would also count non-persistent ones such as rotary inv_freq).
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.nbytes_packed() if isinstance(p, PackedWeight) else p.numel() * p.element_size()
        report.total_bytes += nbytes
        if name not in covered:
            report.other_bytes += nbytes
    report.avg_bits_quantized = qbits / qparams if qparams else None
    return report
