"""`--mode=demo` (`make demo`): train on the synthetic set, then show what the model does.

1. Train `config` in `workdir` unless a finished checkpoint is there (a partial run resumes;
   `--overwrite` starts over). No evaluation on the training seed's held-out split: step 2
   is the one that counts, and the time goes to training.
2. Evaluate on held-out hands of a seed the model never saw (config.seed + UNSEEN_SEED_OFFSET:
   a different data set, not only a different split), next to the mean-hand baseline.
3. Write, under `<workdir>/demo/`: `metrics.json`, `predictions.png` (predicted meshes over
   held-out images beside the ground truth), `meshes/*.obj` (predicted and true meshes),
   `training_curve.png`; and print where they are.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from diffhand_jax import checkpointing
from diffhand_jax import evaluate as evaluate_lib
from diffhand_jax import input_pipeline
from diffhand_jax import logging_utils
from diffhand_jax import mesh
from diffhand_jax import models
from diffhand_jax import procedural_mano
from diffhand_jax import render
from diffhand_jax import train

UNSEEN_SEED_OFFSET = 1000
NUM_SHOWN = 8  # examples in predictions.png
NUM_MESHES = 4  # examples written as .obj
OUTPUT_SUBDIR = 'demo'
PRED_COLOR = (0.55, 0.7, 1.0)
GT_COLOR = (0.5, 1.0, 0.55)


def unseen_seed_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the data seed moved to one that training never used."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.seed = int(config.seed) + UNSEEN_SEED_OFFSET
  return config


def upscaled(image: np.ndarray, K: np.ndarray, factor: int):
  """The image enlarged `factor` times (bilinear) and the intrinsics that go with it.

  With pixel centres on integers, pixel u of the input covers [u - 0.5, u + 0.5], so it maps
  to factor * u + (factor - 1) / 2 in the enlarged image.

  Args:
    image: uint8 [S, S, 3].
    K: [3, 3] intrinsics of `image`.
  Returns:
    (uint8 [factor S, factor S, 3], [3, 3] intrinsics).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  size = image.shape[0] * factor
  big = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  scale = np.array([[factor, 0.0, (factor - 1) / 2], [0.0, factor, (factor - 1) / 2], [0, 0, 1]])
  return big, scale @ np.asarray(K, np.float64)


def prediction_grid(predictions: dict, faces, count: int = NUM_SHOWN, factor: int = 2):
  """Rows of [input | predicted mesh | true mesh] for the first eval examples.

  The predicted root-relative mesh is drawn at the true root, so the picture shows the 3D
  shape and orientation the model read from the image (not the weak-perspective camera's
  depth guess). Images are the network crops (left hands mirrored, as the model saw them),
  enlarged `factor` times.

  Returns:
    uint8 [count * factor * S, 3 * factor * S, 3].
  """
  first = predictions['overlay_batch']
  out, batch = first['out'], first['batch']
  images = np.clip(input_pipeline.denormalize_image(batch['image']), 0, 255).astype(np.uint8)
  count = min(count, int(np.sum(batch['valid'] > 0)))
  rows = []
  for i in range(count):
    root = batch['root'][i]
    image, K = upscaled(images[i], batch['K'][i], factor)
    predicted = render.overlay_mesh(image, out['vertices'][i] + root, faces, K, color=PRED_COLOR)
    truth = render.overlay_mesh(image, batch['verts'][i] + root, faces, K, color=GT_COLOR)
    rows.append(np.concatenate([image, predicted, truth], axis=1))
  return np.concatenate(rows, axis=0)


