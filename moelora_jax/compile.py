"""Compile a job for the TPU or GPU slice it will run on, without the hardware, and say whether it fits.

    python -m moelora_jax.compile --config configs/llama_moelora.py:paper --topology v5e-8 \\
        --model_shape llama-3.2-3b [--config.KEY=VALUE ...] [--json report.json] [--find_batch] \\
        [--programs train_step]

The job is built from shapes alone (:func:`moelora_jax.training.job.setup_shapes`: a published shape or ``model.path``'s
``config.json``, the worst-case batch the settings allow) on compile-only devices of the slice
(:mod:`moelora_jax.parallel.topologies`), and its three programs are compiled: the train step, the held-out loss and
greedy generation. Per program and per chip it reports XLA's memory (arguments, temporaries, outputs; the total is what
the program needs resident), the matmul FLOPs of one call with every loop counted
(:mod:`moelora_jax.parallel.hlo_stats`), the collectives and the compile time. For the train step it adds the model's
own FLOPs (:func:`model_flops`, so the ratio shows what remat recomputes) and a roofline bound: a step takes at least
``max(FLOPs / peak, bytes / bandwidth)``, where the bytes are the arguments read and the outputs written once (a lower
bound on HBM traffic), so ``roofline_mfu`` is an upper bound on the MFU the step can reach. Pallas kernels
(``model.attention=splash``) hide their FLOPs from the HLO: then the ratio is not reported and the bound takes at least
the model's FLOPs.

A train step fits when its total stays within ``1 - HEADROOM`` of the chip's HBM (XLA's estimate does not see the
runtime's own buffers or fragmentation); one that does not, or that the TPU compiler refuses outright
(``RESOURCE_EXHAUSTED``: it checks the program against the chip's memory while compiling), exits 2 with a line
naming what to change.
``--find_batch`` searches, for each remat policy (or those of ``--find_batch_remat``), the largest per-chip batch
(examples per chip in one micro-batch) whose train step fits; every probe is one compile (:func:`find_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from moelora_jax.errors import UserError
from moelora_jax.models.generation import generate
from moelora_jax.models.llama import REMAT_CHOICES
from moelora_jax.models.shapes import SHAPES
from moelora_jax.parallel.hlo_stats import collectives, kernel_calls, matmul_flops
from moelora_jax.parallel.sharding import batch_sharding
from moelora_jax.parallel.topologies import TOPOLOGIES, Topology, compile_devices, topology
from moelora_jax.training.cli import parse_flags
from moelora_jax.training.job import JobShapes, data_shards, setup_shapes
from moelora_jax.training.settings import Settings

HEADROOM = 0.10
"""The share of a chip's HBM a fitting train step leaves free."""
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program, per chip: XLA's memory estimate (bytes), matmul FLOPs of one call, collectives."""

    compile_seconds: float
    argument_bytes: int
    temporary_bytes: int
    output_bytes: int
    aliased_bytes: int
    code_bytes: int
    flops: float
    loops_without_trip_count: int
    kernel_calls: int
    collectives: dict[str, dict[str, float]]

    @property
    def total_bytes(self) -> int:
        """What the program needs resident: arguments, temporaries, code and the outputs not aliased to arguments."""
        return self.argument_bytes + self.temporary_bytes + self.code_bytes + self.output_bytes - self.aliased_bytes


class OutOfMemoryError(Exception):
    """XLA refused to compile ``program`` because it needs more memory than the chip has (``reason``: XLA's)."""

    def __init__(self, program: str, reason: str):
        super().__init__(f"{program}: {reason}")
        self.program, self.reason = program, reason


def program_report(compiled: jax.stages.Compiled, seconds: float) -> ProgramReport:
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    flops, unknown = matmul_flops(text)
    return ProgramReport(
        compile_seconds=seconds,
        argument_bytes=memory.argument_size_in_bytes,
        temporary_bytes=memory.temp_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        aliased_bytes=memory.alias_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        flops=flops,
        loops_without_trip_count=unknown,
        kernel_calls=kernel_calls(text),
        collectives=collectives(text),
    )


