"""Defaults shared by the experiment files: base() for every runner, opd() for the OPD trainer."""

import ml_collections


def base() -> ml_collections.ConfigDict:
  """The fields every experiment has, each with its default."""
  c = ml_collections.ConfigDict()
  c.experiment = ""        # which runner opd_jax.main dispatches to (see opd_jax.main.RUNNERS)
  c.seed = 0               # root PRNG seed; per-step keys are fold_in(root, step)
  c.workdir = ""           # where outputs (figures, tables, checkpoints) are written; "" = none
  return c


def model_fields(path: str = "") -> ml_collections.ConfigDict:
  """Where a model comes from: a local Hugging Face folder, or random weights of a given shape."""
  m = ml_collections.ConfigDict()
  m.path = path            # local Hugging Face checkpoint folder (config.json + safetensors)
  m.tokenizer = ""         # tokenizer folder; "" = the checkpoint folder
  m.dtype = "float32"      # compute dtype: float32 | bfloat16 (logits and losses stay float32)
  # Mixed precision (docs/design.md, "Precision"): the dtype parameters and optimizer state are
  # kept in; "" = dtype. A student computing in bfloat16 keeps float32 parameters.
  m.param_dtype = ""
  # Memory plan only (opd_jax.plan), while path is "": the architecture to plan for, a built-in
  # name (opd_jax.plan.ARCHITECTURES) or a config.json file; "" = the random shape below.
  m.plan_arch = ""
  m.remat = "none"         # per-layer recompute in the update: none | dots (keep matmuls) | full
  m.attention = "auto"     # attention kernel: auto | xla | blockwise | cudnn | splash (see
  #                          opd_jax.models.attention; auto: cuDNN on GPU, splash on TPU, else
  #                          blockwise from 1024 keys and one einsum below)
  m.attention_block = 512  # blockwise attention: query rows and keys per block
  # With path == "": a randomly initialised Qwen2-style decoder of this shape (tests, smoke runs).
  m.random = ml_collections.ConfigDict(dict(
      vocab_size=0,        # 0: the tokenizer's vocabulary size
      hidden_size=64,      # model width D
      intermediate_size=128,  # MLP width
      num_layers=2,        # decoder layers
      num_heads=4,         # attention heads
      num_kv_heads=2,      # key/value heads (grouped-query attention)
      init_std=0.02,       # std of the random kernels and embeddings
  ))
  return m


def dataset_fields(dataset: str = "") -> ml_collections.ConfigDict:
  """Which prompts a task draws: a registered dataset, built once from local files."""
  d = ml_collections.ConfigDict()
  d.dataset = dataset      # registered dataset: prompts (your own file) | tiny_arith |
  #                          dapo_math_17k | math500 | aime24 | ... (opd_jax.data.registry)
  d.source = ""            # local file the dataset is built from ("" = the dataset's default;
  #                          prompts: a .jsonl or .parquet file, README "Your own prompts")
  d.data_dir = ""          # TFDS data_dir for the built dataset ("" = workdir/tfds)
  d.split = "train"        # split to draw prompts from
  return d


def task_fields(name: str = "") -> ml_collections.ConfigDict:
  """One training task of a multi-task run: its own prompts (or environment) and teacher."""
  t = ml_collections.ConfigDict()
  t.name = name            # label used in metric names ("task/<name>/...")
  t.data = dataset_fields()
  t.teacher = model_fields()
  # An environment task (multi-turn episodes instead of dataset prompts; docs/environments.md).
  t.environment = ""       # "" = a dataset task; else text_game or an adapter "pkg.module:factory"
  t.environment_config = ""  # one string for the environment's factory (e.g. a config file)
  t.max_turns = 8          # environment: student responses per episode at most
  t.turn_tokens = 512      # environment: token budget of one response
  t.episode_tokens = 0     # environment: responses + observations (0 = rollout.max_new_tokens)
  t.system_prompt = ""     # environment with data.chat_template: system message ("" = none)
  return t


