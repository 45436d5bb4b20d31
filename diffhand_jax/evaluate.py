"""Evaluation (`--mode=eval` and the train loop's periodic eval).

Samples every example of the eval split exactly once (DDIM, config.sampling.*;
test-time rotations when config.eval.tta_angles is set) and scores it with the
official FreiHAND metrics. A split without ground truth (FreiHAND's evaluation
images without their annotation files) is predicted, written to pred.json and
not scored.

Choices, written down:
- Metrics compare ROOT-RELATIVE predictions (the sampler's 'vertices'/'joints',
  wrist at the origin) with the root-relative ground truth. The unaligned
  errors (mpjpe, mpvpe) therefore measure pose and shape, not the absolute
  position, which a weak-perspective camera can only estimate roughly.
- pred.json (the official submission format) holds CAMERA-FRAME predictions:
  the sampler's 'vertices_camera'/'joints_camera', whose root comes from the
  predicted weak-perspective camera and the crop intrinsics K of the batch.
  When a batch has no K, the root-relative prediction plus the GT root is
  written instead (and metrics.json says so). Mirrored left hands are mirrored
  back (x negated) so the file is in the captured frame.
- With K = config.sampling.num_hypotheses > 1 (or several TTA rotations),
  eval/uncertainty.npz holds 'vertex_std' [N, 778] (metres; rows in pred.json's
  order, 'index' beside it): the RMS distance of each vertex's K root-relative
  hypotheses to their mean (`sampling.hypothesis_spread`), on the scale of the
  per-vertex error of the scored (mean) prediction.
- Sampling noise comes from PRNGKey(config.seed) folded with the batch number:
  the same checkpoint always gives the same numbers.
- Devices: the batch is split over a mesh of all devices and the parameters are
  replicated over it, whatever topology trained them (`--mode=eval` restores
  them to the host first: `checkpointing.restore_params`).
"""

import functools
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from datasets.dexycb import evaluation as dexycb_evaluation
from datasets.ho3d import reader as ho3d_reader
from diffhand_jax import checkpointing
from diffhand_jax import input_pipeline
from diffhand_jax import metrics as metrics_lib
from diffhand_jax import models
from diffhand_jax import parallel
from diffhand_jax import procedural_mano
from diffhand_jax import render
from diffhand_jax import sampling

NUM_OVERLAYS = 4  # example images drawn for TensorBoard per evaluation
UNCERTAINTY_FILE = 'uncertainty.npz'  # written beside pred.json when K > 1


def make_sample_fn(model, config: ml_collections.ConfigDict):
  """jitted (params, images, rng, depth, intrinsics) -> sampler outputs."""
  options = dict(
      num_sampling_steps=int(config.sampling.num_sampling_steps),
      num_hypotheses=int(config.sampling.num_hypotheses),
      aggregate=config.sampling.aggregate,
      eta=float(config.sampling.eta),
      noise_scale=float(config.sampling.get('noise_scale', 1.0)),
      smoothing_iterations=int(config.sampling.get('smoothing_iterations', 0)),
  )
  angles = tuple(float(a) for a in config.eval.tta_angles)
  if angles:
    fn = functools.partial(sampling.tta_sample, model, angles=angles, **options)
  else:
    fn = functools.partial(sampling.sample, model, **options)
  return jax.jit(
      lambda params, images, rng, depth, intrinsics: fn(
          params, images, rng, depth=depth, intrinsics=intrinsics
      )
  )


