"""A job's settings: each config section as a frozen, validated dataclass, built once from the ``ConfigDict``.

``Settings.from_config(config)`` checks every value before anything heavy is read, so a bad value is one
:class:`~moelora_jax.errors.UserError` line before any model or data is loaded; the job then reads only these
objects. ``Settings.to_dict()`` is what a run records (``config.json``) and the checkpoint fingerprint is built
from the same objects.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
from typing import Any

from moelora_jax.adapters.layers import AdapterConfig, AdapterKind, MoleConfig
from moelora_jax.adapters.quantize import QUANT_MODES, QuantConfig
from moelora_jax.adapters.routing import RouterLosses
from moelora_jax.data.encoding import OVERFLOW_POLICIES
from moelora_jax.data.splits import EVAL_SETS
from moelora_jax.data.tasks import TASKS
from moelora_jax.errors import UserError, check_at_least, check_choice, in_setting
from moelora_jax.formats.mole import describe_lora
from moelora_jax.io.storage import is_remote
from moelora_jax.models.llama import ATTENTION_IMPLS, DTYPES, REMAT_CHOICES, TARGETS, check_targets
from moelora_jax.optim.optimizer import OptimConfig
from moelora_jax.parallel.distributed import INITIALIZE_CHOICES


def _json_fields(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dataclass's fields as a dict, enums by their values."""
    return {name: value.value if isinstance(value, enum.Enum) else value for name, value in items}


def _optim(optim: Any) -> OptimConfig:
    with in_setting("optim"):
        return OptimConfig(**optim.to_dict())


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """``model.*``: where the frozen base comes from, how it is stored (``quantize``) and how it computes."""

    path: str
    dtype: str
    param_dtype: str
    remat: str
    attention: str
    quantize: str
    quant_block_size: int
    double_quant: bool

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, tuple(DTYPES))
        check_choice("model.param_dtype", self.param_dtype, tuple(DTYPES))
        check_choice("model.remat", self.remat, REMAT_CHOICES)
        check_choice("model.attention", self.attention, ATTENTION_IMPLS)
        check_choice("model.quantize", self.quantize, QUANT_MODES)
        if self.quantize == "nf4" and (self.quant_block_size <= 0 or self.quant_block_size % 2):
            raise UserError(f"model.quant_block_size={self.quant_block_size} must be a positive even number (e.g. 64).")
        if self.double_quant and self.quantize != "nf4":
            raise UserError("model.double_quant=True compresses NF4's scales: it needs model.quantize=nf4.")

    @property
    def quant(self) -> QuantConfig:
        """The frozen kernels' storage (:mod:`moelora_jax.adapters.quantize`)."""
        return QuantConfig(self.quantize, self.quant_block_size, self.double_quant)

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weights_dtype(self) -> Any:
        return DTYPES[self.param_dtype]


