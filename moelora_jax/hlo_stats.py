"""What a compiled program does, read from its optimised HLO text, with every loop counted as often as it runs.

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, and our train step nests loops (micro-batches
around the scanned layer stack, the output head's chunks); on GPUs it reports no FLOPs at all. This module walks
the HLO instead: a computation's figures are its own instructions' plus those of the computations it calls
(fusions, calls, async wrappers), a loop body's multiplied by the loop's trip count (XLA's ``known_trip_count``, or
the bound its condition compares against), and a conditional's largest branch.

- :func:`matmul_flops`: ``2 * prod(output) * prod(contracted dims)`` for every ``dot`` and every GEMM custom call
  (cuBLAS), and ``2 * prod(output) * input features * window positions`` for every ``convolution``. Elementwise work is
  left out: it is a rounding error beside the matmuls of a transformer.
- :func:`kernel_calls`: the Pallas kernels compiled by Mosaic (TPU custom calls, e.g. splash attention), whose
  work the HLO does not show: their FLOPs are not in :func:`matmul_flops`.
- :func:`collectives`: each collective's kind, how many run per call of the program, and the bytes of their results
  (every array of a combined collective's tuple).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|body|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result type as printed: ``f32[4,8]{1,0}`` or a tuple ``(f32[4]{0}, s32[])``
    opcode: str
    operands: list[str]
    attributes: str


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
    return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(shape)]


def array_bytes(shape: str) -> float:
    """Bytes of every array in a printed HLO type (f8 types are 1 byte)."""
    return sum(ELEMENT_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in _arrays(shape))


def _closing(text: str, start: int) -> int:
    """The index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def _parse_instruction(line: str) -> Instruction | None:
    head, sep, rest = line.strip().removeprefix("ROOT ").partition(" = ")
    if not sep:
        return None
    rest = rest.strip()
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    close = _closing("(" + rest, 0) - 1
    operands = [o.strip().split(" ")[-1].lstrip("%") for o in _split_top(rest[: close - 1])]
    return Instruction(head.lstrip("%"), shape, opcode.strip(), operands, rest[close:])


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p for p in [*parts, text[start:]] if p.strip()]


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """The computations of an HLO module's text (name -> instructions) and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            match = _HEADER.match(line)
            if match:
                current = computations.setdefault(match.group(1), [])
                entry = match.group(1) if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        else:
            instruction = _parse_instruction(line)
            if instruction is not None:
                current.append(instruction)
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text")
    return computations, entry


def _dims(attributes: str, key: str) -> list[int]:
    match = re.search(rf"\b{key}=\{{([\d,]*)\}}", attributes)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _window_taps(attributes: str) -> int:
    """How many of a convolution window's positions meet input elements: ``ceil(size / lhs_dilate)`` per spatial
    dimension. (TPUs write a batched matmul as a convolution whose window spans the batch dimensions, with the input
    dilated by the same sizes: one position in each window meets an element.)"""
    window = re.search(r"\bwindow=\{([^}]*)\}", attributes)
    if not window:
        return 1
    fields = dict(f.split("=", 1) for f in window.group(1).split())
    sizes = [int(v) for v in fields.get("size", "").split("x") if v]
    dilations = [int(v) for v in fields.get("lhs_dilate", "").split("x") if v] or [1] * len(sizes)
    return math.prod(-(-size // dilation) for size, dilation in zip(sizes, dilations, strict=True))


def _instruction_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    op = instruction.opcode
    if op == "dot":
        (_, lhs), (_, out) = _arrays(shapes[instruction.operands[0]])[0], _arrays(instruction.shape)[0]
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in _dims(instruction.attributes, "lhs_contracting_dims"))
    if op == "convolution":
        (_, kernel), (_, out) = _arrays(shapes[instruction.operands[1]])[0], _arrays(instruction.shape)[0]
        labels = re.search(r"dim_labels=\w*_(\w+)->", instruction.attributes)
        features = kernel[labels.group(1).index("i")] if labels else 1
        return 2.0 * math.prod(out) * features * _window_taps(instruction.attributes)
    if op == "custom-call" and re.search(r'custom_call_target="__cublas', instruction.attributes):
        config = re.search(r"backend_config=(\{.*\})", instruction.attributes)
        numbers = json.loads(config.group(1))["gemm_backend_config"]["dot_dimension_numbers"] if config else {}
        (_, lhs), (_, out) = _arrays(shapes[instruction.operands[0]])[0], _arrays(instruction.shape)[0]
        contracted = [int(d) for d in numbers.get("lhs_contracting_dimensions", [])]
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracted)
    return 0.0


class HloProgram:
    """An optimised HLO module, for :func:`matmul_flops` and :func:`collectives`."""

    def __init__(self, text: str) -> None:
        self.computations, self.entry = parse_module(text)
        self.unknown_trip_counts = 0
        self._flops: dict[str, float] = {}
        self._collectives: dict[str, dict[str, tuple[int, float]]] = {}

    def _trip_count(self, instruction: Instruction) -> int:
        match = _TRIP.search(instruction.attributes)
        if match:
            return int(match.group(1))
        condition = re.search(r"\bcondition=%?([\w.\-]+)", instruction.attributes)
        bounds = [
            int(c)
            for i in self.computations.get(condition.group(1) if condition else "", [])
            for c in re.findall(r"^(\d+)$", i.operands[0] if i.opcode == "constant" and i.operands else "")
        ]
        if len(bounds) == 1:
            return bounds[0]
        self.unknown_trip_counts += 1
        return 1

    def callees(self, instruction: Instruction) -> list[tuple[str, int]]:
        """The computations ``instruction`` runs, each with how often (a conditional: its branches, once each)."""
        if instruction.opcode == "while":
            body = re.search(r"\bbody=%?([\w.\-]+)", instruction.attributes)
            return [(body.group(1), self._trip_count(instruction))] if body else []
        if instruction.opcode in ("reduce", "reduce-window", "scatter", "select-and-scatter", "sort", "map"):
            return []  # their to_apply is a scalar combiner
        if instruction.opcode in ("async-update", "async-done"):
            return []  # the async-start that began the work names the same computation
        names = _CALLED.findall(instruction.attributes)
        branches = _BRANCHES.search(instruction.attributes)
        if branches:
            names += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
        return [(name, 1) for name in names if name in self.computations]

    def flops(self, computation: str) -> float:
        """Matmul FLOPs of one run of ``computation``, with what it calls."""
        if computation in self._flops:
            return self._flops[computation]
        instructions = self.computations[computation]
        shapes = {i.name: i.shape for i in instructions}
        total = 0.0
        for instruction in instructions:
            total += _instruction_flops(instruction, shapes)
            called = [n * self.flops(name) for name, n in self.callees(instruction)]
            if called:
                total += max(called) if instruction.opcode == "conditional" else sum(called)
        self._flops[computation] = total
        return total

    def collectives(self, computation: str) -> dict[str, tuple[int, float]]:
        """Per collective kind, how many run in one run of ``computation`` and their result bytes."""
        if computation in self._collectives:
            return self._collectives[computation]
        totals: dict[str, tuple[int, float]] = {}

        def add(kind: str, count: float, size: float) -> None:
            c, b = totals.get(kind, (0, 0.0))
            totals[kind] = (c + count, b + size)

        instructions = self.computations[computation]
        shapes = {i.name: i.shape for i in instructions}
        for instruction in instructions:
            kind = instruction.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                size = array_bytes(instruction.shape)
                if instruction.opcode.endswith("-start") and kind != "all-reduce":  # (operands, results, ...)
                    size -= sum(array_bytes(shapes.get(o, "")) for o in instruction.operands)
                add(kind, 1, size)
            for name, n in self.callees(instruction):
                for inner, (count, size) in self.collectives(name).items():
                    add(inner, n * count, n * size)
        self._collectives[computation] = totals
        return totals


def matmul_flops(text: str) -> tuple[float, int]:
    """Matmul FLOPs of one call of the program (per device), and how many loops had no trip count to read (each
    counted once)."""
    program = HloProgram(text)
    return program.flops(program.entry), program.unknown_trip_counts


def collectives(text: str) -> dict[str, dict[str, float]]:
    """Per collective kind: ``count`` per call of the program and ``bytes`` (their results', per device)."""
    program = HloProgram(text)
    return {k: {"count": c, "bytes": b} for k, (c, b) in sorted(program.collectives(program.entry).items())}


def kernel_calls(text: str) -> int:
    """How many Mosaic kernel calls (``tpu_custom_call``) the HLO text holds, each counted once."""
    return text.count('custom_call_target="tpu_custom_call"')