def model_flops(shapes: JobShapes) -> float:
    """The model FLOPs of one train step over the worst-case batch (all devices): what the step must compute
    without recomputation, counting matmuls only.

    Per token of ``T`` (every position of every row) with a frozen base of ``N_base`` projection weights and
    ``N_adapter`` adapter weights (all experts: the experts are computed densely), attention over rows of length
    ``S`` with ``h`` heads of width ``d``, and the head at ``P`` target positions per row:

        forward  2 N_base + 2 N_adapter + 4 S h d (per layer)       + 2 H V per target
        backward 2 N_base + 4 N_adapter + 8 S h d (per layer)       + 2 H V per target

    (a frozen weight needs only its input's gradient; an adapter's also its own).
    """
    c = shapes.model_config
    micro, rows, length = shapes.train_batch["tokens"].shape
    targets = shapes.train_batch["targets"].shape[-1]
    tokens = micro * rows * length
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    base = c.num_layers * (c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    adapter = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes.state.adapters))
    attention = c.num_layers * 12 * length * q
    head = 4 * c.hidden_size * c.vocab_size * micro * rows * targets
    return float(tokens * (4 * base + 6 * adapter + attention) + head)


def _report(program: str, compile_program: Callable[[], jax.stages.Compiled]) -> ProgramReport:
    start = time.perf_counter()
    try:
        compiled = compile_program()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise OutOfMemoryError(
            program, str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0].rstrip(".")
        ) from e
    return program_report(compiled, time.perf_counter() - start)


def compile_train_step(shapes: JobShapes) -> ProgramReport:
    """The train step's figures; :class:`OutOfMemoryError` where the compiler refuses it for the chip's memory."""
    return _report(
        "train_step", lambda: shapes.trainer.compile_train_step(shapes.state, shapes.params, shapes.train_batch)
    )


PROGRAMS = ("train_step", "eval_loss", "generate")


def compile_programs(shapes: JobShapes, names: tuple[str, ...] = PROGRAMS) -> dict[str, ProgramReport]:
    """The train step and those of the held-out loss and greedy generation in ``names``, compiled."""
    trainer, t, d, c = shapes.trainer, shapes.settings.train, shapes.settings.data, shapes.model_config
    prompt = jax.ShapeDtypeStruct((t.eval_batch_size, d.max_length), "int32", sharding=batch_sharding(shapes.mesh))
    variables = {"params": shapes.params, "adapters": shapes.state.adapters}
    eos = c.eos_token_ids or (c.vocab_size - 1,)

    def generation() -> jax.stages.Compiled:
        with trainer.context():
            return generate.lower(
                trainer.model, variables, prompt, prompt, max_new_tokens=t.max_new_tokens, eos_ids=eos
            ).compile()

    programs = {"train_step": compile_train_step(shapes)}
    if "eval_loss" in names:
        programs["eval_loss"] = _report(
            "eval_loss", lambda: trainer.compile_eval_loss(shapes.params, shapes.state.adapters, shapes.eval_batch)
        )
    if "generate" in names:
        programs["generate"] = _report("generate", generation)
    return programs


def with_batch(settings: Settings, per_chip: int, remat: str, shards: int) -> Settings:
    """``settings`` with one micro-batch of ``per_chip`` examples per data shard and ``remat``."""
    train = dataclasses.replace(settings.train, batch_size=per_chip * shards, micro_batches=1)
    return dataclasses.replace(settings, train=train, model=dataclasses.replace(settings.model, remat=remat))


