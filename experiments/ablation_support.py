"""Ablation (App. G.3): the support and tail variants of LSM, AIME24 avg@32.

Run:      python -m opd_jax.main --config=experiments/ablation_support.py:teacher+sampled
            --config.workdir=DIR --config.model.path=/models/Qwen2.5-7B-Instruct
            --config.teacher.path=/models/OpenThinker3-7B --config.data.source=/data/dapo-math-17k
            --config.eval.data_dir=/data/tfds   (the benchmarks built there; or
            --config.eval.sources.<name>=FILE for a benchmark's first build)
          Evaluate the run later (its own settings, from DIR/config.json), or a Hugging
          Face folder with this file's settings:
            python -m opd_jax.evaluate --checkpoint=DIR [--step=N]
            python -m opd_jax.evaluate --config=experiments/ablation_support.py:teacher+sampled
              --checkpoint=/models/Qwen2.5-7B-Instruct --workdir=OUT
              --config.eval.data_dir=/data/tfds
Smoke:    python -m opd_jax.main --config=experiments/ablation_support.py:smoke --config.workdir=DIR
            (2 steps, tiny lengths, CPU; tiny random stand-ins for every model folder and data file
            left unset, made in DIR/smoke_assets; paths given are used)
Variants: ':teacher' (default; variant 1, the method: teacher top-32, renormalised) |
          ':teacher+sampled' (variant 3: teacher top-32 plus the sampled token, renormalised) |
          ':teacher_tail' (variant 5: teacher top-32 head, not renormalised, plus the EMA-PG
          sampled-token tail). Add ',smoke' for the CPU smoke size.
          Variants 2 and 4 (student top-K supports, ':student+sampled', ':student_tail') are not
          available in the trainer: its fused top-K loss keeps only the teacher's top-K logits,
          so a student support (which needs the teacher's logits outside its own top-K) is
          rejected (opd_jax.settings.LSM_SUPPORTS); opd_jax.losses.topk_reverse_kl computes them
          on materialised logits.
Hardware: 8 x H100 80 GB (one node) or a TPU v5p-16 slice (8 chips): mesh.data=1, mesh.fsdp=8
          (parameters and optimizer state sharded over the 8 devices; 64-rollout mini-batches
          split 8 ways). Multi-host: add --config.mesh.distributed=True.
Runtime:  unknown (not measured: no accelerator was available when this file was written);
          dominated by sampling 128 responses of up to 16384 tokens per step, 400 steps.
Expected: compare with App. G.3 of the paper (its numbers are not transcribed here);
          variant 1 is the method and should match the "teacher top-K + top-p" ablation row
          (AIME24 avg@32 23.6).
"""

from opd_jax import configs

_VARIANTS = "teacher, teacher+sampled, teacher_tail"


def get_config(arg=None):
  c = configs.table_a1_ablation()
  variant, flags = configs.split_variant(arg, _VARIANTS)
  variant = variant or "teacher"
  if variant in ("student", "student+sampled", "student_tail"):
    raise ValueError(f"config argument {arg!r}: student-support variants are not available in "
                     "the trainer's fused top-K loss (accepted loss.support: teacher, "
                     "teacher+sampled); use opd_jax.losses.topk_reverse_kl on materialised logits")
  if variant not in ("teacher", "teacher+sampled", "teacher_tail"):
    raise configs.unknown_variant(arg, _VARIANTS)
  c.rollout.top_p = 0.9
  c.loss.estimator = "lsm"
  c.loss.support = "teacher+sampled" if variant == "teacher+sampled" else "teacher"
  c.loss.renormalize = variant != "teacher_tail"
  c.loss.tail = "ema_pg" if variant == "teacher_tail" else "none"
  if "smoke" in flags:
    configs.smoke_math(c)
  return c
