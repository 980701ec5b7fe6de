"""The statistics of a paired protocol's runs: each cell's accuracy over seeds and examples with a bootstrap
interval, each paper claim's paired difference with its verdict, and the damping sweep's rows."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from moelora_jax.errors import UserError

CLAIMS = (
    ("Sun et al. 2025", "a mixture of LoRA experts beats LoRA", "moe_lora", "lora"),
    ("Zhang & Pilanci 2024", "riemann_precond helps LoRA", "lora+riemann", "lora"),
    ("Zhang & Pilanci 2024", "riemann_precond helps", "moe_lora+riemann", "moe_lora"),
    ("Sun et al. 2025", "riemann + sqrt-gate beats MoE-LoRA", "moe_lora+riemann+sqrt_gate", "moe_lora"),
    ("Sun et al. 2025", "sqrt-gate adds to riemann", "moe_lora+riemann+sqrt_gate", "moe_lora+riemann"),
)
"""(paper, claim, method A, method B): each paper claims that A scores above B, under SGD and under AdamW (Sun et
al. take the first as their premise, "a visible improvement" of MoE-LoRA over LoRA). Zhang & Pilanci's claim is
about LoRA (the ``tuned`` protocol runs it there); the four core methods test it on MoE-LoRA, whose experts are
preconditioned each."""
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ONE_ANSWER_SHARE = 0.9
"""A run that gives one answer (or none the task can read) to this share of the held-out examples has not learned
the task, whatever its accuracy: the tables flag it, and the reading names the verdicts that rest on such runs."""


def commonest(records: list[dict[str, Any]], field: str) -> tuple[str | None, float]:
    """The commonest value of ``field`` over a run's held-out examples
    (:func:`~moelora_jax.evaluation.scoring.example_records`: ``"answer"``, None where unreadable, or ``"label"``) and
    the share of examples that have it."""
    value, count = collections.Counter(r[field] for r in records).most_common(1)[0]
    return value, count / len(records)


def bootstrap_interval(
    scores: np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """The mean of ``scores`` (seeds x examples: 1 correct or 0, or the difference of two methods' on the same seed
    and example) and its ``level`` percentile bootstrap interval.

    Each resample draws the seeds and the examples with replacement, independently (every seed is scored on the
    same examples): with multinomial counts ``w`` over the S seeds and ``v`` over the N examples, the resampled mean
    is ``w^T C v / (S N)``. Against the mean's variance ``s2_seed / S + s2_example / N + s2_noise / (S N)`` its
    own counts the noise up to 3 times (the interval errs wide where noise dominates) and the seeds' spread
    ``(S - 1) / S`` times (McCullagh 2000); with one seed it is the binomial interval. The draws depend only on the
    shape and ``rng_seed``, so a difference of two methods is a paired bootstrap, and a cell's interval does not
    depend on which other cells exist."""
    C = np.asarray(scores, dtype=float)
    if C.ndim != 2 or 0 in C.shape:
        raise UserError(f"bootstrap_interval needs a non-empty seeds x examples array, got shape {C.shape}.")
    if not 0 < level < 1:
        raise UserError(f"level={level} must lie strictly between 0 and 1.")
    S, N = C.shape
    rng = np.random.default_rng(rng_seed)
    w = rng.multinomial(S, np.full(S, 1 / S), size=resamples)
    v = rng.multinomial(N, np.full(N, 1 / N), size=resamples)
    means = ((w @ C) * v).sum(axis=1) / (S * N)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(C.mean()), float(lo), float(hi)


def _outcomes(collected: dict[str, Any]) -> dict[tuple[str, str, str], dict[int, dict[str, Any]]]:
    """(task, optimizer, method) -> seed -> that run's record, with ``correct`` as an array."""
    cells: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for run in collected["runs"]:
        outcome = run | {"correct": np.array([c == "1" for c in run["correct"]], dtype=float)}
        cells.setdefault((run["task"], run["optimizer"], run["method"]), {})[run["seed"]] = outcome
    return cells