def plot_training_curve(workdir: str, path: str):
  """training_curve.png: losses per step and the periodic evaluation's MPJPE."""
  # Imported here: only the demo draws plots, and matplotlib takes a second to import.
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')  # no display needed
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  train_log = logging_utils.read_scalars(workdir, 'train')
  eval_log = logging_utils.read_scalars(workdir, 'eval')
  # The demo trains without periodic evaluation: then the losses alone.
  figure, axes = plt.subplots(1, 2 if eval_log else 1, figsize=(11 if eval_log else 6, 4))
  left, right = (axes[0], axes[1]) if eval_log else (axes, None)
  for key in ('loss', 'loss_x0', 'loss_x0_tmax', 'loss_aux', 'loss_2d'):
    points = [(r['step'], r[key]) for r in train_log if key in r]
    if points:
      left.plot(*zip(*points), label=key)
  left.set_yscale('log')
  left.set_xlabel('step')
  left.set_title('training losses (diffusion units)')
  left.legend()
  if right is not None:
    for key, label in (
        ('mpjpe', 'MPJPE (DDIM)'),
        ('pa_mpjpe', 'PA-MPJPE (DDIM)'),
        ('mean_hand_mpjpe', 'mean-hand MPJPE'),
    ):
      points = [(r['step'], r[key]) for r in eval_log if key in r]
      if points:
        right.plot(*zip(*points), marker='o', label=label)
    right.set_xlabel('step')
    right.set_ylabel('mm')
    right.set_title('held-out evaluation (training seed)')
    right.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=90)
  plt.close(figure)


def evaluate_unseen(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    params=None,
    sample_fn=None,
    keep_hypotheses: bool = False,
):
  """Scores the latest checkpoint of `workdir` on the evaluation split of an unseen seed.

  `params` (restored from `workdir` when None), `sample_fn` (`evaluate.make_sample_fn` of the
  config when None) and `keep_hypotheses` go to `evaluate.predict_split`: the benchmarks
  compare samplers on the same hands with them.

  Returns:
    (scores: `evaluate.score_predictions`, predictions: `evaluate.predict_split` output).
  """
  unseen = unseen_seed_config(config)
  print(
      f'Evaluating on {unseen.data.num_eval} hands of seed {unseen.seed} '
      f'(training used seed {config.seed}).',
      flush=True,
  )
  model = models.build_model(unseen)
  if params is None:
    params = checkpointing.restore_params(workdir)
  predictions = evaluate_lib.predict_split(
      unseen,
      params,
      model,
      input_pipeline.create_eval_iterator(unseen),
      sample_fn=sample_fn,
      diagnostics_fn=evaluate_lib.make_diagnostics_fn(model),
      keep_hypotheses=keep_hypotheses,
  )
  scores = evaluate_lib.score_predictions(predictions)
  print(evaluate_lib.format_diagnostics(scores), flush=True)
  return scores, predictions


def _save_image(path: str, image: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.fromarray(image).save(path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains if needed, evaluates on an unseen seed, writes the demo files; returns the scores."""
  step = checkpointing.latest_step(workdir)
  num_steps = int(config.train.num_steps)
  if step is not None and step >= num_steps:
    print(
        f'Reusing the trained model in {workdir} (step {step}); '
        'run with --overwrite (make demo RETRAIN=1) to train again.',
        flush=True,
    )
  else:
    train.train_and_evaluate(config, workdir, periodic_eval=False)
  if jax.process_index() != 0:
    return {}

  unseen = unseen_seed_config(config)
  scores, predictions = evaluate_unseen(config, workdir)

  out_dir = os.path.join(workdir, OUTPUT_SUBDIR)
  os.makedirs(os.path.join(out_dir, 'meshes'), exist_ok=True)
  paths = {
      'metrics': os.path.join(out_dir, 'metrics.json'),
      'predictions': os.path.join(out_dir, 'predictions.png'),
      'meshes': os.path.join(out_dir, 'meshes'),
      'training_curve': os.path.join(out_dir, 'training_curve.png'),
  }
  with open(paths['metrics'], 'w') as f:
    json.dump(
        dict(
            scores,
            seed=unseen.seed,
            training_seed=int(config.seed),
            checkpoint_step=checkpointing.latest_step(workdir),
            frame='root-relative (wrist = 0), mm',
        ),
        f,
        indent=2,
    )
  faces = procedural_mano.load_hand_model(config).faces
  _save_image(paths['predictions'], prediction_grid(predictions, faces))
  for i in range(min(NUM_MESHES, len(predictions['index']))):
    index = int(predictions['index'][i])
    mesh.save_obj(
        os.path.join(paths['meshes'], f'{index:04d}_pred.obj'), predictions['verts'][i], faces
    )
    mesh.save_obj(
        os.path.join(paths['meshes'], f'{index:04d}_true.obj'), predictions['gt_verts'][i], faces
    )
  plot_training_curve(workdir, paths['training_curve'])
  print(
      'Demo outputs:\n' + '\n'.join(f'  {name:15s} {path}' for name, path in paths.items()),
      flush=True,
  )
  return scores
