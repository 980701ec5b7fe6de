"""A fine-tuning job, built once from its settings: what the training loop, the benchmarks and the compile check
share.

:func:`setup` builds a run: it joins a multi-process job if configured, then loads and checks everything that can
refuse the run (the model files, the data under ``data.overflow``, the mesh against the batch sizes, the latest
checkpoint's fingerprint, a warm start's source, the weights) and only then records the attempt in
``output_dir`` (``config.json``, a line in ``commands.jsonl``, ``metrics.jsonl`` cut back to the resumed step). So a
refused attempt leaves the directory's record of itself as it was. The :class:`Job` holds the model, tokenizer,
data, mesh, trainer, frozen weights, the state to start from, the learning-rate schedule and the batches.

:func:`setup_shapes` builds the same job from shapes alone, with no weights and no data: the parameters and state
as ``jax.ShapeDtypeStruct`` with their shardings (from a published shape, :mod:`moelora_jax.models.shapes`, or a
model directory's ``config.json``), and the batches of the worst case the settings allow, so that the exact programs
of a run can be compiled, or timed on random weights, without its files.

:func:`build_trainer`, :func:`load_data` and :func:`job_mesh` are the pieces both use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from moelora_jax.adapters.layers import AdapterKind
from moelora_jax.data.encoding import (
    Encoded,
    Example,
    Layout,
    batch_indices,
    encode_examples,
    round_up,
    turn_end_id,
)
from moelora_jax.data.pipeline import TrainBatches
from moelora_jax.data.splits import hold_out
from moelora_jax.data.tasks import Task, load_task
from moelora_jax.errors import UserError, in_setting
from moelora_jax.evaluation.scoring import task_score
from moelora_jax.formats.mole import stack_loras, with_loras
from moelora_jax.formats.warm_start import source_digest, warm_adapters
from moelora_jax.io.atomic import write_text_atomically
from moelora_jax.io.storage import OutputDirectory, is_remote, local_copy
from moelora_jax.models.llama import Llama, LlamaConfig, abstract_variables, init_variables
from moelora_jax.models.pretrained import check_vocabulary, load_config, load_params, load_tokenizer, resolve_model_dir
from moelora_jax.models.shapes import SHAPES, published_shape
from moelora_jax.optim.optimizer import build_optimizer, lr_schedule
from moelora_jax.parallel.distributed import check_shared_directory, initialize, is_primary, to_host
from moelora_jax.parallel.sharding import batch_sharding, make_mesh
from moelora_jax.training.checkpoints import Checkpoints
from moelora_jax.training.run_log import RunLog, check_wandb_login, open_wandb, record_command
from moelora_jax.training.settings import DataSettings, Settings
from moelora_jax.training.trainer import Trainer, TrainState

SETTINGS_FILE = "config.json"
"""The run's resolved settings (:meth:`Settings.to_dict`), written into ``output_dir`` once the run is accepted."""


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A job's examples: the task, and the training and held-out examples kept under ``data.overflow`` with their
    encodings (``train[i]`` encodes ``train_examples[i]``)."""

    task: Task
    train_examples: list[Example]
    train: list[Encoded]
    eval_examples: list[Example]
    eval: list[Encoded]


def _subset(examples: list, limit: int, seed: int) -> list:
    if limit <= 0 or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def _encoded(tokenizer: Any, examples: list, data: DataSettings, which: str, end_id: int | None) -> tuple[list, list]:
    """The examples that fit ``data.max_length`` under ``data.overflow`` and their encodings, each response ended
    by ``end_id``; says how many were truncated or dropped."""
    encoded, counts = encode_examples(
        tokenizer,
        examples,
        data.max_length,
        use_chat_template=data.chat_template,
        overflow=data.overflow,
        end_id=end_id,
    )
    if examples and counts.dropped == len(examples):
        raise UserError(
            f"all {len(examples)} {which} examples are longer than data.max_length={data.max_length} and "
            f"data.overflow={data.overflow} dropped them: raise data.max_length or set data.overflow=truncate."
        )
    if (counts.truncated or counts.dropped) and is_primary():
        print(
            f"data: of {len(examples)} {which} examples longer than data.max_length={data.max_length}, "
            f"{counts.truncated} had their prompt truncated and {counts.dropped} were dropped "
            f"(data.overflow={data.overflow})."
        )
    return [examples[i] for i in counts.kept], encoded


def load_data(settings: Settings, tokenizer: Any, end_ids: Sequence[int] = ()) -> TaskData:
    """The task's training and held-out examples (the test examples, or the validation ones held out of training:
    ``data.eval_on``; ``data.max_*_examples`` subsets drawn by the seeds), encoded with
    each response ended as the chat template ends a turn, where that is one of the model's ``end_ids``
    (:func:`~moelora_jax.data.encoding.turn_end_id`); a ``UserError`` for bad files and for a training set smaller
    than one batch."""
    d, t = settings.data, settings.train
    task, train_examples = load_task(d.task, d.train_path or None, d.train_split)
    _, eval_examples = load_task(d.task, d.eval_file or None, d.eval_split)
    test_prompts = {e.prompt for e in eval_examples}
    train_examples, validation = hold_out(train_examples, d.validation_examples, test_prompts)
    if d.eval_on == "validation":
        eval_examples = validation
    end = turn_end_id(tokenizer, end_ids) if d.chat_template else None
    train = _subset(train_examples, d.max_train_examples, t.seed)
    train_examples, train = _encoded(tokenizer, train, d, "training", end)
    eval_seed = t.seed + 1 if d.eval_seed < 0 else d.eval_seed
    evaluated = _subset(eval_examples, d.max_eval_examples, eval_seed)
    eval_examples, evaluated = _encoded(tokenizer, evaluated, d, "eval", end)
    batch_indices(len(train), t.batch_size, seed=t.seed, step=0)  # an empty or too small set fails here
    return TaskData(task, train_examples, train, eval_examples, evaluated)


def job_mesh(settings: Settings, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``mesh.*`` mesh over ``devices`` (default: all); a ``UserError`` when the data shards do not divide a
    micro-batch or an evaluation batch."""
    m, t = settings.mesh, settings.train
    mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    shards = data_shards(mesh)
    for name, size in (
        ("batch_size // micro_batches", t.batch_size // t.micro_batches),
        ("eval_batch_size", t.eval_batch_size),
    ):
        if size % shards:
            raise UserError(f"train.{name}={size} must be a multiple of the mesh's data x fsdp = {shards} devices.")
    return mesh


def data_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the mesh's ``data x fsdp``."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def build_trainer(settings: Settings, model_config: LlamaConfig, mesh: Mesh) -> Trainer:
    """The model the settings describe (adapter, targets, dtypes, remat, attention, quantized base) and its
    trainer: the optimizer of ``optim.*`` over the adapters' shapes, the routing losses of ``adapter.*``."""
    m, a = settings.model, settings.adapter
    platform = mesh.devices.flat[0].platform
    if m.attention == "splash" and platform not in ("tpu", "cpu"):
        raise UserError(
            f"model.attention=splash is a TPU kernel and these devices are {platform}: use model.attention=cudnn "
            "(or xla) on GPUs"
        )
    if m.attention == "cudnn" and platform != "gpu":
        others = "model.attention=splash (or xla)" if platform == "tpu" else "model.attention=xla"
        raise UserError(
            f"model.attention=cudnn is a kernel for NVIDIA GPUs and these devices are {platform}: use {others}"
        )
    model = Llama(
        model_config,
        adapter=a.config,
        adapter_targets=a.targets,
        dtype=m.compute_dtype,
        param_dtype=m.weights_dtype,
        remat=m.remat,
        attention_impl=m.attention,
        quant=m.quant,
    )
    optimizer = build_optimizer(settings.optim, nn.unbox(abstract_variables(model))["adapters"])
    return Trainer(model, optimizer, mesh, router_losses=a.router_losses)


def batch_layout(data: DataSettings, encoded: list, rows_multiple: int) -> Layout:
    """The batch layout ``data`` asks for, its targets width fitted to ``encoded``."""
    return Layout.fitted(
        encoded,
        data.max_length,
        pack_length=data.row_length,
        length_bucket=data.length_bucket,
        rows_multiple=rows_multiple,
    )


def eval_batches(settings: Settings, encoded: list[Encoded], pad_id: int, mesh: Mesh) -> list[dict[str, np.ndarray]]:
    """The held-out examples as ``(rows, length)`` batches of ``train.eval_batch_size`` examples, for the eval loss;
    without packing the last batch is filled up with repeats of its last example (one shape; repeats barely move
    the mean)."""
    size = settings.train.eval_batch_size
    layout = batch_layout(settings.data, encoded, rows_multiple=data_shards(mesh))
    chunks = [encoded[i : i + size] for i in range(0, len(encoded), size)]
    if not layout.pack_length:
        chunks = [c + [c[-1]] * (size - len(c)) for c in chunks]
    return [layout(c, pad_id) for c in chunks]


def learning_rates(settings: Settings) -> np.ndarray:
    """``(train.steps,)`` float32: the experts' learning rate at each update (index ``step - 1``), computed once,
    so the loop reports it without asking the devices."""
    schedule = lr_schedule(settings.optim.lr, settings.optim)
    return np.asarray(jax.jit(schedule)(jnp.arange(settings.train.steps)))


@dataclasses.dataclass(frozen=True)
class Job:
    """A run, set up: everything :func:`~moelora_jax.training.loop.train_loop` and
    :func:`~moelora_jax.training.run.finish` read.

    ``state`` is the state to start from (fresh, warm-started or resumed at ``first_step``, with ``first_skipped``
    updates already skipped); ``batches`` gives each step's batch; ``eval_batches`` are the held-out batches of the
    eval loss; ``learning_rates[step - 1]`` is the reported rate of each step; ``log`` writes the records; ``started``
    is the ``time.perf_counter()`` the attempt began at.
    """

    settings: Settings
    output: OutputDirectory
    model_dir: Path
    model_config: LlamaConfig
    tokenizer: Any
    data: TaskData
    mesh: Mesh
    trainer: Trainer
    params: Any
    checkpoints: Checkpoints
    state: TrainState
    first_step: int
    first_skipped: int
    batches: TrainBatches
    eval_batches: list[dict[str, np.ndarray]]
    learning_rates: np.ndarray
    log: RunLog
    started: float

    def evaluate(self, adapters: Any, step: int, examples_file: Path | None = None) -> dict[str, Any]:
        """``{"step", <the task's metric>, "eval_loss"}`` of ``adapters`` on the held-out examples: the loss on
        ``eval_batches``; the metric by greedy generation (each example's outcome also to ``examples_file``) unless
        ``train.score`` is off."""
        d, t, task = self.settings.data, self.settings.train, self.data.task
        loss = self.trainer.eval_loss(self.params, adapters, self.eval_batches)
        if not t.score:
            return {"step": step, "eval_loss": loss}
        score = task_score(
            self.trainer,
            self.params,
            adapters,
            self.tokenizer,
            task,
            self.data.eval_examples,
            batch_size=t.eval_batch_size,
            prompt_length=d.max_length,
            max_new_tokens=t.max_new_tokens,
            use_chat_template=d.chat_template,
            length_bucket=d.length_bucket,
            examples_file=examples_file,
        )
        return {"step": step, task.metric: score, "eval_loss": loss}


def pad_id(tokenizer: Any, model_config: LlamaConfig) -> int:
    """The padding token: the tokenizer's, else the model's first end token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.eos_token_ids[0]


def _compilation_cache(setting: str, output: OutputDirectory) -> None:
    """Point JAX's persistent compilation cache at ``setting``: ``auto`` keeps ``$JAX_COMPILATION_CACHE_DIR`` if
    set, else uses ``$XDG_CACHE_HOME/moelora_jax/xla`` (default ``~/.cache``); ``output_dir`` uses
    ``<output_dir>/compilation_cache``; any other value is a directory, local or remote (``gs://...``); ``""`` leaves
    the cache off."""
    if setting == "auto":
        if jax.config.jax_compilation_cache_dir:
            return
        setting = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelora_jax" / "xla")
    elif setting == "output_dir":
        setting = os.fspath(output.root / "compilation_cache")
    if setting:
        jax.config.update(
            "jax_compilation_cache_dir", setting if is_remote(setting) else str(Path(setting).expanduser())
        )


def _fingerprint(settings: Settings, model_config: LlamaConfig, encoded: list, init_from: Path | None) -> dict:
    """What a checkpoint must agree with to be resumed (see :mod:`moelora_jax.training.checkpoints`); a warm start's
    source digest among them."""
    digest = hashlib.sha256()
    for e in encoded:
        digest.update(e.tokens.tobytes() + e.loss_mask.tobytes())
    a, o = settings.adapter, settings.optim
    adapter = dataclasses.asdict(a.config)
    adapter.pop("masked", None)  # MoLE masking changes inference only: a masked run may resume an unmasked one
    if init_from is not None:
        adapter["init_from"] = source_digest(init_from)
    return {
        "adapter": adapter | {"targets": ",".join(a.targets), "sources": ",".join(a.sources)},
        "model": dataclasses.asdict(model_config),
        "optimizer": {"family": o.family, "riemann": o.riemann, "gauss_seidel": o.gauss_seidel, "frozen": o.frozen},
        "data": {
            "seed": settings.train.seed,
            "batch_size": settings.train.batch_size,
            "examples": len(encoded),
            "sha256": digest.hexdigest()[:16],
        },
    }


def _resume(checkpoints: Checkpoints, fresh: TrainState, resume: str) -> TrainState:
    """The state to start from under ``checkpoint.resume`` (``latest``, ``never`` or a step number)."""
    steps = checkpoints.steps()
    if resume == "never":
        if steps:
            raise UserError(
                f"{checkpoints.directory} already holds checkpoints (steps {steps}) and checkpoint.resume=never: "
                "resume them (checkpoint.resume=latest) or choose another output_dir."
            )
        return fresh
    with in_setting(f"checkpoint.resume={resume}"):
        if resume == "latest":
            return checkpoints.restore(fresh) if steps else fresh
        return checkpoints.restore(fresh, step=int(resume))


def _warm_start(directory: Path, fresh: Any, settings: Settings, model_config: LlamaConfig) -> Any:
    """``fresh`` (the adapters on the devices) replaced by those of ``directory``, placed as ``fresh`` is."""
    a = settings.adapter
    with in_setting("adapter.init_from"):
        host = warm_adapters(directory, to_host(fresh), adapter=a.config, targets=a.targets, model_config=model_config)
    if is_primary():
        print(f"adapters: initialised from {a.init_from}; the optimizer starts fresh at step 0.")
    return jax.tree.map(lambda h, x: jax.make_array_from_callback(x.shape, x.sharding, lambda i: h[i]), host, fresh)


def _record_start(output: OutputDirectory, settings: Settings, argv: Sequence[str] | None, first_step: int) -> RunLog:
    """Record the accepted attempt (process 0 only): fill the staging copy of ``output`` from the remote one, write
    the settings and this attempt's command line, push them, and open the run's log at ``first_step`` (records past
    it dropped); say that free space goes unchecked on an object store."""
    if not is_primary():
        return RunLog(output.local, resume_step=first_step, enabled=False)
    output.pull()
    write_text_atomically(output.local / SETTINGS_FILE, json.dumps(settings.to_dict(), indent=2))
    record_command(output.local, argv, processes=jax.process_count())
    output.push()
    if output.remote:
        print(f"checkpoints: {output.root} is an object store, so free space is not checked before each save.")
    log = settings.log
    tracker = None
    if log.wandb:
        tracker = open_wandb(
            output.local,
            project=log.wandb_project,
            name=log.wandb_run or output.root.name,
            config=settings.to_dict(),
            resume_step=first_step,
        )
    return RunLog(output.local, resume_step=first_step, wandb=tracker)


def setup(settings: Settings, argv: Sequence[str] | None = None) -> Job:
    """The run of ``settings``, checked and loaded, its attempt recorded (see the module docstring). ``argv`` is
    the command line written to ``commands.jsonl`` (None when started from Python). Raises ``UserError`` for bad
    input, before the output directory's records change."""
    started = time.perf_counter()
    settings = settings.described()
    output = OutputDirectory(settings.output_dir)
    _compilation_cache(settings.compilation_cache, output)
    dist = settings.distributed
    with in_setting("distributed"):
        initialize(dist.initialize, dist.coordinator_address, dist.num_processes, dist.process_id)
    output.prepare()
    check_shared_directory(output.root)
    if settings.log.wandb and is_primary():
        check_wandb_login()

    t, m, a = settings.train, settings.model, settings.adapter
    model_dir = resolve_model_dir(m.path or None)
    model_config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    check_vocabulary(tokenizer, model_config, model_dir)
    data = load_data(settings, tokenizer, model_config.eos_token_ids)
    mesh = job_mesh(settings)
    trainer = build_trainer(settings, model_config, mesh)

    init_from = local_copy(a.init_from) if a.init_from else None
    fingerprint = _fingerprint(settings, model_config, data.train, init_from)
    checkpoints = Checkpoints(output.root / "checkpoints", fingerprint, keep=settings.checkpoint.keep)
    state = _resume(checkpoints, trainer.init(jax.random.key(t.seed)), settings.checkpoint.resume)
    first_step, first_skipped = int(state.step), int(state.skipped)
    if init_from is not None and first_step == 0:
        state = state._replace(adapters=_warm_start(init_from, state.adapters, settings, model_config))
    params = load_params(
        model_dir, model_config, param_dtype=m.weights_dtype, shardings=trainer.shardings["params"], quant=m.quant
    )
    if a.kind is AdapterKind.MOLE:
        with in_setting("mole.loras"):
            params = with_loras(params, stack_loras(a.sources, model_config))
        params = jax.device_put(params, trainer.shardings["params"])

    pad = pad_id(tokenizer, model_config)
    batches = TrainBatches(
        data.train,
        batch_layout(settings.data, data.train, rows_multiple=t.micro_batches * data_shards(mesh)),
        pad,
        batch_size=t.batch_size,
        micro_batches=t.micro_batches,
        seed=t.seed,
        put=functools.partial(trainer.put_batch, leading=1),
    )
    return Job(
        settings=settings,
        output=output,
        model_dir=model_dir,
        model_config=model_config,
        tokenizer=tokenizer,
        data=data,
        mesh=mesh,
        trainer=trainer,
        params=params,
        checkpoints=checkpoints,
        state=state,
        first_step=first_step,
        first_skipped=first_skipped,
        batches=batches,
        eval_batches=eval_batches(settings, data.eval, pad, mesh),
        learning_rates=learning_rates(settings),
        log=_record_start(output, settings, argv, first_step),
        started=started,
    )


@dataclasses.dataclass(frozen=True)
class JobShapes:
    """A job from shapes alone: its trainer, and ``jax.ShapeDtypeStruct`` trees (shapes, dtypes, shardings) of the
    frozen ``params``, the train ``state``, the largest ``train_batch`` (``(micro_batches, rows, length)``) and
    ``eval_batch`` (``(rows, length)``) the settings allow."""

    settings: Settings
    model_config: LlamaConfig
    mesh: Mesh
    trainer: Trainer
    params: Any
    state: TrainState
    train_batch: dict[str, jax.ShapeDtypeStruct]
    eval_batch: dict[str, jax.ShapeDtypeStruct]

    def random_params(self, rng: jax.Array) -> Any:
        """Random frozen weights of these shapes, drawn on the devices already sharded (one compiled program)."""
        model = self.trainer.model
        init = jax.jit(
            lambda r: init_variables(model, r, ("params",))["params"], out_shardings=self.trainer.shardings["params"]
        )
        with self.trainer.context():
            return init(rng)


def worst_case_batch(settings: Settings, rows: int, mesh: Mesh, leading: tuple[int, ...] = ()) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct``s of the largest batch of ``rows`` examples the data settings allow, with axes
    ``(*leading, rows', length)`` sharded as the trainer places them: without packing, every example left-padded to
    ``data.max_length``; packed, every example alone in a row of ``data.pack_length`` (rows rounded up to the data
    shards times the leading axes); the targets as wide as a row can need."""
    d = settings.data
    length = d.row_length or d.max_length
    multiple = data_shards(mesh) * int(np.prod(leading, dtype=int))
    total = round_up(rows, multiple) if d.row_length else rows
    shape = (*leading, total // int(np.prod(leading, dtype=int)), length)
    fields = {"tokens": jnp.int32, "attention_mask": jnp.int32, "loss_mask": jnp.bool_}
    if d.row_length:
        fields |= {"segment_ids": jnp.int32, "positions": jnp.int32}
    sharding = batch_sharding(mesh, leading=len(leading))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in fields.items()}
    targets = (*shape[:-1], round_up(length - 1, 8))
    return batch | {"targets": jax.ShapeDtypeStruct(targets, jnp.int32, sharding=sharding)}


def model_shape(model: str | os.PathLike | LlamaConfig | None, settings: Settings) -> LlamaConfig:
    """The architecture ``model`` names: a :class:`LlamaConfig` as is, a published shape's name
    (:data:`~moelora_jax.models.shapes.SHAPES`), or a model directory or file whose ``config.json`` is read (no
    weights); None reads ``model.path``'s."""
    if isinstance(model, LlamaConfig):
        return model
    if isinstance(model, str) and model in SHAPES:
        return published_shape(model)
    return load_config(resolve_model_dir(model if model is not None else settings.model.path or None))


def setup_shapes(
    settings: Settings,
    model: str | os.PathLike | LlamaConfig | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> JobShapes:
    """The job of ``settings`` on ``model`` (see :func:`model_shape`) over ``devices`` (default: all; any devices a
    mesh can be built from, e.g. a TPU topology's for compiling without one), from shapes alone."""
    settings = settings.described()
    config = model_shape(model, settings)
    mesh = job_mesh(settings, devices)
    trainer = build_trainer(settings, config, mesh)
    t = settings.train
    return JobShapes(
        settings=settings,
        model_config=config,
        mesh=mesh,
        trainer=trainer,
        params=trainer.abstract_params(),
        state=trainer.abstract_state(),
        train_batch=worst_case_batch(settings, t.batch_size, mesh, leading=(t.micro_batches,)),
        eval_batch=worst_case_batch(settings, t.eval_batch_size, mesh),
    )
