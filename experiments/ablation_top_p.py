"""Ablation: rollout top-p for LSM (and for the sampled-token baseline), AIME24 avg@32.

Run:      python -m opd_jax.main --config=experiments/ablation_top_p.py:p0.8
            --config.workdir=DIR --config.model.path=/models/Qwen2.5-7B-Instruct
            --config.teacher.path=/models/OpenThinker3-7B --config.data.source=/data/dapo-math-17k
            --config.eval.data_dir=/data/tfds   (the benchmarks built there; or
            --config.eval.sources.<name>=FILE for a benchmark's first build)
          Evaluate the run later (its own settings, from DIR/config.json), or a Hugging
          Face folder with this file's settings:
            python -m opd_jax.evaluate --checkpoint=DIR [--step=N]
            python -m opd_jax.evaluate --config=experiments/ablation_top_p.py:p0.8
              --checkpoint=/models/Qwen2.5-7B-Instruct --workdir=OUT
              --config.eval.data_dir=/data/tfds
Smoke:    python -m opd_jax.main --config=experiments/ablation_top_p.py:smoke --config.workdir=DIR
            (2 steps, tiny lengths, CPU; tiny random stand-ins for every model folder and data file
            left unset, made in DIR/smoke_assets; paths given are used)
Variants: ':p1.0' | ':p0.9' (default) | ':p0.8' set rollout.top_p for LSM (teacher top-32);
          ':sampled,p1.0' | ':sampled,p0.9' | ':sampled,p0.8' the same for sampled-token OPD
          (gamma 0, PPO clip 0.2). Add ',smoke' for the CPU smoke size (e.g. ':p0.8,smoke').
Hardware: 8 x H100 80 GB (one node) or a TPU v5p-16 slice (8 chips): mesh.data=1, mesh.fsdp=8
          (parameters and optimizer state sharded over the 8 devices; 64-rollout mini-batches
          split 8 ways). Multi-host: add --config.mesh.distributed=True.
Runtime:  unknown (not measured: no accelerator was available when this file was written);
          dominated by sampling 128 responses of up to 16384 tokens per step, 400 steps.
Expected: the paper's ablation, AIME24 avg@32 (%): sampled-token (top-p 1) 20.4,
          sampled-token + top-p 0.9 21.6, teacher top-K (LSM) without top-p 17.7,
          teacher top-K + top-p 0.9 23.6. Top-p 0.8 is not reported (unknown).
"""

from opd_jax import configs

_VARIANTS = "p1.0, p0.9, p0.8 (each optionally after sampled,)"


def get_config(arg=None):
  c = configs.table_a1_ablation()
  variant, flags = configs.split_variant(arg, _VARIANTS, flags=("smoke", "sampled"))
  if variant not in (None, "p1.0", "p0.9", "p0.8"):
    raise configs.unknown_variant(arg, _VARIANTS)
  if "sampled" in flags:
    c.loss.estimator = "sampled_token"
    c.loss.gamma = 0.0
    c.loss.ppo_clip = 0.2
  else:
    c.loss.estimator = "lsm"
    c.loss.support = "teacher"
  c.rollout.top_p = float(variant[1:]) if variant else 0.9
  if "smoke" in flags:
    configs.smoke_math(c)
  return c