def opd() -> ml_collections.ConfigDict:
  """Every setting of the OPD trainer (opd_jax.train), declared once; experiments override."""
  c = base()
  c.experiment = "opd"
  c.steps = 400            # training iterations: rollout -> teacher scoring -> update(s)
  # The ':smoke' variants: every model folder, dataset and benchmark path left "" is filled with
  # a tiny random stand-in made in workdir/smoke_assets (opd_jax.smoke), so they run offline.
  c.smoke = False
  c.model = model_fields()  # the student
  c.teacher = model_fields()  # the teacher (frozen, never checkpointed)
  # Multi-task runs: a list of task_fields(); iteration s trains task s % len(tasks), each task
  # with its own prompts and teacher. Empty: one task from `data` and `teacher` above.
  c.tasks = ()

  c.data = data_fields()
  c.rollout = rollout_fields()
  c.loss = loss_fields()
  c.opt = opt_fields()
  c.mesh = mesh_fields()
  c.checkpoint = checkpoint_fields()
  c.eval = eval_fields()
  c.log = log_fields()
  return c


def data_fields() -> ml_collections.ConfigDict:
  """config.data: the dataset (dataset_fields()) and the prompts of each iteration."""
  g = dataset_fields()
  g.prompts_per_step = 16     # prompts per iteration (global, over all hosts)
  g.max_prompt_len = 2048     # prompt tokens at most (the sampler pads to a bucket)
  g.long_prompts = "drop"     # longer prompts, found when the dataset is opened: drop (left out,
  #                             counted and reported) | truncate (keep the last max_prompt_len
  #                             tokens) | error (stop, naming them)
  g.chat_template = True      # wrap the problem in the tokenizer's chat template
  g.template = "{prompt}"     # dataset "prompts": a row's "prompt" becomes this, {prompt}
  #                             replaced (e.g. "{prompt}\n\nAnswer in one word.")
  g.retokenize_max_fraction = 0.01  # error above this fraction of response tokens that
  #                                   re-tokenise differently under the teacher's tokenizer
  return g


def rollout_fields() -> ml_collections.ConfigDict:
  """config.rollout: how the student samples its rollouts."""
  g = ml_collections.ConfigDict()
  g.num_samples = 8        # G rollouts per prompt (group size)
  g.max_new_tokens = 16384  # response budget N
  g.temperature = 1.0      # sampling temperature
  g.top_p = 0.9            # nucleus mass in (0, 1] (the paper: 0.9 for LSM, 1 baseline)
  g.top_k = 0              # keep the k most likely tokens before top-p (0 = off)
  g.stop_strings = ("<|im_end|>", "<|endoftext|>")  # tokens that end a response
  g.banned_strings = ()    # tokens never sampled
  g.compact = True         # drop finished rows into smaller row buckets as the rollout goes
  return g


def loss_fields() -> ml_collections.ConfigDict:
  """config.loss: the estimator and its options."""
  g = ml_collections.ConfigDict()
  g.estimator = "lsm"         # lsm (top-K local support matching) | sampled_token | full_rkl
  #                             | sft (cross-entropy on the dataset's reference answers)
  g.k = 32                    # support size K of lsm
  g.support = "teacher"       # lsm support: teacher | teacher+sampled
  g.renormalize = True        # lsm: renormalise both distributions inside the support
  g.tail = "none"             # lsm: none | ema_pg (sampled-token tail correction)
  g.tail_weight_clip = 0.0    # lsm ema_pg: cap on the tail importance weight (0 = none)
  g.gamma = 0.0               # sampled_token: future-reward coupling γ in [0, 1]
  g.ppo_clip = 0.2            # sampled_token: PPO clip ε (0 = no clipping)
  g.advantage_clip = 0.0      # sampled_token: clamp the return to [-c, c] (0 = none)
  g.mask_strings = ()         # special tokens whose first occurrence per response is masked
  g.chunk_tokens = 1024       # lsm: tokens per block of the fused top-K loss
  g.chunk_vocab = 8192        # lsm: vocabulary entries per block of the fused top-K loss
  return g