def cell_stats(collected: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task, optimizer and method: the seeds run, each one's accuracy, held-out loss and :func:`commonest` answer,
    and the accuracy over seeds and examples with its 95% interval (:func:`bootstrap_interval`)."""
    out = []
    for (task, optimizer, method), by_seed in _outcomes(collected).items():
        seeds = sorted(by_seed)
        mean, lo, hi = bootstrap_interval(np.stack([by_seed[s]["correct"] for s in seeds]))
        out.append(
            {"task": task, "optimizer": optimizer, "method": method, "lr": by_seed[seeds[0]]["lr"], "seeds": seeds}
            | {
                "accuracy": [by_seed[s]["accuracy"] for s in seeds],
                "eval_loss": [by_seed[s]["eval_loss"] for s in seeds],
                "top_answer": [by_seed[s]["top_answer"] for s in seeds],
                "top_answer_share": [by_seed[s]["top_answer_share"] for s in seeds],
            }
            | {"mean": mean, "low": lo, "high": hi}
        )
    return out


def claim_stats(collected: dict[str, Any]) -> list[dict[str, Any]]:
    """Per claim of :data:`CLAIMS`, task and optimizer with both methods run on a common seed: the accuracy
    difference A - B on the same seeds and examples with its paired 95% interval, the verdict: ``agrees``
    (the interval lies above 0), ``disagrees`` (below 0) or ``not resolved``; and ``one_answer``, which of A and B
    have a run among those seeds that gives one answer to :data:`ONE_ANSWER_SHARE` of the examples."""
    cells, out = _outcomes(collected), []
    tasks = dict.fromkeys(run["task"] for run in collected["runs"])  # in the protocol's order
    optimizers = dict.fromkeys(run["optimizer"] for run in collected["runs"])
    for paper, claim, a, b in CLAIMS:
        for task in tasks:
            for optimizer in optimizers:
                first, second = cells.get((task, optimizer, a), {}), cells.get((task, optimizer, b), {})
                seeds = sorted(set(first) & set(second))
                if not seeds:
                    continue
                difference = np.stack([first[s]["correct"] - second[s]["correct"] for s in seeds])
                mean, lo, hi = bootstrap_interval(difference)
                verdict = "agrees" if lo > 0 else "disagrees" if hi < 0 else "not resolved"
                one_answer = [
                    side
                    for side, runs in (("A", first), ("B", second))
                    if any(runs[s]["top_answer_share"] >= ONE_ANSWER_SHARE for s in seeds)
                ]
                out.append(
                    {"paper": paper, "claim": claim, "a": a, "b": b, "task": task, "optimizer": optimizer}
                    | {"seeds": seeds, "difference": mean, "low": lo, "high": hi, "verdict": verdict}
                    | {"one_answer": one_answer}
                )
    return out


def damping_stats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The damping sweep's rows (of its runs' ``records``, one seed): plain AdamW's (``reg`` None) first, then the
    preconditioned arm's by ``reg``, each with its validation loss and test accuracy with its 95% interval (the
    binomial one: :func:`bootstrap_interval` of one seed) where run, and, beside plain's, the differences: of the
    validation loss, and of the accuracy on the same test examples with its paired interval."""
    by_key = {(r["method"], r.get("reg"), r["split"]): r for r in records}
    arms = sorted({(method, reg) for method, reg, _ in by_key}, key=lambda arm: (arm[1] is not None, arm[1] or 0.0))
    plain = next((arm for arm in arms if arm[1] is None), None)

    def correct(arm: tuple[str, float | None]) -> np.ndarray | None:
        test = by_key.get((*arm, "test"))
        return None if test is None else np.array([[c == "1" for c in test["correct"]]], dtype=float)

    rows = []
    for arm in arms:
        validation, test = by_key.get((*arm, "validation")), by_key.get((*arm, "test"))
        row: dict[str, Any] = {"method": arm[0], "reg": arm[1]}
        if validation is not None:
            row["validation_loss"] = validation["eval_loss"]
            if plain is not None and arm != plain and (*plain, "validation") in by_key:
                row["validation_loss_difference"] = (
                    validation["eval_loss"] - by_key[(*plain, "validation")]["eval_loss"]
                )
        if test is not None:
            mean, lo, hi = bootstrap_interval(correct(arm))
            row |= {"accuracy": mean, "low": lo, "high": hi, "top_answer_share": test["top_answer_share"]}
            if plain is not None and arm != plain and (baseline := correct(plain)) is not None:
                mean, lo, hi = bootstrap_interval(correct(arm) - baseline)
                row |= {"difference": mean, "difference_low": lo, "difference_high": hi}
        rows.append(row)
    return rows


def statistics(collected: dict[str, Any]) -> dict[str, Any]:
    """A paired protocol's statistics of its ``collected`` runs: the ``bootstrap``'s settings, ``cells``
    (:func:`cell_stats`) and ``claims`` (:func:`claim_stats`)."""
    bootstrap = {"level": 0.95, "resamples": BOOTSTRAP_RESAMPLES, "rng_seed": BOOTSTRAP_SEED}
    return {"bootstrap": bootstrap, "cells": cell_stats(collected), "claims": claim_stats(collected)}
