"""Test setup, before JAX initialises its backends.

- 8 fake CPU devices for the sharding tests (which place their meshes on CPU devices explicitly).
- Full float32 matmul precision, so that oracle tolerances mean the same on CPU and on GPU/TPU, where the default
  lets float32 matmuls run in TF32/bfloat16 passes.
- JAX on the CPU only (``JAX_PLATFORMS=cpu``, inherited by the ``train.py`` subprocesses): the tests never need an
  accelerator, and with the ``tpu`` extra installed JAX would otherwise probe for a TPU (and its metadata server)
  in every process. The compile check still compiles for TPU topologies through libtpu.
- Single-threaded Eigen on the CPU: XLA's multi-threaded Eigen pool has been seen to wedge forever on small
  (2-core) machines; the tests' tensors are small, so this costs them nothing measurable and keeps CI from hanging.
"""

import contextlib
import os
import subprocess

os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in (os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false") if flag
)

os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402
import tiny_models  # noqa: E402

TINY_LLAMA = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@pytest.fixture
def tiny_llama(tmp_path):
    """``make(**overrides) -> (torch LlamaForCausalLM, directory it was saved to as safetensors)``: a tiny random
    transformers LLaMA, the PyTorch oracle for our model and loader."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def make(seed: int = 0, max_shard_size: str | None = None, dtype=None, **overrides):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()
        if dtype is not None:
            model = model.to(dtype)
        directory = tmp_path / f"llama-{seed}-{len(list(tmp_path.iterdir()))}"
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(directory, **kwargs)
        return model, directory

    return make


@pytest.fixture(scope="session")
def word_tokenizer():
    """The word-level test tokenizer (:func:`tiny_models.word_tokenizer`): fully predictable ids."""
    pytest.importorskip("transformers")
    return tiny_models.word_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, word_tokenizer):
    """A tiny random LLaMA with the word-level test tokenizer and its chat template, saved as a HF directory."""
    pytest.importorskip("torch")
    return tiny_models.save_tiny_llama(tmp_path_factory.mktemp("tiny-model"), word_tokenizer)


@pytest.fixture(scope="session")
def learnable_model_dir(tmp_path_factory, tiny_model_dir):
    """``tiny_model_dir`` with its output head scaled 25x: the 0.02-scale random head moves no logit by more than
    about 0.6, too little for an adapter to fit a task; scaled, a LoRA fits one in a few dozen steps."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("learnable-model")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.lm_head.weight.data *= 25.0
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture
def tmpfs():
    """``tmpfs(path, options)``: a context manager mounting a fresh tmpfs at ``path`` (created) and unmounting it
    after; the test skips where mounting is not allowed (it needs root)."""

    @contextlib.contextmanager
    def mount(path, options):
        path.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)

    return mount


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator on loopback for the session (:mod:`gcs_emulator`); ``gcs.bucket()`` gives a fresh bucket."""
    import gcs_emulator

    emulator, stop = gcs_emulator.start()
    try:
        yield emulator
    finally:
        stop()