@dataclasses.dataclass(frozen=True)
class MoleSources:
    """``mole.*``: MoLE's source LoRA directories and its gate's options. The adapter itself (its rank, the largest
    source's; its targets, every projection a source adapts) comes from the sources' files: :meth:`adapter`."""

    loras: tuple[str, ...]
    gate: str
    tau: float
    masked: tuple[int, ...]

    @classmethod
    def from_config(cls, mole: Any) -> MoleSources:
        loras = tuple(s.strip() for s in mole.loras.split(",") if s.strip())
        if len(loras) < 2:
            raise UserError(f"mole.loras={mole.loras!r} must list at least 2 LoRA directories, comma-separated.")
        remote = [s for s in loras if is_remote(s)]
        if remote:
            raise UserError(
                f"mole.loras: {remote[0]} is in an object store; MoLE's LoRA sources must be local: copy them down."
            )
        masked = str(mole.masked).replace(",", " ").split()
        if not all(m.isdigit() for m in masked):
            raise UserError(f"mole.masked={mole.masked!r} must list LoRA indices, e.g. '1' or '0,2'.")
        check_at_least("mole.balance_loss", mole.balance_loss, 0)
        sources = cls(loras, mole.gate, mole.tau, tuple(int(m) for m in masked))
        with in_setting("mole"):
            MoleConfig(len(loras), 1, sources.gate, sources.tau, sources.masked)  # the options, checked before any file
        return sources

    def adapter(self) -> tuple[MoleConfig, tuple[str, ...]]:
        """The MoLE adapter and its targets, from the sources' JSON (no tensor is read)."""
        with in_setting("mole.loras"):
            described = [describe_lora(s) for s in self.loras]
        targets = tuple(t for t in TARGETS if any(t in found for _, found in described))
        rank = max(r for r, _ in described)
        return MoleConfig(len(self.loras), rank, self.gate, self.tau, self.masked), targets


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """``adapter.*`` (and ``mole.*`` for MoLE): the adapter's kind, the adapter, the projections it adapts, the
    routing losses' coefficients and the adapter directory a fresh run starts from (``init_from``,
    :mod:`moelora_jax.formats.warm_start`; empty: random). A MoLE adapter and its targets come from its sources'
    files, so they are None and ``()`` until :meth:`described` reads them (the job's setup does): validating reads
    no file."""

    kind: AdapterKind
    config: AdapterConfig | MoleConfig | None
    targets: tuple[str, ...]
    mole: MoleSources | None
    router_losses: RouterLosses
    init_from: str

    @classmethod
    def from_config(cls, adapter: Any, mole: Any = None) -> AdapterSettings:
        check_choice("adapter.kind", adapter.kind, tuple(k.value for k in AdapterKind))
        kind = AdapterKind(adapter.kind)
        if min(adapter.balance_loss, adapter.z_loss) < 0 or (
            max(adapter.balance_loss, adapter.z_loss) > 0 and not kind.routed
        ):
            raise UserError(
                f"adapter.balance_loss={adapter.balance_loss} and adapter.z_loss={adapter.z_loss} must be >= 0, and "
                "need a gate (adapter.kind=moe_lora) to be > 0."
            )
        if adapter.init_from and not kind.trains_factors:
            raise UserError("adapter.init_from starts lora and moe_lora runs; a MoLE run's experts are mole.loras.")
        if kind is AdapterKind.MOLE:
            if mole is None:
                raise UserError("adapter.kind=mole needs the mole.* settings: use --config configs/mole.py.")
            losses = RouterLosses(adapter.balance_loss, adapter.z_loss, mole.balance_loss)
            return cls(kind, None, (), MoleSources.from_config(mole), losses, adapter.init_from)
        plain = kind is AdapterKind.LORA
        with in_setting("adapter"):
            config = AdapterConfig(
                num_experts=1 if plain else adapter.num_experts,
                rank=adapter.rank,
                top_k=None if plain else adapter.top_k,
                alpha=adapter.alpha,
                dropout=adapter.dropout,
                strategy=adapter.strategy,
                mixer=adapter.mixer,
            )
        targets = tuple(t.strip() for t in adapter.targets.split(",") if t.strip())
        check_targets("adapter.targets", targets)
        losses = RouterLosses(adapter.balance_loss, adapter.z_loss)
        return cls(kind, config, targets, None, losses, adapter.init_from)

    @property
    def sources(self) -> tuple[str, ...]:
        """MoLE's source LoRA directories (none for the other kinds)."""
        return () if self.mole is None else self.mole.loras

    def described(self) -> AdapterSettings:
        """These settings with MoLE's adapter and targets read from its sources (the others are complete as they
        are)."""
        if self.config is not None:
            return self
        config, targets = self.mole.adapter()
        return dataclasses.replace(self, config=config, targets=targets)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """``data.*``: the task's files, how examples are tokenized (``overflow``: what an example longer than
    ``max_length`` becomes) and how they are laid out in batches. ``validation_examples`` training examples are held
    out, never trained on (the same ones for every seed and run: :mod:`moelora_jax.data.splits`); ``eval_on`` picks
    the held-out examples evaluation uses: ``test`` (the eval file's ``eval_split``) or ``validation`` (those)."""

    task: str
    train_path: str
    eval_path: str
    train_split: str
    eval_split: str
    max_length: int
    overflow: str
    packing: bool
    pack_length: int
    length_bucket: int
    chat_template: bool
    max_train_examples: int
    max_eval_examples: int
    eval_seed: int
    validation_examples: int
    eval_on: str

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"data.task={self.task!r} is not a task format: choose from {sorted(TASKS)}.")
        check_at_least("data.max_length", self.max_length, 2)
        check_choice("data.overflow", self.overflow, OVERFLOW_POLICIES)
        check_at_least("data.length_bucket", self.length_bucket, 1)
        check_at_least("data.eval_seed", self.eval_seed, -1)
        check_at_least("data.validation_examples", self.validation_examples, 0)
        check_choice("data.eval_on", self.eval_on, EVAL_SETS)
        if self.eval_on == "validation" and not self.validation_examples:
            raise UserError("data.eval_on=validation needs data.validation_examples > 0 to hold out.")
        if self.pack_length and self.pack_length < self.max_length:
            raise UserError(
                f"data.pack_length={self.pack_length} must be 0 (rows as long as the window) or at least "
                f"data.max_length={self.max_length}, so that every example fits a row."
            )

    @property
    def row_length(self) -> int:
        """Tokens per packed row, or 0 without packing."""
        return (self.pack_length or self.max_length) if self.packing else 0

    @property
    def eval_file(self) -> str:
        """The evaluation examples' file: ``eval_path``, else the training file (its ``eval_split``)."""
        return self.eval_path or self.train_path


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """``train.*``: steps, batches, evaluation (``score``: the task's metric by generation besides the loss; False:
    the loss only), logging, how many non-finite (skipped) updates a run may have, and how often the processes of a
    multi-process run agree on whether to stop (``stop_check_every`` steps)."""

    steps: int
    batch_size: int
    micro_batches: int
    seed: int
    eval_every: int
    eval_before: bool
    eval_batch_size: int
    max_new_tokens: int
    score: bool
    log_every: int
    max_skipped_fraction: float
    stop_check_every: int

    def __post_init__(self) -> None:
        names = ("steps", "batch_size", "micro_batches", "eval_batch_size", "max_new_tokens", "log_every")
        for name in (*names, "stop_check_every"):
            check_at_least(f"train.{name}", getattr(self, name), 1)
        check_at_least("train.eval_every", self.eval_every, 0)
        if self.batch_size % self.micro_batches:
            raise UserError(
                f"train.batch_size={self.batch_size} must be a multiple of train.micro_batches={self.micro_batches}."
            )
        if not 0 <= self.max_skipped_fraction < 1:
            raise UserError(f"train.max_skipped_fraction={self.max_skipped_fraction} must lie in [0, 1).")


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """``checkpoint.*``: ``every`` steps (0: at the end only), the newest ``keep``, and what to ``resume``."""

    every: int
    keep: int
    resume: str

    def __post_init__(self) -> None:
        check_at_least("checkpoint.every", self.every, 0)
        check_at_least("checkpoint.keep", self.keep, 1)
        if self.resume not in ("latest", "never") and not self.resume.isdigit():
            raise UserError(f"checkpoint.resume={self.resume!r} must be 'latest', 'never' or a step number.")


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """``export.*``: which exports to write (PEFT and merged apply to plain LoRA only)."""

    adapters: bool
    peft: bool
    merged: bool


