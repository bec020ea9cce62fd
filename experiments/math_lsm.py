"""Table 1, "LSM": teacher top-K local support matching (K = 32) on DAPO-Math-17K,
Qwen2.5-7B-Instruct student, OpenThinker3-7B teacher, rollouts at top-p 0.9.

Run:      python -m opd_jax.main --config=experiments/math_lsm.py
            --config.workdir=DIR --config.model.path=/models/Qwen2.5-7B-Instruct
            --config.teacher.path=/models/OpenThinker3-7B --config.data.source=/data/dapo-math-17k
            --config.eval.data_dir=/data/tfds   (the benchmarks built there; or
            --config.eval.sources.<name>=FILE for a benchmark's first build)
          Evaluate the run later (its own settings, from DIR/config.json), or a Hugging
          Face folder with this file's settings:
            python -m opd_jax.evaluate --checkpoint=DIR [--step=N]
            python -m opd_jax.evaluate --config=experiments/math_lsm.py
              --checkpoint=/models/Qwen2.5-7B-Instruct --workdir=OUT
              --config.eval.data_dir=/data/tfds
Smoke:    python -m opd_jax.main --config=experiments/math_lsm.py:smoke --config.workdir=DIR
            (2 steps, tiny lengths, CPU; tiny random stand-ins for every model folder and data file
            left unset, made in DIR/smoke_assets; paths given are used)
Hardware: 8 x H100 80 GB (one node) or a TPU v5p-16 slice (8 chips): mesh.data=1, mesh.fsdp=8
          (parameters and optimizer state sharded over the 8 devices; 64-rollout mini-batches
          split 8 ways). Multi-host: add --config.mesh.distributed=True.
Runtime:  unknown (not measured: no accelerator was available when this file was written);
          dominated by sampling 128 responses of up to 16384 tokens per step, 400 steps.
Expected: Table 1, pass@1 (%) MATH500 / AIME24 / AIME25 / Minerva / Olympiad / Avg:
            student Qwen2.5-7B-Instruct   68.2 / 13.3 /  0.0 / 26.5 / 32.9 / 28.2
            teacher OpenThinker3-7B       92.2 / 53.3 / 40.0 / 39.0 / 55.6 / 56.0
            LSM (this file)               80.4 / 23.3 / 26.7 / 34.2 / 43.9 / 41.7
          One pass@1 sample per problem at top-p 0.9 makes AIME (30 problems) noisy: +-3.3
          points per problem.
"""

from opd_jax import configs


def get_config(arg=None):
  c = configs.opd()
  configs.table_a1_math(c)
  c.rollout.top_p = 0.9              # LSM samples from the nucleus
  c.loss.estimator = "lsm"
  c.loss.support = "teacher"         # the teacher's top-32, renormalised
  c.eval.samples = 1                 # Table 1: pass@1 on the five benchmarks
  if arg == "smoke":
    configs.smoke_math(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke' or none")
  return c