def make_diagnostics_fn(model):
  """jitted (params, images, rng, depth) -> what shows whether the image is used.

  Returns a dict of metres, root-relative:
    'onestep_joints' [B, 21, 3]: joints of the x̂0 of ONE decoder pass at t = T - 1 from pure
      noise (the diffusion model's first DDIM step; with diffusion=False the regressor's
      output). Without the image it can only be the mean hand.
    'aux_joints' [B, 21, 3]: the auxiliary head's joints (when the model has the head).
  """
  regressor = jnp.asarray(model.joint_regressor.array)

  def diagnostics(params, images, rng, depth):
    variables = {'params': params}
    tokens, embedding = model.apply(variables, images, depth, method='encode')
    batch = images.shape[0]
    if model.diffusion:
      x_t = jax.random.normal(rng, (batch, model.num_points, 3), jnp.float32)
      t = jnp.full((batch,), model.num_timesteps - 1, jnp.int32)
    else:
      x_t = jnp.zeros((batch, model.num_points, 3), jnp.float32)
      t = jnp.zeros((batch,), jnp.int32)
    x0 = model.apply(variables, x_t, t, tokens, embedding, method='denoise')
    out = {'onestep_joints': jnp.einsum('jn,bnd->bjd', regressor, x0) * model.vertex_scale}
    if model.aux_head is not None:
      out['aux_joints'] = (
          model.apply(variables, embedding, method='aux_joints') * model.vertex_scale
      )
    return out

  return jax.jit(diagnostics)


def diagnostic_scores(predictions: dict) -> dict:
  """MPJPE / PA-MPJPE (mm) of the mean-hand baseline, the one-step x̂0 at t = T - 1 and the
  auxiliary head, and the model's ratios to the baseline (`predict_split` output)."""
  gt = predictions['gt_joints']
  scores = {}
  baseline = metrics_lib.mean_hand_baseline(gt)
  for name in ('onestep_joints', 'aux_joints'):
    if name in predictions:
      for key, value in metrics_lib.joint_errors(predictions[name], gt).items():
        scores[f'{name.split("_")[0]}_{key}'] = value
  for key, value in baseline.items():
    scores[f'mean_hand_{key}'] = value
  return scores


def score_predictions(predictions: dict) -> dict:
  """FreiHAND metrics of `predict_split` output, 'num_examples', `diagnostic_scores` and, when
  the predictions carry the mesh 'faces', the roughness of predicted and true meshes (mm,
  `metrics.roughness_scores`)."""
  scores = metrics_lib.freihand_metrics(
      predictions['joints'], predictions['verts'], predictions['gt_joints'], predictions['gt_verts']
  )
  scores['num_examples'] = int(len(predictions['index']))
  if predictions.get('faces') is not None:
    scores.update(
        metrics_lib.roughness_scores(
            predictions['verts'], predictions['gt_verts'], predictions['faces']
        )
    )
  scores.update(diagnostic_scores(predictions))
  return scores


