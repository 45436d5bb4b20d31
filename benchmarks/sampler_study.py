"""Which sampler should the shipped model use? One step, S = 10, noise scale, mean / guided K (issue 36).

For a trained model on the evaluation split of an unseen seed (default 1000; training used 0),
every variant runs through the evaluation code (`evaluate.predict_split`, the same hands, the
same batches) and is scored with the project's metrics:

  - MPJPE / PA-MPJPE / MPVPE / PA-MPVPE (mm, root-relative, `metrics.per_example_errors`) and
    MPJPE / PA-MPJPE as ratios of the mean-hand baseline (`metrics.mean_hand_baseline`);
  - roughness of the predicted and of the true meshes (`metrics.roughness`, mm) and their ratio.

Rows of a variant with K hypotheses:
  'mean'       the mean of the K (the project's default aggregate; for K = 1 the sample);
  'medoid'     `sampling.aggregate_hypotheses(..., 'medoid')`;
  'single'     the average over the K hypotheses of each one's errors (the expected score of
               ONE sample, K times less noisy than a K = 1 run);
  'guided_2d'  per hand, the hypothesis whose reprojected joints best agree with the model's own
               2D evidence: the auxiliary head's joints (an image-only estimate) projected with
               the predicted weak-perspective camera. With one camera per image the projection
               is s * xy + t for both sets, so the choice is argmin_k sum_j |xy_kj - xy_aux_j|
               (the camera's s and t cancel in the argmin);
  'guided_3d'  the same in 3D (root-relative joints against the auxiliary head's);
  'oracle'     the hypothesis with the lowest MPJPE against the truth (needs the answer: an
               upper bound on any selector).
The one-step x̂0 at t = T - 1 from pure noise (`evaluate.make_diagnostics_fn`, joints only) and
the auxiliary head are reported once per run; the variant 'S=1' gives the one-step mesh.

Variants are 'name:steps=10,hypotheses=8,noise_scale=1.0,eta=0.0[,timesteps=999/899/../0]'
joined by ';'. `timesteps` replaces the evenly spaced DDIM sub-sequence (a diagnosis of the
last network call's t; the project's sampler cannot do it, so such variants run this file's
copy of `sampling._hypotheses`). Everything else runs `sampling.sample` itself.

Usage (the shipped model; the workdir is only read):
  python benchmarks/sampler_study.py --workdir=pretrained/synthetic_demo --seed=1000 \
      --hands=256 --json=/tmp/sampler_study.json
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import synthetic
from diffhand_jax import checkpointing
from diffhand_jax import trained_model
from diffhand_jax import diffusion
from diffhand_jax import evaluate
from diffhand_jax import input_pipeline
from diffhand_jax import metrics
from diffhand_jax import models
from diffhand_jax import sampling

DEFAULT_VARIANTS = ';'.join(
    [
        'S=1:steps=1,hypotheses=1',
        'S=10:steps=10,hypotheses=1',
        'S=10 ns=0.5:steps=10,hypotheses=1,noise_scale=0.5',
        'S=10 ns=0:steps=10,hypotheses=1,noise_scale=0.0',
        'S=10 K=8:steps=10,hypotheses=8',
        'S=1 K=8:steps=1,hypotheses=8',
    ]
)
_PARSE = {'steps': int, 'hypotheses': int, 'noise_scale': float, 'eta': float}


def parse_variants(text):
  """'name:key=value,...;...' -> [(name, options)]."""
  out = []
  for item in filter(None, (part.strip() for part in text.split(';'))):
    name, _, spec = item.partition(':')
    options = dict(steps=10, hypotheses=1, noise_scale=1.0, eta=0.0, timesteps=None)
    for pair in filter(None, spec.split(',')):
      key, _, value = pair.partition('=')
      if key == 'timesteps':
        options[key] = tuple(int(t) for t in value.split('/'))
      elif key in _PARSE:
        options[key] = _PARSE[key](value)
      else:
        raise ValueError(f'unknown variant option {key!r} in {item!r}')
    out.append((name.strip(), options))
  return out


def custom_timesteps_sample(
    model,
    params,
    images,
    rng,
    *,
    timesteps,
    num_hypotheses,
    eta,
    noise_scale,
    depth=None,
    intrinsics=None,
):
  """`sampling.sample` with an explicit descending timestep sequence (same noise use)."""
  variables = {'params': params}
  batch, k, n = images.shape[0], num_hypotheses, model.num_points
  tokens, embedding = model.apply(variables, images, depth, method='encode')
  camera = model.apply(variables, embedding, method='camera')
  tokens_k = jnp.repeat(tokens, k, axis=0)
  embedding_k = jnp.repeat(embedding, k, axis=0)
  noise_key, ddim_key = jax.random.split(rng)
  x_T = noise_scale * jax.random.normal(noise_key, (batch * k, n, 3), jnp.float32)
  schedule = diffusion.cosine_schedule(model.num_timesteps, model.cosine_s)
  denoise_fn = lambda x_t, t: model.apply(
      variables, x_t, t, tokens_k, embedding_k, method='denoise'
  )
  x0 = diffusion.ddim_sample(denoise_fn, schedule, x_T, np.asarray(timesteps), eta, ddim_key)
  hypotheses = x0.reshape(batch, k, n, 3) * model.vertex_scale
  # pylint: disable-next=protected-access
  return sampling._summarise(model, hypotheses, camera, 'mean', intrinsics, images.shape[1])


def make_sample_fn(model, options):
  if options['timesteps'] is None:
    fn = functools.partial(
        sampling.sample,
        model,
        num_sampling_steps=options['steps'],
        num_hypotheses=options['hypotheses'],
        eta=options['eta'],
        noise_scale=options['noise_scale'],
    )
  else:
    fn = functools.partial(
        custom_timesteps_sample,
        model,
        timesteps=options['timesteps'],
        num_hypotheses=options['hypotheses'],
        eta=options['eta'],
        noise_scale=options['noise_scale'],
    )
  return jax.jit(lambda p, images, rng, depth, k: fn(p, images, rng, depth=depth, intrinsics=k))


def guided_choice(hypothesis_joints, evidence_joints, dims):
  """[N] index of the hypothesis whose joints (first `dims` coordinates) best match the evidence.

  Args:
    hypothesis_joints: [N, K, 21, 3] root-relative.
    evidence_joints: [N, 21, 3] root-relative (the model's own image-only estimate).
    dims: 2 (x, y: the reprojection under a shared weak-perspective camera) or 3.
  """
  difference = hypothesis_joints[..., :dims] - evidence_joints[:, None, :, :dims]
  return np.argmin(np.linalg.norm(difference, axis=-1).mean(axis=-1), axis=1)


def score(verts, gt_joints, gt_verts, regressor, faces):
  """Per-hand errors of [N, 778, 3] meshes -> the row's means (mm / ratios)."""
  joints = np.einsum('jn,bnd->bjd', regressor, verts)
  errors = metrics.per_example_errors(joints, verts, gt_joints, gt_verts)
  return {k: errors[k] for k in ('mpjpe', 'pa_mpjpe', 'mpvpe', 'pa_mpvpe')} | {
      'roughness': metrics.roughness(verts, faces) * 1000.0
  }


def summarise(per_hand, baseline, roughness_gt):
  row = {key: float(np.mean(value)) for key, value in per_hand.items()}
  row['mpjpe_ratio'] = row['mpjpe'] / baseline['mpjpe']
  row['pa_mpjpe_ratio'] = row['pa_mpjpe'] / baseline['pa_mpjpe']
  row['roughness_ratio'] = row['roughness'] / roughness_gt
  return row


def run_variant(config, params, model, name, options):
  times = []
  sample_fn = make_sample_fn(model, options)

  def timed(*args):
    start = time.perf_counter()
    out = jax.block_until_ready(sample_fn(*args))
    times.append(time.perf_counter() - start)
    return out

  start = time.perf_counter()
  predictions = evaluate.predict_split(
      config,
      params,
      model,
      input_pipeline.create_eval_iterator(config),
      sample_fn=timed,
      diagnostics_fn=evaluate.make_diagnostics_fn(model),
      keep_hypotheses=True,
  )
  wall = time.perf_counter() - start
  regressor = np.asarray(model.joint_regressor.array, np.float64)
  faces = predictions['faces']
  gt_joints, gt_verts = predictions['gt_joints'], predictions['gt_verts']
  baseline = metrics.mean_hand_baseline(gt_joints)
  roughness_gt = float(np.mean(metrics.roughness(gt_verts, faces))) * 1000.0
  hypotheses = np.asarray(predictions['hypotheses'], np.float64)  # [N, K, 778, 3]
  num_k = hypotheses.shape[1]
  scored = lambda verts: score(verts, gt_joints, gt_verts, regressor, faces)
  per = {'mean': scored(np.asarray(predictions['verts'], np.float64))}
  if num_k > 1:
    per['medoid'] = scored(np.asarray(sampling.aggregate_hypotheses(hypotheses, 'medoid')))
    each = [scored(hypotheses[:, k]) for k in range(num_k)]
    per['single'] = {key: np.mean([e[key] for e in each], axis=0) for key in each[0]}
    hands = np.arange(len(hypotheses))
    pick = lambda index: {key: np.stack([e[key] for e in each], 1)[hands, index] for key in each[0]}
    hypothesis_joints = np.einsum('jn,bknd->bkjd', regressor, hypotheses)
    if 'aux_joints' in predictions:
      aux = np.asarray(predictions['aux_joints'], np.float64)
      per['guided_2d'] = pick(guided_choice(hypothesis_joints, aux, 2))
      per['guided_3d'] = pick(guided_choice(hypothesis_joints, aux, 3))
    per['oracle'] = pick(np.argmin(np.stack([e['mpjpe'] for e in each], 1), axis=1))
  rows = []
  for aggregate, values in per.items():
    row = dict(
        variant=name,
        aggregate=aggregate,
        **{k: v for k, v in options.items() if k != 'timesteps'},
        timesteps='/'.join(str(t) for t in options['timesteps']) if options['timesteps'] else '',
        hands=int(len(gt_joints)),
        roughness_gt=roughness_gt,
        mean_hand_mpjpe=baseline['mpjpe'],
        mean_hand_pa_mpjpe=baseline['pa_mpjpe'],
        wall_seconds=wall,
        last_batch_seconds=times[-1],
    )
    row.update(summarise(values, baseline, roughness_gt))
    rows.append(row)
  diag = {}
  # Is the one-step x̂0 the mean of the sampler's distribution? With K draws h_k of mean m,
  # spread^2 = mean_k |h_k - m|^2 (per joint), E |m - mu|^2 = spread^2 / (K - 1) when the
  # draws scatter around mu. ratio = |m - onestep|^2 (K - 1) / spread^2: ~1 when mu = the
  # one-step estimate, >> 1 when the sampler's mean is biased away from it.
  if 'onestep_joints' in predictions:
    onestep = np.asarray(predictions['onestep_joints'], np.float64)
    mean_joints = np.einsum('jn,bnd->bjd', regressor, hypotheses.mean(axis=1))
    gap2 = np.mean(np.sum((mean_joints - onestep) ** 2, -1))
    diag['mean_to_onestep_rms_mm'] = float(np.sqrt(gap2)) * 1000
    diag['mean_rms_error_mm'] = (
        float(np.sqrt(np.mean(np.sum((mean_joints - gt_joints) ** 2, -1)))) * 1000
    )
    diag['onestep_rms_error_mm'] = (
        float(np.sqrt(np.mean(np.sum((onestep - gt_joints) ** 2, -1)))) * 1000
    )
    if num_k > 1:
      hyp_joints = np.einsum('jn,bknd->bkjd', regressor, hypotheses)
      spread2 = np.mean(np.sum((hyp_joints - mean_joints[:, None]) ** 2, -1))
      single2 = np.mean(np.sum((hyp_joints - gt_joints[:, None]) ** 2, -1))
      diag['joint_spread_rms_mm'] = float(np.sqrt(spread2)) * 1000
      diag['single_rms_error_mm'] = float(np.sqrt(single2)) * 1000
      diag['gap_over_spread_ratio'] = float(gap2 * (num_k - 1) / spread2)
  for key in ('onestep_joints', 'aux_joints'):
    if key in predictions:
      errors = metrics.joint_errors(predictions[key], gt_joints)
      diag[key.split('_')[0]] = dict(
          errors,
          mpjpe_ratio=errors['mpjpe'] / baseline['mpjpe'],
          pa_mpjpe_ratio=errors['pa_mpjpe'] / baseline['pa_mpjpe'],
      )
  return rows, diag


def markdown(rows):
  lines = [
      '| variant | aggregate | MPJPE mm (× mean hand) | PA-MPJPE mm (× mean hand) | MPVPE |'
      ' PA-MPVPE | roughness mm (× true) |',
      '|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
        f'| {r["variant"]} | {r["aggregate"]} | {r["mpjpe"]:.2f} ({r["mpjpe_ratio"]:.3f}) |'
        f' {r["pa_mpjpe"]:.2f} ({r["pa_mpjpe_ratio"]:.3f}) | {r["mpvpe"]:.2f} |'
        f' {r["pa_mpvpe"]:.2f} | {r["roughness"]:.3f} ({r["roughness_ratio"]:.3f}) |'
    )
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='pretrained/synthetic_demo', help='trained run (read)')
  parser.add_argument('--seed', type=int, default=1000, help='data seed (never 0, training)')
  parser.add_argument('--hands', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--variants', default=DEFAULT_VARIANTS)
  parser.add_argument('--json', default='', help='write rows here (after every variant)')
  args = parser.parse_args()
  if args.seed == 0:
    raise SystemExit('seed 0 is the training seed: score on unseen hands')

  config = trained_model.adopt_trained_model(synthetic.get_config(), args.workdir)
  config.seed = args.seed
  config.data.num_eval = max(int(config.data.num_eval), args.hands)
  config.eval.num_examples = args.hands
  config.eval.batch_size = args.batch_size
  model = models.build_model(config)
  params = checkpointing.restore_params(args.workdir)
  out = {'seed': args.seed, 'workdir': args.workdir, 'rows': [], 'diagnostics': {}}
  for name, options in parse_variants(args.variants):
    rows, diag = run_variant(config, params, model, name, options)
    out['rows'] += rows
    out['diagnostics'][name] = diag
    for row in rows:
      print(json.dumps(row), flush=True)
    print(json.dumps({name: diag}), flush=True)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(out, f, indent=1)
  print(markdown(out['rows']), flush=True)


if __name__ == '__main__':
  main()