def opt_fields() -> ml_collections.ConfigDict:
  """config.opt: AdamW, its schedule and the mini-/micro-batches."""
  g = ml_collections.ConfigDict()
  g.minibatch_size = 64        # rollouts per optimizer step (batch / this = steps per iter)
  g.microbatch_size = 0        # rows per forward/backward pass, gradients summed over a
  #                              mini-batch's micro-batches (0: the whole mini-batch at once)
  # Rows of the scoring and update passes (opd_jax.packing): "pack" puts several rollouts side
  # by side per row (no padding past each response), "trim" cuts the response columns to the
  # longest response, "off" keeps the whole token budget.
  g.packing = "pack"
  g.microbatch_tokens = 0      # "pack": tokens per device per micro-batch (0: the tokens of
  #                              an unpacked micro-batch's rows: the same activation memory)
  g.lr = 2e-6                  # AdamW peak learning rate
  g.warmup_steps = 0           # linear warm-up, in optimizer steps
  g.schedule = "constant"      # constant | cosine (decay to 0 over all optimizer steps)
  g.b1 = 0.9                   # AdamW β1
  g.b2 = 0.999                 # AdamW β2
  g.eps = 1e-8                 # AdamW ε
  g.weight_decay = 0.01        # AdamW decoupled weight decay
  g.grad_clip = 1.0            # global-norm gradient clipping (0 = none)
  return g


def mesh_fields() -> ml_collections.ConfigDict:
  """config.mesh: the device mesh and the start-up memory check."""
  g = ml_collections.ConfigDict()
  g.data = -1                 # data-parallel axis size (-1: all devices left)
  g.fsdp = 1                  # fully-sharded axis size (parameters and batch)
  g.tensor = 1                # tensor-parallel axis size (heads, MLP, vocabulary)
  g.distributed = False       # call jax.distributed.initialize() (multi-host runs)
  # Memory plan at start-up (opd_jax.plan): refuse a run whose per-device memory exceeds this
  # accelerator: "" = no check | h100 | h200 | tpu_v5p | tpu_v5e | a size such as "40GB".
  g.accelerator = ""
  return g


def checkpoint_fields() -> ml_collections.ConfigDict:
  """config.checkpoint: Orbax checkpoints and where a run starts from."""
  g = ml_collections.ConfigDict()
  g.every = 50          # save every this many iterations (and at the end)
  g.keep = 3            # keep the newest this many checkpoints
  g.async_save = True   # save in the background (Orbax async checkpointing)
  g.init = ""           # another run to start from: its workdir, its checkpoints/
  #                       folder or one step's folder ("" = none); parameters only
  g.init_step = -1      # which step of checkpoint.init (-1: the step folder's own,
  #                       else the latest complete one)
  return g


def eval_fields() -> ml_collections.ConfigDict:
  """config.eval: evaluation during training and standalone (opd_jax.evaluate)."""
  g = ml_collections.ConfigDict()
  g.every = 0                 # evaluate every this many iterations, at 0 and at the end
  #                             (0 = never; the runner supplies the evaluation)
  # Math evaluation (opd_jax.evaluate; the "opd_eval" runner and the standalone entry point):
  # the paper's five benchmarks below, and "prompts", your own file (sources.prompts).
  g.benchmarks = ("math500", "aime24", "aime25", "minerva_math", "olympiadbench")
  g.samples = 1               # k responses per problem: 1 = pass@1 (Table 1), 32 = avg@32
  g.max_new_tokens = 16384    # response budget of an evaluation sample
  g.top_p = 0.9               # the paper evaluates at top-p 0.9 ...
  g.temperature = 1.0         # ... and temperature 1
  g.batch_size = 128          # responses per sampler call (the KV cache's batch)
  g.limit = 0                 # 0 = every problem; N > 0 = the first N per benchmark (smoke)
  g.math_verify = False       # also report agreement with math-verify (if installed)
  g.grade_timeout_s = 5.0     # limit of one symbolic comparison of the grader
  g.grade_workers = 0         # grader processes (0 = half the CPUs, 2 to 8)
  g.data_dir = ""             # TFDS folder of the benchmark builds ("" = data.data_dir,
  #                             else workdir/tfds)
  # Published file or folder each benchmark is built from the first time ("" = already built,
  # or <data_dir>/downloads/manual/<name>/). prompts: a JSONL or parquet file in the format of
  # data.dataset="prompts" (README "Your own prompts"), every row with an "answer"; read as it
  # is at each evaluation (no build), rendered with data.template and data.chat_template.
  g.sources = ml_collections.ConfigDict(dict(
      math500="", aime24="", aime25="", minerva_math="", olympiadbench="", prompts=""))
  return g