def _to_host(tree):
  """Global (possibly multi-process) arrays -> numpy on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def predict_split(
    config: ml_collections.ConfigDict,
    params: Any,
    model,
    batches,
    sample_fn=None,
    diagnostics_fn=None,
    keep_hypotheses: bool = False,
) -> dict:
  """Runs the sampler over `batches`; returns the valid rows, sorted by index.

  `sample_fn` (from make_sample_fn) may be passed to reuse its compilation;
  with `diagnostics_fn` (make_diagnostics_fn) its outputs are kept too; with
  `keep_hypotheses` the K root-relative hypotheses ('hypotheses' [N, K, 778, 3]).
  `params` may live anywhere (host, one device, another mesh): they are
  replicated over the mesh of all devices that the batches are split over.

  Returns:
    dict of numpy arrays over the N valid examples: 'index' [N], 'verts',
    'joints' (root-relative predictions), 'verts_camera', 'joints_camera'
    (camera frame; see the module docstring), 'gt_verts', 'gt_joints'
    [N, ., 3], 'vertex_std' [N, 778]; 'root_from' = 'camera' | 'gt_root';
    'overlay_batch': the first batch with its outputs (for images); and 'faces' [F, 3], the
    hand model's triangles (for the roughness metric).
  """
  mesh = parallel.make_data_mesh()
  # A no-op for params already replicated over this mesh (the train loop's).
  params = jax.device_put(params, parallel.replicated_sharding(mesh))
  sample_fn = sample_fn or make_sample_fn(model, config)
  base_rng = jax.random.PRNGKey(config.seed)
  rows, overlay_batch, root_from = [], None, 'camera'
  for batch_number, local in enumerate(batches):
    parallel.check_batch_divisible(
        len(local['image']) * jax.process_count(), mesh.size, 'config.eval.batch_size'
    )
    host = _sample_batch(
        parallel.global_batch(local, mesh),
        jax.random.fold_in(base_rng, batch_number),
        params,
        sample_fn,
        diagnostics_fn,
    )
    overlay_batch = overlay_batch or host
    row, has_camera = _valid_rows(host['out'], host['batch'], keep_hypotheses)
    root_from = root_from if has_camera else 'gt_root'
    rows.append(row)
  merged = _merge_rows(rows)
  merged['root_from'] = root_from
  merged['overlay_batch'] = overlay_batch
  merged['faces'] = np.asarray(procedural_mano.load_hand_model(config).faces)  # for roughness
  return merged


def _sample_batch(batch, rng, params, sample_fn, diagnostics_fn) -> dict:
  """One global batch through the sampler (and diagnostics): {'out', 'batch'} on the host."""
  out = sample_fn(params, batch['image'], rng, batch.get('depth'), batch.get('K'))
  if diagnostics_fn is not None:
    out = dict(out, **diagnostics_fn(params, batch['image'], rng, batch.get('depth')))
  kept = ('index', 'valid', 'verts', 'joints3d', 'root', 'is_right', 'image', 'K')
  return _to_host({'out': out, 'batch': {k: batch[k] for k in kept if k in batch}})


def _valid_rows(out: dict, gt: dict, keep_hypotheses: bool):
  """(the batch's valid examples as `predict_split` rows, whether the camera placed the root).

  Camera-frame outputs come from the predicted camera and the crop's intrinsics when the
  sampler had them, else from the true root; left hands are mirrored back.
  """
  has_camera = 'vertices_camera' in out
  if has_camera:
    verts_cam, joints_cam = out['vertices_camera'], out['joints_camera']
  else:
    verts_cam = out['vertices'] + gt['root'][:, None]
    joints_cam = out['joints'] + gt['root'][:, None]
  if 'is_right' in gt:
    mirror = np.where(gt['is_right'][:, None, None] == 0, -1.0, 1.0)
    unmirror = np.concatenate([mirror, np.ones_like(mirror), np.ones_like(mirror)], axis=-1)
    verts_cam, joints_cam = verts_cam * unmirror, joints_cam * unmirror
  keep = np.asarray(gt['valid']) > 0
  row = {
      'index': gt['index'][keep],
      'verts': out['vertices'][keep],
      'joints': out['joints'][keep],
      'verts_camera': verts_cam[keep],
      'joints_camera': joints_cam[keep],
      'vertex_std': out['vertex_std'][keep],
      **({'hypotheses': out['hypotheses'][keep]} if keep_hypotheses else {}),
      'gt_verts': gt['verts'][keep],
      'gt_joints': gt['joints3d'][keep],
      **{k: out[k][keep] for k in ('onestep_joints', 'aux_joints') if k in out},
  }
  return row, has_camera


def _merge_rows(rows: list) -> dict:
  """The batches' rows concatenated and sorted by example index (each index exactly once)."""
  if not rows or not sum(len(r['index']) for r in rows):
    raise ValueError('the evaluation split yielded no valid examples')
  merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  order = np.argsort(merged['index'], kind='stable')
  if len(np.unique(merged['index'])) != len(order):
    raise ValueError(
        'evaluation examples repeat an index: the eval iterator '
        'must cover the split exactly once'
    )
  return {k: v[order] for k, v in merged.items()}


def num_samples_per_image(config: ml_collections.ConfigDict) -> int:
  """Meshes the sampler draws per image: K hypotheses times the test-time rotations."""
  return int(config.sampling.num_hypotheses) * max(1, len(config.eval.tta_angles))


def write_uncertainty(path: str, predictions: dict):
  """Writes eval/uncertainty.npz: the per-vertex uncertainty of every evaluated image.

  Arrays, in the order of pred.json (rows sorted by 'index'):
    'vertex_std' [N, 778] float32, metres: `sampling.hypothesis_spread`, the RMS distance of
      the image's K hypotheses (x rotations with TTA) to their mean, all root-relative (wrist
      at the origin). It is on the scale of the per-vertex error |v_pred - v_gt| of the
      root-relative mean prediction that metrics.json scores.
    'index' [N] int: the example index of each row.
  """
  np.savez(
      path,
      vertex_std=np.asarray(predictions['vertex_std'], np.float32),
      index=np.asarray(predictions['index']),
  )


def overlays(predictions: dict, faces, count: int = NUM_OVERLAYS) -> np.ndarray:
  """Predicted meshes drawn over the first eval images: uint8 [n, S, S, 3]."""
  first = predictions['overlay_batch']
  out, batch = first['out'], first['batch']
  if 'vertices_camera' not in out:
    return np.zeros((0, 1, 1, 3), np.uint8)
  images = np.clip(input_pipeline.denormalize_image(batch['image']), 0, 255).astype(np.uint8)
  count = min(count, int(np.sum(batch['valid'] > 0)))
  return np.stack(
      [
          render.overlay_mesh(images[i], out['vertices_camera'][i], faces, batch['K'][i])
          for i in range(count)
      ]
  )


def evaluate(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    model=None,
    workdir: Optional[str] = None,
    step: Optional[int] = None,
    write_predictions: Optional[bool] = None,
    writer=None,
    sample_fn=None,
    diagnostics_fn=None,
    checkpoint_step: Optional[int] = None,
) -> dict:
  """Scores `params` on the eval split; writes files under workdir/eval.

  Args:
    config: the experiment config.
    params: the model's 'params' collection (host or device arrays).
    model: the DiffHand module (built from config when None).
    workdir: where to write eval/metrics.json, eval/scores.txt and (when
      `write_predictions`) eval/pred.json; nothing is written when None.
    step: the train step (recorded; periodic evals from the train loop write
      under eval/step_<step> and skip pred.json by default).
    write_predictions: write pred.json; default: for `--mode=eval` (step None)
      and for splits without ground truth.
    writer: an optional logging_utils.MetricWriter for scalars and overlays.
    sample_fn: a make_sample_fn result to reuse (periodic evals).
    diagnostics_fn: a make_diagnostics_fn result to reuse.
    checkpoint_step: recorded in metrics.json (--mode=eval).
  Returns:
    the metrics dict of metrics.freihand_metrics (mm / fractions) plus
    'num_examples' and `diagnostic_scores` (mean-hand baseline, one-step x̂0
    and auxiliary-head errors, mm); an empty dict when the split has no ground
    truth (nothing was scored: metrics.json says `scored: false`, scores.txt is
    not written).
  """
  model = model if model is not None else models.build_model(config)
  batches = input_pipeline.create_eval_iterator(config)
  diagnostics_fn = diagnostics_fn or make_diagnostics_fn(model)
  predictions = predict_split(config, params, model, batches, sample_fn, diagnostics_fn)
  num_examples = int(len(predictions['index']))
  scored = batches.has_targets
  scores = score_predictions(predictions) if scored else {}
  if scored and config.data.name == 'dexycb':
    scores.update(_dexycb_scores(predictions))
  is_writer = jax.process_index() == 0
  pred_json = None
  if workdir is not None and is_writer:
    if write_predictions is None:
      write_predictions = step is None or not scored
    out_dir = os.path.join(workdir, 'eval', '' if step is None else f'step_{step}')
    pred_json = _write_outputs(
        out_dir,
        config,
        predictions,
        scores,
        scored,
        write_predictions,
        step if step is not None else checkpoint_step,
    )
  if is_writer:
    _print_summary(scores, scored, num_examples, step, pred_json)
  if writer is not None and step is not None:
    if scores:
      writer.scalars(step, scores)
    images = overlays(predictions, procedural_mano.load_hand_model(config).faces)
    if len(images):
      writer.images(step, {'overlays': images})
  return scores


def _dexycb_scores(predictions: dict) -> dict:
  """The DexYCB protocol written out: wrist-aligned MPJPE / MPVPE and Procrustes-aligned errors
  (datasets/dexycb/evaluation.py), prefixed 'dexycb_'; predictions and targets root-relative."""
  found = dexycb_evaluation.dexycb_metrics(
      predictions['joints'],
      predictions['verts'],
      predictions['gt_joints'],
      predictions['gt_verts'],
  )
  return {f'dexycb_{k}': v for k, v in found.items()}


def _write_outputs(out_dir, config, predictions, scores, scored, write_predictions, step):
  """metrics.json, scores.txt (scored splits) and, when asked, pred.json (+ uncertainty.npz
  with K > 1, HO-3D's submission zip) under `out_dir`. Returns pred.json's path or None."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(
        dict(
            scores,
            num_examples=int(len(predictions['index'])),
            scored=scored,
            step=step,
            frame='root-relative (wrist = 0)',
            pred_json_root=predictions['root_from'],
            tta_angles=list(config.eval.tta_angles),
            num_sampling_steps=int(config.sampling.num_sampling_steps),
            num_hypotheses=int(config.sampling.num_hypotheses),
            noise_scale=float(config.sampling.get('noise_scale', 1.0)),
            smoothing_iterations=int(config.sampling.get('smoothing_iterations', 0)),
        ),
        f,
        indent=2,
    )
  if scored:
    metrics_lib.write_scores_txt(os.path.join(out_dir, 'scores.txt'), scores)
  if not write_predictions:
    return None
  pred_json = os.path.join(out_dir, 'pred.json')
  metrics_lib.write_pred_json(pred_json, predictions['joints_camera'], predictions['verts_camera'])
  if num_samples_per_image(config) > 1:
    write_uncertainty(os.path.join(out_dir, UNCERTAINTY_FILE), predictions)
  if config.data.name == 'ho3d':
    # The online server's format: HO-3D joint order, OpenGL frame, zipped pred.json.
    ho3d_reader.write_submission(
        os.path.join(out_dir, 'pred_ho3d.zip'),
        predictions['joints_camera'],
        predictions['verts_camera'],
    )
  return pred_json


def _print_summary(scores, scored, num_examples, step, pred_json):
  """The evaluation's table (or why nothing was scored) on stdout."""
  at_step = '' if step is None else f' at step {step}'
  if scored:
    print(
        f'Evaluation{at_step} on {num_examples} examples:\n'
        + metrics_lib.format_table(scores)
        + '\n'
        + format_diagnostics(scores),
        flush=True,
    )
    return
  where = f'; predictions written to {pred_json}' if pred_json else ''
  print(
      f'Evaluation{at_step}: the evaluation split has no ground truth '
      f'(no annotation files), so its {num_examples} predictions are not '
      f'scored{where}.',
      flush=True,
  )


def format_diagnostics(scores: dict) -> str:
  """Lines comparing the model with the mean-hand baseline (MPJPE / PA-MPJPE, mm)."""
  rows = [
      ('model (DDIM)', ''),
      ('one-step x0 at t=T-1', 'onestep_'),
      ('auxiliary head', 'aux_'),
      ('mean-hand baseline', 'mean_hand_'),
  ]
  base = scores['mean_hand_mpjpe'], scores['mean_hand_pa_mpjpe']
  lines = [f'{"":22s} {"MPJPE":>8s} {"PA-MPJPE":>9s}   ratio to the mean hand']
  for label, prefix in rows:
    if f'{prefix}mpjpe' not in scores:
      continue
    mpjpe, pa = scores[f'{prefix}mpjpe'], scores[f'{prefix}pa_mpjpe']
    lines.append(
        f'{label:22s} {mpjpe:8.2f} {pa:9.2f}   {mpjpe / base[0]:.2f} / ' f'{pa / base[1]:.2f}'
    )
  return '\n'.join(lines)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=eval`: the latest checkpoint of `workdir` (EMA params if kept)."""
  # The newest readable checkpoint (unreadable newer ones are skipped with a warning).
  step, params = checkpointing.restore_latest_params(workdir)
  return evaluate(config, params, workdir=workdir, checkpoint_step=step)
