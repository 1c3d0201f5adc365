"""Per-convolution compile report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    """What the compiler did with one convolution.

    ``kind`` is ``"sparks"`` (two-stage Sparks op), ``"binary"`` (dense XNOR-popcount op)
    or ``"float"`` (left to stock TVM; ``reason`` says why).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple
    stride: tuple
    out_hw: tuple
    codewords: int | None = None
    bits_per_weight: float | None = None
    dense_bops: int | None = None
    sparks_bops: int | None = None
    binarizer: str | None = None
    reason: str = ""
    #: Bytes of this conv's weights as compiled into the library (Sparks: indices packed at
    #: tau bits + the K codewords; dense binary: 1 bit per weight), None for float convs.
    weight_bytes: int | None = None

    @property
    def dense_1bit_bytes(self) -> int:
        """The same weights stored 1 bit each (a plain BNN)."""
        return -(-self.out_channels * self.in_channels * self.kernel[0] * self.kernel[1] // 8)

    @property
    def float32_bytes(self) -> int:
        return 4 * self.out_channels * self.in_channels * self.kernel[0] * self.kernel[1]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    """One :class:`LayerRecord` per convolution, in graph order. ``str()`` prints a table."""

    layers: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def count(self, kind: str) -> int:
        return sum(1 for rec in self.layers if rec.kind == kind)

    def to_json(self) -> str:
        return json.dumps([rec.to_dict() for rec in self.layers], indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        recs = []
        for d in json.loads(text):
            d["kernel"], d["stride"], d["out_hw"] = tuple(d["kernel"]), tuple(d["stride"]), tuple(d["out_hw"])
            recs.append(LayerRecord(**d))
        return cls(recs)

    def __str__(self) -> str:
        head = ("conv", "kind", "cin", "cout", "k", "s", "out", "K", "bits/w", "dense BOPs", "Sparks BOPs", "note")
        rows = [head]
        for r in self.layers:
            rows.append(
                (
                    r.name,
                    r.kind,
                    str(r.in_channels),
                    str(r.out_channels),
                    "x".join(map(str, r.kernel)),
                    str(r.stride[0]) if r.stride[0] == r.stride[1] else "x".join(map(str, r.stride)),
                    "x".join(map(str, r.out_hw)),
                    "" if r.codewords is None else str(r.codewords),
                    "" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
                    _fmt_bops(r.dense_bops),
                    _fmt_bops(r.sparks_bops),
                    r.reason,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        dense = sum(r.dense_bops or 0 for r in self.layers)
        sparks = sum(r.sparks_bops or 0 for r in self.layers)
        lines.append(
            f"{len(self.layers)} convs: {self.count('sparks')} sparks, {self.count('binary')} binary, "
            f"{self.count('float')} float; binary BOPs {_fmt_bops(dense)} dense -> {_fmt_bops(sparks)} compiled"
        )
        stored = [r for r in self.layers if r.weight_bytes is not None]
        if stored:
            lines.append(
                f"binary conv weights in the library: {_fmt_bytes(sum(r.weight_bytes for r in stored))} "
                f"(1 bit/weight: {_fmt_bytes(sum(r.dense_1bit_bytes for r in stored))}, "
                f"float32: {_fmt_bytes(sum(r.float32_bytes for r in stored))})"
            )
        return "\n".join(lines)

    def weight_bytes(self) -> dict:
        """Totals over the binary convs: compiled, as 1-bit weights, as float32."""
        stored = [r for r in self.layers if r.weight_bytes is not None]
        return {
            "compiled": sum(r.weight_bytes for r in stored),
            "dense_1bit": sum(r.dense_1bit_bytes for r in stored),
            "float32": sum(r.float32_bytes for r in stored),
        }


def _fmt_bops(v) -> str:
    if v is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= scale:
            return f"{v / scale:.3f}{unit}"
    return str(v)


def _fmt_bytes(v: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v} B"
