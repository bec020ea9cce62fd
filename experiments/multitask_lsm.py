"""Multi-task OPD with LSM: math (DAPO-Math-17K, OpenThinker3-7B teacher) alternating with a
second task that has its own teacher; Qwen2.5-7B-Instruct student.

Run:      python -m opd_jax.main --config=experiments/multitask_lsm.py
            --config.workdir=DIR --config.model.path=/models/Qwen2.5-7B-Instruct
            --config.tasks[0].teacher.path=/models/OpenThinker3-7B
            --config.tasks[0].data.source=/data/dapo-math-17k
            --config.tasks[1].environment=my_alfworld:make_env
            --config.tasks[1].environment_config=/data/alfworld/base_config.yaml
            --config.tasks[1].teacher.path=/models/GiGPO-Qwen2.5-7B-Instruct-ALFWorld
            --config.eval.data_dir=/data/tfds
          Evaluate the run later (its own settings, from DIR/config.json), or a Hugging
          Face folder with this file's settings:
            python -m opd_jax.evaluate --checkpoint=DIR [--step=N]
            python -m opd_jax.evaluate --config=experiments/multitask_lsm.py
              --checkpoint=/models/Qwen2.5-7B-Instruct --workdir=OUT
              --config.eval.data_dir=/data/tfds
Smoke:    python -m opd_jax.main --config=experiments/multitask_lsm.py:smoke --config.workdir=DIR
            (2 steps: one per task, the second on the built-in text game; tiny lengths, CPU;
            tiny random stand-ins for every model folder and data file
            left unset, made in DIR/smoke_assets; paths given are used)
Agentic:  the second task is ALFWorld (teacher GiGPO-Qwen2.5-7B-Instruct-ALFWorld): multi-turn
          episodes, each turn a student response of up to 512 tokens, the environment's
          observations in the sequence as context and outside the loss (docs/environments.md).
          ALFWorld is not a dependency of opd_jax: tasks[1].environment names an adapter,
          'module:factory', that wraps ALFWorld's TextWorld environment (the docs show one).
          The paper's agent loop (verl-agent) may render each step as its own prompt with a
          short history; here an episode is one growing conversation of up to 50 turns and
          rollout.max_new_tokens tokens, so ALFWorld success rates may differ from the paper's.
          Environment tasks run on one process (one host, e.g. the 8 x H100 node below; a
          multi-host run refuses them). A dataset task can stand in: leave the environment
          empty and set tasks[1].data.dataset / source / split instead.
Hardware: 8 x H100 80 GB (one node) or a TPU v5p-16 slice (8 chips): mesh.data=1, mesh.fsdp=8
          (parameters and optimizer state sharded over the 8 devices; 64-rollout mini-batches
          split 8 ways). Multi-host: add --config.mesh.distributed=True.
Runtime:  unknown (not measured: no accelerator was available when this file was written);
          dominated by sampling 128 responses of up to 16384 tokens per step, 400 steps.
Expected: the paper's multi-task math average (pass@1 over the five benchmarks): LSM 41.7
          (sampled-token OPD 34.8; experiments/multitask_sampled_opd.py), with ALFWorld as the
          second task (success 90.6 -> 95.3 with the paper's agent loop; not measured here).
"""

from opd_jax import configs


def get_config(arg=None):
  c = configs.opd()
  configs.table_a1_math(c)
  configs.math_and_alfworld_tasks(c)   # math + ALFWorld, one teacher each (the adapter is yours)
  c.rollout.top_p = 0.9              # LSM samples from the nucleus
  c.loss.estimator = "lsm"
  c.loss.support = "teacher"         # the teacher's top-32, renormalised
  c.eval.samples = 1                 # the math average of Table 1's benchmarks (pass@1)
  if arg == "smoke":
    configs.smoke_math_and_text_game(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke' or none")
  return c