def log_fields() -> ml_collections.ConfigDict:
  """config.log: metrics lines, TensorBoard and the rollout samples pages."""
  g = ml_collections.ConfigDict()
  g.every = 1                  # metrics line every this many iterations
  g.samples_every = 50         # workdir/samples/step_N.html every this many (0 = never)
  g.samples_count = 4          # rollouts shown per samples page
  g.tensorboard = True         # also write TensorBoard event files (workdir/tensorboard)
  g.plot = True                # workdir/curves.png at the end of a run (opd_jax.plot)
  g.wandb = ""                 # Weights & Biases project to log to ("" = none; the wandb extra)
  g.wandb_mode = "offline"     # offline (files in workdir/wandb; `wandb sync` uploads) | online
  # Diagnostic passes (the student's scores when the estimator reads none, the post-update KL)
  # run every this many iterations and at the last one (0 = never).
  g.diagnostics_every = 10
  # Estimator diagnostics ("diag/..." metrics, opd_jax.diagnostics) on diagnostic iterations:
  # response positions drawn at random, the exact reverse KL against the estimator (0 = off).
  g.diagnostics_positions = 64
  return g


# The paper's math runs (experiments/math_*.py, ablation_*.py, multitask_*.py) share these.


def table_a1_math(c: ml_collections.ConfigDict) -> None:
  """Table A1's math settings (the student and teacher folders are the user's to set)."""
  c.experiment = "opd_eval"          # the trainer with the math evaluator (opd_jax.evaluate)
  c.model.path = ""                  # set: local Qwen2.5-7B-Instruct folder (the student)
  c.teacher.path = ""                # set: local OpenThinker3-7B folder (same vocabulary)
  c.model.plan_arch, c.teacher.plan_arch = "qwen2.5-7b-instruct", "openthinker3-7b"
  # Precision: the student keeps float32 parameters and AdamW moments and computes in bfloat16;
  # the teacher (no optimizer state) is stored and run in bfloat16.
  c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
  c.teacher.dtype = "bfloat16"
  # Keep only each layer's input for the backward pass: at 18k tokens the layers' saved MLP
  # activations alone are hundreds of GB per device (python -m opd_jax.plan).
  c.model.remat = "full"
  c.mesh.accelerator = "h100"        # refuse to start if a phase cannot fit 80 GB per device
  c.data.dataset = "dapo_math_17k"   # English part, deduplicated; data.source = its parquet
  c.data.max_prompt_len = 2048
  c.data.prompts_per_step = 16       # 16 prompts x 8 rollouts = 128 rollouts per step
  c.rollout.num_samples = 8
  c.rollout.max_new_tokens = 16384
  c.rollout.temperature = 1.0
  c.loss.k = 32
  c.opt.minibatch_size = 64          # two AdamW steps per iteration
  # Each step's gradient summed over 8 passes of 8 rows (one 18k-token row per device on the
  # 8-device mesh): the whole mini-batch at once would hold 8x the activations.
  c.opt.microbatch_size = 8
  c.opt.lr = 2e-6
  c.opt.warmup_steps = 0
  c.steps = 400
  c.mesh.data, c.mesh.fsdp = 1, 8
  c.eval.every = 50
  c.eval.max_new_tokens = 16384
  c.eval.top_p, c.eval.temperature = 0.9, 1.0


