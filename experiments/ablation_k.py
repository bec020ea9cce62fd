"""Ablation: the support size K of LSM (teacher top-K, rollouts at top-p 0.9), AIME24 avg@32.

Run:      python -m opd_jax.main --config=experiments/ablation_k.py:k16
            --config.workdir=DIR --config.model.path=/models/Qwen2.5-7B-Instruct
            --config.teacher.path=/models/OpenThinker3-7B --config.data.source=/data/dapo-math-17k
            --config.eval.data_dir=/data/tfds   (the benchmarks built there; or
            --config.eval.sources.<name>=FILE for a benchmark's first build)
          Evaluate the run later (its own settings, from DIR/config.json), or a Hugging
          Face folder with this file's settings:
            python -m opd_jax.evaluate --checkpoint=DIR [--step=N]
            python -m opd_jax.evaluate --config=experiments/ablation_k.py:k16
              --checkpoint=/models/Qwen2.5-7B-Instruct --workdir=OUT
              --config.eval.data_dir=/data/tfds
Smoke:    python -m opd_jax.main --config=experiments/ablation_k.py:smoke --config.workdir=DIR
            (2 steps, tiny lengths, CPU; tiny random stand-ins for every model folder and data file
            left unset, made in DIR/smoke_assets; paths given are used)
Variants: ':k16' | ':k32' (default, the paper's K) | ':k48' set loss.k. Add ',smoke' for the
          CPU smoke size (e.g. ':k16,smoke'; the smoke run caps K at 4).
Hardware: 8 x H100 80 GB (one node) or a TPU v5p-16 slice (8 chips): mesh.data=1, mesh.fsdp=8
          (parameters and optimizer state sharded over the 8 devices; 64-rollout mini-batches
          split 8 ways). Multi-host: add --config.mesh.distributed=True.
Runtime:  unknown (not measured: no accelerator was available when this file was written);
          dominated by sampling 128 responses of up to 16384 tokens per step, 400 steps.
Expected: the paper reports that a small K hurts and that AIME24 avg@32 is insensitive to
          K once it is large enough (K = 16 below K = 32 and K = 48, which are about equal); the
          K = 32 run is the "teacher top-K + top-p" ablation row, 23.6.
"""

from opd_jax import configs

_VARIANTS = "k16, k32, k48"


def get_config(arg=None):
  c = configs.table_a1_ablation()
  variant, flags = configs.split_variant(arg, _VARIANTS)
  if variant not in (None, "k16", "k32", "k48"):
    raise configs.unknown_variant(arg, _VARIANTS)
  c.rollout.top_p = 0.9
  c.loss.estimator = "lsm"
  c.loss.support = "teacher"
  c.loss.k = int(variant[1:]) if variant else 32
  if "smoke" in flags:
    configs.smoke_math(c)
  return c