@dataclasses.dataclass(frozen=True)
class LogSettings:
    """``log.*``: trackers beside ``metrics.jsonl`` and TensorBoard: Weights & Biases when ``wandb`` (project
    ``wandb_project``, run name ``wandb_run`` or the output directory's name)."""

    wandb: bool
    wandb_project: str
    wandb_run: str

    def __post_init__(self) -> None:
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise UserError("log.wandb=True needs the wandb package: pip install 'moelora_jax[wandb]'.")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """``distributed.*``: how to join a multi-process job (:func:`moelora_jax.parallel.distributed.initialize`)."""

    initialize: str
    coordinator_address: str
    num_processes: int
    process_id: int

    def __post_init__(self) -> None:
        check_choice("distributed.initialize", self.initialize, INITIALIZE_CHOICES)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """``mesh.*``: the ``(data, fsdp, tensor)`` device mesh; one size may be -1 (the rest of the devices)."""

    data: int
    fsdp: int
    tensor: int


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of a job, validated."""

    output_dir: str
    compilation_cache: str
    model: ModelSettings
    adapter: AdapterSettings
    optim: OptimConfig
    data: DataSettings
    train: TrainSettings
    checkpoint: CheckpointSettings
    export: ExportSettings
    log: LogSettings
    distributed: DistributedSettings
    mesh: MeshSettings

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        """The settings of a ``configs/*.py`` config; the first bad value raises a one-line ``UserError``."""
        checkpoint = config.checkpoint.to_dict() | {"resume": str(config.checkpoint.resume)}
        return cls(
            output_dir=config.output_dir,
            compilation_cache=config.compilation_cache,
            model=ModelSettings(**config.model.to_dict()),
            adapter=AdapterSettings.from_config(config.adapter, config.get("mole")),
            optim=_optim(config.optim),
            data=DataSettings(**config.data.to_dict()),
            train=TrainSettings(**config.train.to_dict()),
            checkpoint=CheckpointSettings(**checkpoint),
            export=ExportSettings(**config.export.to_dict()),
            log=LogSettings(**config.log.to_dict()),
            distributed=DistributedSettings(**config.distributed.to_dict()),
            mesh=MeshSettings(**config.mesh.to_dict()),
        )

    def described(self) -> Settings:
        """These settings with every adapter detail that lives in files read (MoLE's sources:
        :meth:`AdapterSettings.described`); the job's setup starts with this."""
        return dataclasses.replace(self, adapter=self.adapter.described())

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-compatible nested dicts (the adapter's resolved config under ``adapter.config``)."""
        return dataclasses.asdict(self, dict_factory=_json_fields)