def largest_fitting(needs: Callable[[int], float], budget: float, limit: int) -> int:
    """The largest ``b`` in ``1..limit`` with ``needs(b) <= budget`` (0: none), for ``needs`` that only grows in
    ``b``. Memory grows about linearly in the batch, so ``needs(1)`` and ``needs(2)`` give a first guess
    ``1 + (budget - needs(1)) / (needs(2) - needs(1))``; from there the search gallops to a ``b`` that fits and one
    that does not, and bisects between them: typically four calls, and never a wrong answer when the guess is off.
    """
    needs = functools.cache(needs)
    if needs(1) > budget:
        return 0
    if limit == 1:
        return 1
    slope = needs(2) - needs(1)
    guess = limit if slope <= 0 else min(max(1 + int((budget - needs(1)) // slope), 1), limit)
    step = 1
    if needs(guess) <= budget:  # gallop up from a batch that fits
        low = guess
        while low + step <= limit and needs(low + step) <= budget:
            low, step = low + step, 2 * step
        high = min(low + step, limit + 1)  # limit + 1: past the search
    else:  # gallop down to one that fits
        high = guess
        while high - step > 1 and needs(high - step) > budget:
            high, step = high - step, 2 * step
        low = max(high - step, 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if needs(middle) <= budget else (low, middle)
    return low


def find_batch(
    settings: Settings,
    devices: list[jax.Device],
    model: str | None,
    capacity: int,
    policies: Sequence[str] = REMAT_CHOICES,
    limit: int = 4096,
) -> dict[str, int]:
    """Per remat policy of ``policies``, the largest per-chip batch (up to ``limit``) whose train step fits (0: not
    even one); every probe of :func:`largest_fitting` is one compile."""
    shards = data_shards(setup_shapes(settings, model, devices).mesh)

    def needs(remat: str) -> Callable[[int], float]:
        def compiled_bytes(per_chip: int) -> float:
            shapes = setup_shapes(with_batch(settings, per_chip, remat, shards), model, devices)
            try:
                needed = compile_train_step(shapes).total_bytes
            except OutOfMemoryError:
                needed = math.inf
            print(f"  remat={remat}, {per_chip} per chip: {needed / GiB:.2f} GiB", file=sys.stderr, flush=True)
            return needed

        return compiled_bytes

    return {remat: largest_fitting(needs(remat), (1 - HEADROOM) * capacity, limit) for remat in policies}


def slice_fields(slice_: Topology) -> dict[str, Any]:
    """What every report says of the slice compiled for."""
    chip = slice_.chip
    return {"topology": slice_.name, "chip": chip.name, "chips": slice_.chips, "hbm_capacity_bytes": chip.hbm_bytes}


def check_report(
    settings: Settings,
    slice_: Topology,
    model: str | None,
    devices: list[jax.Device],
    names: tuple[str, ...] = PROGRAMS,
) -> tuple[dict[str, Any], dict[str, ProgramReport]]:
    """The compile check of ``settings`` on ``slice_``: the JSON report and the figures of the programs named."""
    shapes = setup_shapes(settings, model, devices)
    programs = compile_programs(shapes, names)
    train, chip = programs["train_step"], slice_.chip
    flops_model = model_flops(shapes)
    # Pallas kernels hide their FLOPs from the HLO: then the step computes at least the model's
    flops = train.flops if not train.kernel_calls else max(train.flops, flops_model / slice_.chips)
    bound = max(flops / chip.bf16_flops, (train.argument_bytes + train.output_bytes) / chip.hbm_bandwidth)
    mesh = dict(shapes.mesh.shape)
    report = slice_fields(slice_) | {
        "model": model or settings.model.path or "model.path",
        "mesh": mesh,
        "train_batch_shape": list(shapes.train_batch["tokens"].shape),
        "remat": settings.model.remat,
        "fits": train.total_bytes <= (1 - HEADROOM) * chip.hbm_bytes,
        "headroom": HEADROOM,
        "hbm_bytes_per_chip": train.total_bytes,
        "flops_per_step": train.flops * slice_.chips,
        "model_flops_per_step": flops_model,
        "flops_ratio": None if train.kernel_calls else train.flops * slice_.chips / flops_model,
        "roofline_step_seconds": bound,
        "roofline_mfu": flops_model / slice_.chips / chip.bf16_flops / bound,
        "programs": {name: dataclasses.asdict(p) | {"total_bytes": p.total_bytes} for name, p in programs.items()},
    }
    return report, programs


def print_report(report: dict[str, Any], programs: dict[str, ProgramReport]) -> None:
    mesh = " ".join(f"{axis}={size}" for axis, size in report["mesh"].items())
    capacity = report["hbm_capacity_bytes"]
    print(
        f"{report['model']} on {report['topology']} ({report['chips']} x {report['chip']}, "
        f"{capacity / GiB:.1f} GiB HBM each), mesh {mesh}, train batch {tuple(report['train_batch_shape'])}, "
        f"remat={report['remat']}"
    )
    print(f"{'program':<12}{'compile s':>10}{'args':>9}{'temp':>9}{'out':>9}{'total':>9}{'of HBM':>8}{'TFLOP':>9}")
    for name, p in programs.items():
        print(
            f"{name:<12}{p.compile_seconds:>10.1f}{p.argument_bytes / GiB:>9.2f}{p.temporary_bytes / GiB:>9.2f}"
            f"{p.output_bytes / GiB:>9.2f}{p.total_bytes / GiB:>9.2f}{p.total_bytes / capacity:>8.0%}"
            f"{p.flops / 1e12:>9.3f}"
        )
        for kind, c in p.collectives.items():
            print(f"{'':<12}{kind}: {c['count']:.0f} per call, {c['bytes'] / GiB:.3f} GiB")
        if p.loops_without_trip_count:
            print(f"{'':<12}{p.loops_without_trip_count} loop(s) without a known trip count, counted once")
        if p.kernel_calls:
            print(f"{'':<12}{p.kernel_calls} Pallas kernel call(s) (splash attention), their FLOPs not counted")
    ratio = "(Pallas kernels: no ratio)" if report["flops_ratio"] is None else f"{report['flops_ratio']:.2f}x"
    print(
        f"(memory in GiB per chip, TFLOP per chip per call) train step: {ratio} the model's "
        f"{report['model_flops_per_step'] / 1e12:.1f} TFLOP per step; roofline >= "
        f"{report['roofline_step_seconds'] * 1e3:.1f} ms per step, MFU <= {report['roofline_mfu']:.0%}; "
        f"{'fits' if report['fits'] else 'does NOT fit'} ({report['hbm_bytes_per_chip'] / GiB:.2f} of "
        f"{capacity / GiB:.1f} GiB, {HEADROOM:.0%} kept free)"
    )


_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with ':preset'")
_TOPOLOGY = flags.DEFINE_enum("topology", None, list(TOPOLOGIES), "the slice to compile for")
_MODEL_SHAPE = flags.DEFINE_enum("model_shape", None, list(SHAPES), "a published shape (default: model.path's)")
_JSON = flags.DEFINE_string("json", None, "also write the report to this JSON file")
_PROGRAMS = flags.DEFINE_multi_enum(
    "programs", list(PROGRAMS), list(PROGRAMS), "which programs to compile (the train step always)"
)
_FIND_BATCH = flags.DEFINE_bool("find_batch", False, "find the largest per-chip batch that fits, per remat policy")
_FIND_BATCH_REMAT = flags.DEFINE_multi_enum(
    "find_batch_remat", list(REMAT_CHOICES), list(REMAT_CHOICES), "the remat policies --find_batch tries"
)
flags.mark_flags_as_required(["config", "topology"])


WHAT_TO_CHANGE = (
    "shard the weights (mesh.fsdp, mesh.tensor), set model.remat=full, raise train.micro_batches or lower "
    "train.batch_size (--find_batch finds the largest batch that fits)"
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: settings go through --config.KEY=VALUE.")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # compiling runs nothing: start no accelerator's runtime
    try:
        settings = Settings.from_config(_CONFIG.value)
        slice_ = topology(_TOPOLOGY.value)
        devices = compile_devices(slice_)
        try:
            report, programs = check_report(settings, slice_, _MODEL_SHAPE.value, devices, tuple(_PROGRAMS.value))
            print_report(report, programs)
            problem = (
                f"the train step needs {report['hbm_bytes_per_chip'] / GiB:.1f} GiB per chip, more than "
                f"{1 - HEADROOM:.0%} of {slice_.name}'s {slice_.chip.hbm_bytes / GiB:.0f} GiB"
            )
        except OutOfMemoryError as e:
            report = slice_fields(slice_) | {"fits": False, "refused": {e.program: e.reason}}
            problem = f"XLA refuses the {e.program} for {slice_.name}'s chips: {e.reason}"
        if _FIND_BATCH.value:
            report["largest_per_chip_batch"] = find_batch(
                settings, devices, _MODEL_SHAPE.value, slice_.chip.hbm_bytes, _FIND_BATCH_REMAT.value
            )
            print("largest per-chip batch that fits, per remat policy:", report["largest_per_chip_batch"])
        if _JSON.value:
            Path(_JSON.value).write_text(json.dumps(report, indent=2))
        if not report["fits"] and not _FIND_BATCH.value:
            raise UserError(f"{problem}; {WHAT_TO_CHANGE}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
