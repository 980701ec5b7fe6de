"""What a compiled program does, read from its optimised HLO text, with every loop counted as often as it runs.

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, and our train step nests loops (micro-batches
around the scanned layer stack, the output head's chunks); on GPUs it reports no FLOPs at all. This module walks
the HLO instead: a computation's figures are its own instructions' plus those of the computations it calls
(fusions, calls, async wrappers), a loop body's multiplied by the loop's trip count (XLA's ``known_trip_count``, or
read from the loop's counter: its start, step and bound), and a conditional's largest branch.

- :func:`matmul_flops`: ``2 * prod(output) * prod(contracted dims)`` for every ``dot`` and every GEMM custom call
  (cuBLAS), and ``2 * batch * output features * input features * window taps that meet the input`` for every
  ``convolution`` (TPUs write matmuls as convolutions over padded or dilated inputs). Elementwise work is left
  out: it is a rounding error beside the matmuls of a transformer.
- :func:`kernel_calls`: the Pallas kernels compiled by Mosaic (TPU custom calls, e.g. splash attention), whose
  work the HLO does not show: their FLOPs are not in :func:`matmul_flops`.
- :func:`collectives`: each collective's kind, how many run per call of the program, and the bytes of their results
  (every array of a combined collective's tuple). A collective that TPU's async collective fusions carry on across
  several fusions is counted once, where it begins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|body|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_INSTRUCTION_START = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s+=\s")
_COMMENT = re.compile(r"/\*.*?\*/")  # e.g. /*index=5*/ before every fifth operand
# TPU's async collective fusions: a collective begun in one fusion (flag_start -1) and carried on in others, each
# of which repeats the whole collective instruction
_CONTINUED = re.compile(r'"async_collective_fusion_config":\{"flag_start":"(?!-1")')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result type as printed: ``f32[4,8]{1,0}`` or a tuple ``(f32[4]{0}, s32[])``
    opcode: str
    operands: list[str]
    attributes: str
    root: bool = False  # the computation's result


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
    line = line.strip()
    head, sep, rest = line.removeprefix("ROOT ").partition(" = ")
    if not sep:
        return None
    rest = rest.strip()
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    close = _closing("(" + rest, 0) - 1
    operands = [_COMMENT.sub("", o).strip().split(" ")[-1].lstrip("%") for o in _split_top(rest[: close - 1])]
    return Instruction(head.lstrip("%"), shape, opcode.strip(), operands, rest[close:], line.startswith("ROOT "))


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
    entry, current, lines = "", None, []  # lines: the instruction being read (a backend config may span lines)

    def finish() -> None:
        instruction = _parse_instruction(" ".join(lines)) if lines else None
        if instruction is not None:
            current.append(instruction)
        lines.clear()

    for line in text.splitlines():
        if current is None:
            match = _HEADER.match(line)
            if match:
                current = computations.setdefault(match.group(1), [])
                entry = match.group(1) if line.startswith("ENTRY") else entry
        elif line.rstrip() == "}":
            finish()
            current = None
        elif _INSTRUCTION_START.match(line):
            finish()
            lines.append(line)
        else:
            lines.append(line)
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text")
    return computations, entry


def _dims(attributes: str, key: str) -> list[int]:
    match = re.search(rf"\b{key}=\{{([\d,]*)\}}", attributes)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _real_taps(size: int, out: int, window: int, stride: int, low: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """How many (output position, window tap) pairs of one spatial dimension meet an input element rather than
    padding or a dilation hole.

    Tap ``t`` of output ``o`` reads position ``p = o * stride + t * rhs_dilate - low`` of the input dilated to
    ``(size - 1) * lhs_dilate + 1`` positions; it meets an element when ``0 <= p`` there and ``p % lhs_dilate == 0``.
    Per tap, the ``o`` that qualify are an arithmetic progression, counted in closed form.
    """
    extent = (size - 1) * lhs_dilate + 1
    gcd = math.gcd(stride, lhs_dilate)
    period = lhs_dilate // gcd
    total = 0
    for t in range(window):
        offset = t * rhs_dilate - low  # p = o * stride + offset
        first, last = max(0, -(offset // stride)), min(out - 1, (extent - 1 - offset) // stride)
        residue = -offset % lhs_dilate  # o * stride must be = residue (mod lhs_dilate)
        if last < first or residue % gcd:
            continue
        start = (residue // gcd) * pow(stride // gcd, -1, period) % period  # the o = start (mod period) qualify
        total += (last - start) // period - (first - start + period - 1) // period + 1
    return total


def _convolution_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """``2 * batch * output features * input features * (output position, window tap) pairs that meet the input``
    (padding and dilation holes are not work; TPUs write a batched matmul as a convolution whose window spans the
    batch dimensions over a dilated input, and stack matmuls sharing an input as a padded window)."""
    lhs, kernel = (_arrays(shapes[operand])[0][1] for operand in instruction.operands[:2])
    out = _arrays(instruction.shape)[0][1]
    lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes).groups()
    spatial = sorted(c for c in out_labels if c.isdigit())
    window = re.search(r"\bwindow=\{([^}]*)\}", instruction.attributes)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}

    def field(key: str, default: int) -> list[int]:
        values = [int(v) for v in fields[key].split("x")] if key in fields else []
        return values or [default] * len(spatial)

    pads = [[int(v) for v in pad.split("_")] for pad in fields["pad"].split("x")] if "pad" in fields else []
    pairs = math.prod(
        _real_taps(
            lhs[lhs_labels.index(d)],
            out[out_labels.index(d)],
            kernel[kernel_labels.index(d)],
            stride,
            pads[n][0] if pads else 0,
            lhs_dilate,
            rhs_dilate,
        )
        for n, (d, stride, lhs_dilate, rhs_dilate) in enumerate(
            zip(spatial, field("stride", 1), field("lhs_dilate", 1), field("rhs_dilate", 1), strict=True)
        )
    )
    return 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[kernel_labels.index("i")] * pairs


def _instruction_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    op = instruction.opcode
    if op == "dot":
        (_, lhs), (_, out) = _arrays(shapes[instruction.operands[0]])[0], _arrays(instruction.shape)[0]
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in _dims(instruction.attributes, "lhs_contracting_dims"))
    if op == "convolution":
        return _convolution_flops(instruction, shapes)
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
        self._by_name: dict[str, dict[str, Instruction]] = {}
        self._flops: dict[str, float] = {}
        self._collectives: dict[str, dict[str, tuple[int, float]]] = {}

    def _named(self, computation: str) -> dict[str, Instruction]:
        if computation not in self._by_name:
            self._by_name[computation] = {i.name: i for i in self.computations[computation]}
        return self._by_name[computation]

    def _root(self, computation: str) -> str:
        return next(i.name for i in self.computations[computation] if i.root)

    def _value(
        self,
        computation: str,
        name: str,
        parameters: Callable[[int], Any] | None = None,
        element: int | None = None,
    ) -> Any:
        """What instruction ``name`` of ``computation`` computes (its tuple ``element``, for a tuple), as far as a
        loop's trip count needs it: an int for a constant, ``("element", k)`` for element ``k`` of a loop's tuple
        parameter, ``("add", x, y)``, ``("compare", direction, x, y)``, or None. Copies and conversions pass their
        operand through; a fusion is followed into its computation, ``parameters(k)`` giving its operand ``k``'s
        value (evaluated only when asked for)."""
        instruction = self._named(computation)[name]
        op, operands = instruction.opcode, instruction.operands

        def value(operand: str, element: int | None = None) -> Any:
            return self._value(computation, operand, parameters, element)

        if op == "constant":
            return int(operands[0]) if operands and re.fullmatch(r"-?\d+", operands[0]) else None
        if op in ("copy", "bitcast", "convert"):
            return value(operands[0], element)
        if op == "parameter":
            return "loop tuple" if parameters is None else parameters(int(operands[0]))
        if op == "tuple":
            return None if element is None else value(operands[element])
        if op == "get-tuple-element":
            index = int(re.search(r"\bindex=(\d+)", instruction.attributes).group(1))
            source = value(operands[0], index)
            return ("element", index) if source == "loop tuple" else source
        if op == "fusion":
            called = _CALLED.search(instruction.attributes).group(1)
            return self._value(called, self._root(called), lambda k: value(operands[k]), element)
        if op == "add":
            return ("add", value(operands[0]), value(operands[1]))
        if op == "compare":
            direction = re.search(r"\bdirection=(\w+)", instruction.attributes).group(1)
            return ("compare", direction, value(operands[0]), value(operands[1]))
        return None

    def _induction_trip_count(self, loop: Instruction, caller: str) -> int | None:
        """The trip count of the ``while`` instruction ``loop`` of ``caller`` from its induction variable: element
        ``k`` of the loop's tuple tested against a constant bound in the condition, advanced by a constant step in
        the body, from a constant start (e.g. TPU's windowed matmul loops, which step by 2 and carry no
        ``known_trip_count``). None when the loop is not of that form."""
        condition, body = (
            re.search(rf"\b{key}=%?([\w.\-]+)", loop.attributes).group(1) for key in ("condition", "body")
        )
        test = self._value(condition, self._root(condition))
        if not (isinstance(test, tuple) and test[0] == "compare"):
            return None
        _, direction, left, right = test
        if isinstance(left, int):  # bound OP element: the same test with the element on the left
            mirrored = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}
            direction, left, right = mirrored.get(direction, direction), right, left
        if not (isinstance(left, tuple) and left[0] == "element" and isinstance(right, int)):
            return None
        index, bound = left[1], right
        advance = self._value(body, self._root(body), element=index)
        start = self._value(caller, loop.operands[0], element=index)
        if not (isinstance(advance, tuple) and advance[0] == "add" and ("element", index) in advance[1:]):
            return None
        step = next((x for x in advance[1:] if isinstance(x, int)), None)
        if step is None or not isinstance(start, int):
            return None
        if direction in ("LT", "LE") and step > 0:
            return max(0, -(-(bound - start + (direction == "LE")) // step))
        if direction in ("GT", "GE") and step < 0:
            return max(0, -(-(start - bound + (direction == "GE")) // -step))
        return None

    def _trip_count(self, instruction: Instruction, caller: str) -> int:
        match = _TRIP.search(instruction.attributes)
        count = int(match.group(1)) if match else self._induction_trip_count(instruction, caller)
        if count is None:
            self.unknown_trip_counts += 1
            return 1
        return count

    def callees(self, instruction: Instruction, computation: str) -> list[tuple[str, int]]:
        """The computations ``instruction`` runs, each with how often (a conditional: its branches, once each)."""
        if instruction.opcode == "while":
            body = re.search(r"\bbody=%?([\w.\-]+)", instruction.attributes)
            return [(body.group(1), self._trip_count(instruction, computation))] if body else []
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
            called = [n * self.flops(name) for name, n in self.callees(instruction, computation)]
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
            if kind in COLLECTIVES and not _CONTINUED.search(instruction.attributes):
                size = array_bytes(instruction.shape)
                if instruction.opcode.endswith("-start") and kind != "all-reduce":  # (operands, results, ...)
                    size -= sum(array_bytes(shapes.get(o, "")) for o in instruction.operands)
                add(kind, 1, size)
            for name, n in self.callees(instruction, computation):
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
