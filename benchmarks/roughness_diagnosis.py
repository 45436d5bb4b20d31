"""Where does the predicted meshes' roughness come from? (issue 36, "Smooth meshes").

On hands of an unseen seed, for a trained model, this measures the roughness
(`metrics.roughness`: mean |v - mean of its one-ring|, mm) of

  1. the decoder's x̂0 = f(x_t, t) for x_t drawn from the forward process around the TRUE mesh
     (`diffusion.q_sample`), at several t, t = 0 included: is the network's output rough even
     when its input is (nearly) the clean true mesh, or only when the input is noisy?
  2. the error field: roughness of (prediction - truth), i.e. the part of the error that is
     high-frequency over the surface (0 for a smooth deformation of the true mesh);
  3. a post-process: Taubin smoothing (lambda = 0.5, mu = -0.53, uniform one-ring weights, no
     shrinkage) of the sampler's meshes, n iterations: how much roughness and error it removes.

Every row reports the roughness ratio to the true meshes', MPVPE and PA-MPJPE (mm).

Usage (the shipped model; the workdir is only read):
  python benchmarks/roughness_diagnosis.py --workdir=pretrained/synthetic_demo --seed=1000 \
      --hands=128 --json=/tmp/roughness_diagnosis.json
"""

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import synthetic
from diffhand_jax import checkpointing
from diffhand_jax import trained_model
from diffhand_jax import diffusion
from diffhand_jax import input_pipeline
from diffhand_jax import metrics
from diffhand_jax import models
from diffhand_jax import procedural_mano
from diffhand_jax import sampling

TIMESTEPS = (0, 9, 49, 99, 199, 499, 999)


def taubin(verts, ring_mean, iterations, lam=0.5, mu=-0.53):
  """Taubin's lambda|mu smoothing with the uniform one-ring mean, [N, V, 3] -> [N, V, 3]."""
  for _ in range(iterations):
    for factor in (lam, mu):
      verts = verts + factor * (np.einsum('uv,nvd->nud', ring_mean, verts) - verts)
  return verts


def row_of(name, verts, gt_verts, regressor, faces, roughness_gt):
  joints = np.einsum('jn,bnd->bjd', regressor, verts)
  gt_joints = np.einsum('jn,bnd->bjd', regressor, gt_verts)
  errors = metrics.per_example_errors(joints, verts, gt_joints, gt_verts)
  rough = float(np.mean(metrics.roughness(verts, faces))) * 1000
  error_rough = float(np.mean(metrics.roughness(verts - gt_verts, faces))) * 1000
  return dict(
      name=name,
      roughness=rough,
      roughness_ratio=rough / roughness_gt,
      error_field_roughness=error_rough,
      mpvpe=float(errors['mpvpe'].mean()),
      pa_mpvpe=float(errors['pa_mpvpe'].mean()),
      mpjpe=float(errors['mpjpe'].mean()),
      pa_mpjpe=float(errors['pa_mpjpe'].mean()),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='pretrained/synthetic_demo')
  parser.add_argument('--seed', type=int, default=1000)
  parser.add_argument('--hands', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--taubin', default='1,2,4,8')
  parser.add_argument('--steps', type=int, default=10, help="the sampler's DDIM steps")
  parser.add_argument(
      '--timesteps',
      default=','.join(map(str, TIMESTEPS)),
      help="t of the decoder's one-pass rows ('' = none)",
  )
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  if args.seed == 0:
    raise SystemExit('seed 0 is the training seed: score on unseen hands')
  config = trained_model.adopt_trained_model(synthetic.get_config(), args.workdir)
  config.seed = args.seed
  config.eval.num_examples = args.hands
  config.eval.batch_size = args.batch_size
  model = models.build_model(config)
  params = checkpointing.restore_params(args.workdir)
  variables = {'params': params}
  schedule = diffusion.cosine_schedule(model.num_timesteps, model.cosine_s)
  faces = np.asarray(procedural_mano.load_hand_model(config).faces)
  regressor = np.asarray(model.joint_regressor.array, np.float64)
  ring_mean = metrics.one_ring_mean_matrix(faces)

  @jax.jit
  def denoise_at(images, x0, t, rng):
    tokens, embedding = model.apply(variables, images, None, method='encode')
    tt = jnp.full((images.shape[0],), t, jnp.int32)
    x_t = diffusion.q_sample(schedule, x0, tt, jax.random.normal(rng, x0.shape))
    return model.apply(variables, x_t, tt, tokens, embedding, method='denoise')

  sample_fn = jax.jit(
      functools.partial(sampling.sample, model, num_sampling_steps=args.steps, num_hypotheses=1)
  )
  timesteps = tuple(int(t) for t in args.timesteps.split(',') if t)
  sampler = f'sampler S={args.steps} K=1'
  by_t = {t: [] for t in timesteps}
  sampled, gts = [], []
  rng = jax.random.PRNGKey(args.seed)
  for number, batch in enumerate(input_pipeline.create_eval_iterator(config)):
    keep = np.asarray(batch['valid']) > 0
    gt = np.asarray(batch['verts'], np.float64)
    gts.append(gt[keep])
    key = jax.random.fold_in(rng, number)
    for t in timesteps:
      x0 = denoise_at(batch['image'], jnp.asarray(gt / model.vertex_scale, jnp.float32), t, key)
      verts = np.asarray(x0, np.float64) * model.vertex_scale
      root = np.einsum('n,bnd->bd', regressor[0], verts)
      by_t[t].append((verts - root[:, None])[keep])
    out = sample_fn(params, batch['image'], key)
    sampled.append(np.asarray(out['vertices'], np.float64)[keep])
  gt = np.concatenate(gts)
  roughness_gt = float(np.mean(metrics.roughness(gt, faces))) * 1000
  rows = [row_of('truth', gt, gt, regressor, faces, roughness_gt)]
  for t in timesteps:
    rows.append(
        row_of(
            f'f(q(x0_true, t={t}), t)', np.concatenate(by_t[t]), gt, regressor, faces, roughness_gt
        )
    )
  sampled = np.concatenate(sampled)
  rows.append(row_of(sampler, sampled, gt, regressor, faces, roughness_gt))
  for n in (int(i) for i in args.taubin.split(',') if i):
    rows.append(
        row_of(
            f'{sampler} + Taubin x{n}',
            taubin(sampled, ring_mean, n),
            gt,
            regressor,
            faces,
            roughness_gt,
        )
    )
    rows.append(
        row_of(f'truth + Taubin x{n}', taubin(gt, ring_mean, n), gt, regressor, faces, roughness_gt)
    )
  for row in rows:
    print(json.dumps(row), flush=True)
  print(f'\n{len(gt)} hands of seed {args.seed}; true roughness {roughness_gt:.3f} mm\n')
  print(
      '| input | roughness mm (× true) | error-field roughness mm | MPVPE | PA-MPVPE | PA-MPJPE |'
  )
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(
        f'| {r["name"]} | {r["roughness"]:.3f} ({r["roughness_ratio"]:.3f}) |'
        f' {r["error_field_roughness"]:.3f} | {r["mpvpe"]:.2f} | {r["pa_mpvpe"]:.2f} |'
        f' {r["pa_mpjpe"]:.2f} |'
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'seed': args.seed, 'hands': len(gt), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
