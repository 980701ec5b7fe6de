"""Evaluation by generation (:mod:`moelora_jax.evaluation.scoring`): length-bucketed batches answer as one prompt at a
time."""

import jax
import optax

from moelora_jax import AdapterConfig
from moelora_jax.data.encoding import Example
from moelora_jax.data.tasks import TASKS
from moelora_jax.evaluation.scoring import generate_answers, task_score
from moelora_jax.models.llama import Llama
from moelora_jax.models.pretrained import load_config, load_params
from moelora_jax.parallel.sharding import make_mesh
from moelora_jax.training.trainer import Trainer

PROMPTS = ["why ?", "what colour is the sky ?", "the answer is", "question : what is a b c ? yes no", "blue"]


def test_bucketed_batches_answer_as_each_prompt_alone(learnable_model_dir, word_tokenizer):
    config = load_config(learnable_model_dir)
    model = Llama(config, adapter=AdapterConfig(num_experts=4, rank=2, top_k=2))
    trainer = Trainer(model, optax.sgd(0.1), make_mesh(devices=jax.devices()[:1]))
    params = load_params(learnable_model_dir, config)
    adapters = trainer.init(jax.random.key(0)).adapters
    leaves, tree = jax.tree.flatten(adapters)  # random factors: B = 0 would leave the base model's answers
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = tree.unflatten([0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    examples = [Example(p, "", label="blue") for p in PROMPTS]
    kwargs = {"prompt_length": 16, "max_new_tokens": 3, "use_chat_template": True}

    def answers(batch: list, **options) -> list[str]:
        return generate_answers(trainer, params, adapters, word_tokenizer, batch, **kwargs, **options)

    alone = [answers([e], batch_size=1)[0] for e in examples]
    assert any(alone) and len(set(alone)) > 1  # answers of real tokens, and the prompts matter
    assert answers(examples, batch_size=2, length_bucket=4) == alone
    task = TASKS["prompt_response"]  # its batches padded to the window
    score = task_score(trainer, params, adapters, word_tokenizer, task, examples, batch_size=2, **kwargs)
    assert score == task.score(alone, examples)