def smoke_math(c: ml_collections.ConfigDict) -> None:
  """2 steps of tiny prompts and responses (CPU); paths left empty get tiny stand-ins."""
  c.smoke = True
  c.steps = 2
  c.model.dtype = c.teacher.dtype = "float32"
  c.model.param_dtype = ""
  c.mesh.accelerator = ""
  # Random smoke models emit arbitrary id sequences, which a BPE tokenizer re-encodes
  # differently (non-canonical splits): log the re-tokenisation mismatch, do not stop on it.
  c.data.retokenize_max_fraction = 1.0
  c.data.max_prompt_len = 256
  c.data.prompts_per_step = 8        # a multiple of the batch ways data*fsdp (8 in the tests)
  c.rollout.num_samples = 2
  c.rollout.max_new_tokens = 8
  c.loss.k = min(c.loss.k, 4)
  c.opt.minibatch_size = 8
  c.mesh.data, c.mesh.fsdp = -1, 1
  c.checkpoint.every = 1
  c.eval.every = 2
  c.eval.limit = 2
  c.eval.samples = min(c.eval.samples, 2)
  c.eval.max_new_tokens = 8
  c.eval.batch_size = 8
  # Smoke runs last seconds: no samples pages, TensorBoard files or end-of-run figure (each
  # --config.log.samples_every=1, --config.log.tensorboard=True, --config.log.plot=True
  # turns one on); the full experiment files write all three.
  c.log.samples_every = 0
  c.log.tensorboard = False
  c.log.plot = False


def math_and_alfworld_tasks(c: ml_collections.ConfigDict) -> None:
  """The paper's multi-task setting on a table_a1_math config: math (DAPO-Math-17K, the
  OpenThinker3-7B teacher) alternating with ALFWorld (an environment adapter, its own teacher)."""
  c.data.dataset = ""                # per task below
  math = task_fields("math")
  math.data.dataset = "dapo_math_17k"
  math.teacher.path = ""             # set: local OpenThinker3-7B folder
  math.teacher.dtype = "bfloat16"
  math.teacher.plan_arch = "openthinker3-7b"   # the memory plan's shape while path is ""
  agent = task_fields("alfworld")
  agent.environment = ""             # set: an ALFWorld adapter "module:factory" (docs)
  agent.environment_config = ""      # set: what the adapter reads (e.g. its config file)
  agent.teacher.path = ""            # set: local GiGPO-Qwen2.5-7B-Instruct-ALFWorld folder
  agent.teacher.dtype = "bfloat16"
  agent.teacher.plan_arch = "qwen2.5-7b-instruct"  # the ALFWorld teacher's shape (plan)
  agent.max_turns = 50               # ALFWorld's usual step limit
  agent.turn_tokens = 512            # Table A1: 512-token responses for the agentic task
  agent.episode_tokens = 0           # all turns and observations: rollout.max_new_tokens
  c.tasks = (math, agent)            # iteration s trains task s % 2: 200 + 200 of 400


def smoke_math_and_text_game(c: ml_collections.ConfigDict) -> None:
  """`math_and_alfworld_tasks` shrunk for CPU: tiny math, the built-in game for ALFWorld."""
  smoke_math(c)
  for task in c.tasks:
    task.teacher.dtype = "float32"
  agent = c.tasks[1]
  agent.name = "text_game"
  agent.environment = "text_game"    # the built-in game stands in for ALFWorld
  agent.max_turns, agent.turn_tokens, agent.episode_tokens = 2, 4, 40


def table_a1_ablation() -> ml_collections.ConfigDict:
  """An ablation of the paper (Table 2 / App. G.3): Table A1's math settings, AIME24 avg@32."""
  c = opd()
  table_a1_math(c)
  c.eval.benchmarks = ("aime24",)    # the ablations: AIME24 avg@32
  c.eval.samples = 32
  return c


def unknown_variant(arg, accepted: str) -> ValueError:
  """The error for an experiment argument that names no variant of `accepted`."""
  return ValueError(f"unknown config argument {arg!r}; accepted: {accepted}, each "
                    "optionally with ',smoke' (or 'smoke' alone: the default variant)")


def split_variant(arg, accepted: str, flags: tuple[str, ...] = ("smoke",)
                  ) -> tuple[str | None, set[str]]:
  """An experiment argument such as 'k16', 'k16,smoke' or 'smoke': (the variant named, or None;
  the flags given). More than one non-flag word raises `unknown_variant`."""
  words = [w for w in (arg or "").split(",") if w]
  rest = [w for w in words if w not in flags]
  if len(rest) > 1:
    raise unknown_variant(arg, accepted)
  return (rest[0] if rest else None), {f for f in flags if f in words}
