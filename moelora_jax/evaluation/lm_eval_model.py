"""Our LLaMA (optionally with exported adapters) as an EleutherAI lm-evaluation-harness model, ``moelora_jax``.

Requests are scored the way lm-eval's Hugging Face model scores them, in batched, jitted programs:

- ``loglikelihood(context, continuation)``: ``context + continuation`` is tokenized whole and split at the
  context's length (an empty context becomes the prefix token, BOS or else EOS: lm-eval's ``TemplateLM``); the model
  reads ``(context + continuation)[:-1]``, left-truncated to ``max_length``, and returns
  ``sum_i log softmax(z_{t_i})[c_i]`` over the continuation tokens ``c_i`` (predicted at positions ``t_i``) and
  whether every ``c_i`` is the argmax of its ``z_{t_i}``.
- ``loglikelihood_rolling(text)``: the same sum over the whole text, in disjoint windows of ``max_length`` tokens
  (lm-eval's rolling windows: the first conditions on the prefix token, each later one on the tokens before it).
- ``generate_until(context, gen_kwargs)``: greedy decoding with the KV cache
  (:func:`~moelora_jax.models.generation.generate`) for ``max_gen_toks`` tokens or until EOS, cut at the first stop
  string.

Requests that feed the model the same tokens and score the same number of them (e.g. the one-letter answers of a
multiple-choice question) differ only in their last token, so they share one row: its prefix log-probs and the
last position's full log-softmax serve them all. Rows are sorted longest first and batched ``batch_size`` at a
time (the last batch padded with copies), each left-padded to its longest row rounded up to ``length_bucket``
tokens; the scored width is a power of two. So few shapes compile.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from moelora_jax.data.encoding import left_pad, round_up
from moelora_jax.errors import UserError, check_at_least, check_choice
from moelora_jax.formats.native import load_adapters
from moelora_jax.io.storage import local_copy
from moelora_jax.models.generation import end_ids, generate
from moelora_jax.models.llama import DTYPES, Llama, abstract_variables, lm_head, output_head
from moelora_jax.models.loss import chunk_size
from moelora_jax.models.pretrained import load_pretrained

# One scoring request after tokenization: the (context, continuation) strings (None for rolling windows, which
# lm-eval does not cache one by one), the context tokens and the continuation tokens.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@functools.partial(jax.jit, static_argnames=("model",))
def score_tokens(
    model: Llama, variables: dict[str, Any], tokens: jax.Array, mask: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Log-probs and greedy flags of the tokens that follow the last ``W`` positions of left-padded rows.

    Args:
      tokens, mask: ``(B, T)`` model inputs, left-padded (``mask`` 1 on real tokens).
      targets: ``(B, W)`` int, ``W <= T``: ``targets[b, j]`` is the token after position ``T - W + j``.

    Returns:
      ``logprobs (B, W) = log softmax(z)[y]`` and ``greedy (B, W) = (argmax z == y)`` at those positions, and the
      last position's ``log softmax(z) (B, V)`` and ``argmax z (B,)``. The head runs on ``W`` positions only, a
      bounded number of ``(B, chunk, V)`` logits at a time.
    """
    batch, width = targets.shape
    hidden = model.apply(variables, tokens, mask, output="hidden")[:, -width:]
    head = output_head(variables["params"], model.config)
    chunk = chunk_size(batch, width, head.shape[1])
    padded = round_up(width, chunk)
    h = jnp.pad(hidden, ((0, 0), (0, padded - width), (0, 0)))
    y = jnp.pad(targets, ((0, 0), (0, padded - width)))

    def split(x):
        return jnp.moveaxis(x.reshape(batch, padded // chunk, chunk, *x.shape[2:]), 1, 0)

    def one_chunk(xs):
        h_chunk, y_chunk = xs
        logits = lm_head(h_chunk, head, model.config.final_logit_softcap)  # (B, chunk, V) float32
        picked = jnp.take_along_axis(logits, y_chunk[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == y_chunk

    logprobs, greedy = jax.lax.map(one_chunk, (split(h), split(y)))
    logprobs, greedy = (jnp.moveaxis(x, 0, 1).reshape(batch, padded)[:, :width] for x in (logprobs, greedy))
    last = lm_head(hidden[:, -1], head, model.config.final_logit_softcap)
    return logprobs, greedy, jax.nn.log_softmax(last, axis=-1), jnp.argmax(last, axis=-1)


def next_power_of_two(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


@register_model("moelora_jax")
class MoeloraLM(TemplateLM):
    """lm-eval's ``LM`` over a base model (HF directory, ``.gguf`` file, or None / ``""`` for the offline default
    SmolLM2-135M-Instruct) and, optionally, an adapter export of ours (``export/adapters``), on JAX's default device.

    ``batch_size``: rows per compiled batch. ``max_length``: the model's window (default: the config's
    ``max_position_embeddings``). ``length_bucket``: row lengths are rounded up to a multiple of it.
    ``max_gen_toks``: the default generation budget. ``dtype``: compute and weight dtype, ``float32`` or
    ``bfloat16`` (adapters and logits stay float32).
    """

    def __init__(
        self,
        model: str | None = None,
        adapters: str | None = None,
        batch_size: int | str = 16,
        max_length: int | str | None = None,
        length_bucket: int | str = 32,
        max_gen_toks: int | str = 256,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if str(batch_size) == "auto":
            raise UserError("batch_size='auto' is not supported: give a number of rows per batch.")
        self.batch_size, self.length_bucket, self._max_gen_toks = int(batch_size), int(length_bucket), int(max_gen_toks)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("length_bucket", self.length_bucket, 1)
        check_at_least("max_gen_toks", self._max_gen_toks, 1)
        check_choice("dtype", dtype, tuple(DTYPES))
        pretrained = load_pretrained(model or None, param_dtype=DTYPES[dtype])
        self.tokenizer = pretrained.tokenizer
        config = pretrained.config
        self._max_length = int(max_length) if max_length else config.max_position_embeddings
        check_at_least("max_length", self._max_length, 2)
        self._info = {
            "model": str(pretrained.directory),
            "adapters": adapters or "",
            "dtype": dtype,
            "max_length": self._max_length,
            "length_bucket": self.length_bucket,
        }
        self.variables = {"params": pretrained.params}
        kwargs = {"dtype": DTYPES[dtype], "param_dtype": DTYPES[dtype]}
        if adapters:
            exported = load_adapters(local_copy(adapters))
            self.model = Llama(config, adapter=exported.adapter, adapter_targets=exported.targets, **kwargs)
            self.variables["adapters"] = self._checked_adapters(exported.adapters, adapters, pretrained.directory)
        else:
            self.model = Llama(config, **kwargs)
        self.eos_ids = end_ids(config, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eot_token_id if pad is None else pad

    def _checked_adapters(self, adapters: dict[str, Any], source: str, base: Any) -> dict[str, Any]:
        """``adapters`` on the device, after checking they have the tree and shapes this base model needs."""
        want = nn.unbox(abstract_variables(self.model))["adapters"]
        shapes, want_shapes = ([np.shape(x) for x in jax.tree.leaves(tree)] for tree in (adapters, want))
        if jax.tree.structure(adapters) != jax.tree.structure(want) or shapes != want_shapes:
            raise UserError(
                f"the adapters in {source} do not fit the base model {base} (other layers or widths): "
                "pass the base model they were trained on."
            )
        return jax.device_put(adapters)

    # ------------------------------------------------------------------------------------------- tokenization

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) conditions on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; by default with the tokenizer's own special tokens, unless the string already
        starts with the BOS text."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def get_model_info(self) -> dict[str, str | int]:
        """What lm-eval records in its results' ``config``."""
        return dict(self._info)

    # ---------------------------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(
        self, requests: Sequence[TokenRequest], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, all greedy)`` per tokenized request, in order."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows: dict[tuple[tuple[int, ...], int], list[tuple[int, int]]] = {}  # (input, scored) -> [(request, last)]
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise UserError(
                    f"a continuation of {len(continuation)} tokens is longer than max_length={self.max_length}."
                )
            inputs = (context + continuation)[-(self.max_length + 1) : -1]
            rows.setdefault((tuple(inputs), len(continuation)), []).append((index, continuation[-1]))
        order = sorted(rows, key=lambda key: -len(key[0]))
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood batches"):
            keys = order[start : start + self.batch_size]
            keys = keys + [keys[-1]] * (self.batch_size - len(keys))  # a fixed batch; extra rows are dropped
            length = min(round_up(len(keys[0][0]), self.length_bucket), self.max_length)
            width = min(next_power_of_two(max(scored for _, scored in keys)), length)
            tokens, mask = left_pad([np.asarray(inputs, np.int32) for inputs, _ in keys], length, self.pad_id)
            # right-aligned targets: the continuation's tokens but its last are the inputs' last (scored - 1); the
            # last one differs between a row's requests and is read from the last position's log-softmax (0 here)
            targets, _ = left_pad(
                [np.asarray([*inputs[len(inputs) - s + 1 :], 0], np.int32) for inputs, s in keys], width, 0
            )
            logprobs, greedy, last, last_argmax = jax.device_get(
                score_tokens(self.model, self.variables, tokens, mask, targets)
            )
            for row, key in enumerate(keys[: len(order) - start]):
                scored = key[1]
                prefix_logprob = float(np.sum(logprobs[row, width - scored : width - 1], dtype=np.float64))
                prefix_greedy = bool(np.all(greedy[row, width - scored : width - 1]))
                for index, final in rows[key]:
                    answer = (
                        prefix_logprob + float(last[row, final]),
                        prefix_greedy and int(last_argmax[row]) == final,
                    )
                    results[index] = answer
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint ``max_length`` windows (the first after the prefix token)."""
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut at its first stop string (the ``until`` list plus the EOS text); a
        request's sampling settings other than ``do_sample=True`` (refused) have no effect on greedy decoding."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            if kwargs["do_sample"]:
                raise UserError("generation with do_sample=True is not supported: moelora_jax decodes greedily.")
            until = handle_stop_sequences(kwargs["until"], self.tokenizer.decode([self.eot_token_id]))
            budget = kwargs["max_gen_toks"]
            room = self.max_length - budget
            if room < 1:
                raise UserError(f"max_gen_toks={budget} leaves no room for a prompt in max_length={self.max_length}.")
            # an empty prompt reads the prefix token, as an empty context does when scoring
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="generate batches"):
                rows = order[start : start + self.batch_size]
                chunk = [np.asarray(prompts[i], np.int32) for i in rows]
                chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
                tokens, mask = left_pad(chunk, min(round_up(len(chunk[0]), self.length_bucket), room), self.pad_id)
                new = jax.device_get(
                    generate(
                        self.model,
                        self.variables,
                        tokens,
                        mask,
                        max_new_tokens=budget,
                        eos_ids=self.eos_ids,
                        pad_id=self.pad_id,
                    )
                )
                for i, row in zip(rows, new, strict=False):
                    ends = np.flatnonzero(np.isin(row, self.eos_ids))
                    text = self.tokenizer.decode(row[: ends[0] if len(ends) else len(row)], skip_special_tokens=True)
                    outputs[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs
