"""Per-vertex uncertainty (issue 10): eval/uncertainty.npz, per-example errors, Spearman.

The eval test runs `--mode=eval` on a tiny FreiHAND-layout folder (`datasets.freihand.testing`)
with K = 3 hypotheses on the suite's 4 fake devices and checks the file against hypotheses
sampled here, on one device, outside the evaluation code.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from benchmarks import steps_hypotheses
from benchmarks import uncertainty
from configs import synthetic
from datasets.freihand import testing
from diffhand_jax import checkpointing
from diffhand_jax import evaluate
from diffhand_jax import input_pipeline
from diffhand_jax import metrics
from diffhand_jax import models
from diffhand_jax import sampling

NUM_EVAL = 5
NUM_HYPOTHESES = 3


def test_spearman_matches_scipy_with_and_without_ties():
  rng = np.random.default_rng(0)
  a = rng.normal(size=500)
  b = a + rng.normal(size=500)
  np.testing.assert_allclose(uncertainty.spearman(a, b), stats.spearmanr(a, b)[0], rtol=1e-12)
  tied_a, tied_b = np.round(a), np.round(b * 2)  # many ties: ranks must be averaged
  np.testing.assert_allclose(
      uncertainty.spearman(tied_a, tied_b), stats.spearmanr(tied_a, tied_b)[0], rtol=1e-12
  )
  np.testing.assert_array_equal(uncertainty.ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1, 3.5, 2])
  assert uncertainty.spearman(a, np.exp(a)) == pytest.approx(1.0)  # any increasing map
  assert uncertainty.spearman(a, -(a**3)) == pytest.approx(-1.0)


def test_uncertainty_scores_pooled_per_hand_and_within():
  rng = np.random.default_rng(1)
  std = rng.uniform(0.001, 0.02, size=(6, 778))
  err = std * rng.uniform(0.5, 1.5, size=std.shape)
  scores = uncertainty.uncertainty_scores(std, err)
  np.testing.assert_allclose(scores['pooled'], stats.spearmanr(std.ravel(), err.ravel())[0])
  np.testing.assert_allclose(scores['per_hand'], stats.spearmanr(std.mean(1), err.mean(1))[0])
  within = np.mean([stats.spearmanr(s, e)[0] for s, e in zip(std, err)])
  np.testing.assert_allclose(scores['within_hand'], within)
  assert scores['mean_std_mm'] == pytest.approx(std.mean() * 1000)


def test_per_example_errors_average_to_freihand_metrics():
  rng = np.random.default_rng(2)
  gt_verts = rng.normal(scale=0.05, size=(4, 778, 3))
  pred_verts = gt_verts + rng.normal(scale=0.01, size=gt_verts.shape)
  gt_joints, pred_joints = gt_verts[:, :21] * 1.1, pred_verts[:, :21] * 1.1
  per_example = metrics.per_example_errors(pred_joints, pred_verts, gt_joints, gt_verts)
  overall = metrics.freihand_metrics(pred_joints, pred_verts, gt_joints, gt_verts)
  for key in ('mpjpe', 'pa_mpjpe', 'mpvpe', 'pa_mpvpe'):
    assert per_example[key].shape == (4,)
    np.testing.assert_allclose(per_example[key].mean(), overall[key], rtol=1e-10)
  naive = [[np.linalg.norm(p - g) for p, g in zip(ps, gs)] for ps, gs in zip(pred_verts, gt_verts)]
  np.testing.assert_allclose(per_example['vertex_errors'], naive, rtol=1e-12)
  np.testing.assert_allclose(
      per_example['mpjpe'][1],
      1000 * np.mean(np.linalg.norm(pred_joints[1] - gt_joints[1], axis=-1)),
  )


def test_aggregate_medoid_is_the_most_central_hypothesis():
  rng = np.random.default_rng(3)
  hypotheses = rng.normal(size=(2, 5, 778, 3)).astype(np.float32)
  hypotheses[0, 2] *= 0.01  # near every other one: the medoid of image 0
  medoid = np.asarray(sampling.aggregate_hypotheses(jnp.asarray(hypotheses), 'medoid'))
  for b in range(2):
    cost = [
        sum(np.linalg.norm(hypotheses[b, i] - hypotheses[b, j], axis=-1).mean() for j in range(5))
        for i in range(5)
    ]
    np.testing.assert_array_equal(medoid[b], hypotheses[b, int(np.argmin(cost))])
  np.testing.assert_array_equal(medoid[0], hypotheses[0, 2])
  np.testing.assert_allclose(
      sampling.aggregate_hypotheses(jnp.asarray(hypotheses), 'mean'), hypotheses.mean(1), atol=1e-6
  )


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  """A fresh smoke model evaluated with K = 3 on a labelled FreiHAND-layout folder."""
  root = tmp_path_factory.mktemp('uncertainty')
  testing.write_layout(root / 'files', num_train=1, num_eval=NUM_EVAL, image_size=48, textured=True)
  config = synthetic.get_config('smoke')
  config.data.name = 'freihand'
  config.data.root = str(root / 'files')
  config.data.tfds_data_dir = str(root / 'tfds')
  config.sampling.num_hypotheses = NUM_HYPOTHESES
  config.eval.batch_size = 4  # two batches: the second one padded
  model = models.build_model(config)
  size = config.data.image_size
  params = models.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  workdir = str(root / 'run')
  with checkpointing.make_manager(workdir) as manager:  # params only, like pretrained/
    checkpointing.save(manager, 4, {'params': params}, config)
    manager.wait_until_finished()
  evaluate.evaluate_checkpoint(config, workdir)
  return config, workdir, model, jax.device_get(params)


@pytest.mark.slow
def test_eval_writes_vertex_std_of_the_hypotheses_in_pred_json_order(evaluated):
  config, workdir, model, params = evaluated
  eval_dir = os.path.join(workdir, 'eval')
  with np.load(os.path.join(eval_dir, evaluate.UNCERTAINTY_FILE)) as f:
    vertex_std, index = f['vertex_std'], f['index']
  with open(os.path.join(eval_dir, 'pred.json')) as f:
    pred_joints, pred_verts = (np.asarray(a) for a in json.load(f))
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    assert json.load(f)['num_hypotheses'] == NUM_HYPOTHESES
  assert vertex_std.shape == (NUM_EVAL, 778) and vertex_std.dtype == np.float32
  np.testing.assert_array_equal(index, np.arange(NUM_EVAL))

  # The hypotheses again, here: the same batches and keys as the evaluation, one device.
  sample = jax.jit(
      lambda images, rng: sampling.sample(
          model,
          params,
          images,
          rng,
          num_sampling_steps=2,
          num_hypotheses=NUM_HYPOTHESES,
          smoothing_iterations=int(config.sampling.smoothing_iterations),
      )
  )
  expected_std, expected_mean = {}, {}
  for number, batch in enumerate(input_pipeline.create_eval_iterator(config)):
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), number)
    hypotheses = np.asarray(sample(jnp.asarray(batch['image']), rng)['hypotheses'], np.float64)
    mean = hypotheses.mean(axis=1)
    squared = ((hypotheses - mean[:, None]) ** 2).sum(axis=-1)  # [B, K, 778]
    for row, example in enumerate(batch['index']):
      if batch['valid'][row]:
        expected_std[int(example)] = np.sqrt(squared[row].mean(axis=0))
        expected_mean[int(example)] = mean[row]
  assert sorted(expected_std) == list(range(NUM_EVAL))
  for row, example in enumerate(index):
    np.testing.assert_allclose(vertex_std[row], expected_std[example], rtol=2e-3, atol=1e-6)
    # Row i of pred.json is the same image: its mesh minus its wrist is the hypotheses' mean.
    np.testing.assert_allclose(
        pred_verts[row] - pred_joints[row][0], expected_mean[example], rtol=2e-3, atol=1e-5
    )
  assert vertex_std.min() > 0  # K = 3 different starting noises: a spread
  # Different images, different spreads (a shuffled order would fail the loop above).
  assert np.abs(vertex_std[0] - vertex_std[1]).max() > 1e-4


@pytest.mark.slow
def test_eval_with_one_hypothesis_writes_no_uncertainty(evaluated, tmp_path):
  config, workdir, _, _ = evaluated
  config = config.copy_and_resolve_references()
  config.sampling.num_hypotheses = 1
  evaluate.evaluate(config, checkpointing.restore_params(workdir), workdir=str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'eval')) == ['metrics.json', 'pred.json', 'scores.txt']


def test_steps_hypotheses_mean_medoid_and_oracle_errors():
  rng = np.random.default_rng(4)
  regressor = rng.uniform(size=(21, 778))
  regressor /= regressor.sum(axis=1, keepdims=True)
  gt_verts = rng.normal(scale=0.05, size=(3, 778, 3))
  gt_joints = np.einsum('jn,bnd->bjd', regressor, gt_verts)
  hypotheses = gt_verts[:, None] + rng.normal(scale=0.02, size=(3, 4, 778, 3))
  out = steps_hypotheses.aggregate_errors(hypotheses, gt_joints, gt_verts, regressor)
  for hand in range(3):
    mpjpe = [
        1000 * np.linalg.norm(regressor @ hypotheses[hand, k] - gt_joints[hand], axis=-1).mean()
        for k in range(4)
    ]
    best = int(np.argmin(mpjpe))
    np.testing.assert_allclose(out['oracle']['mpjpe'][hand], min(mpjpe), rtol=1e-5)
    mpvpe = 1000 * np.linalg.norm(hypotheses[hand, best] - gt_verts[hand], axis=-1).mean()
    np.testing.assert_allclose(out['oracle']['mpvpe'][hand], mpvpe, rtol=1e-5)
    mean = hypotheses[hand].mean(axis=0)
    np.testing.assert_allclose(
        out['mean']['mpvpe'][hand],
        1000 * np.linalg.norm(mean - gt_verts[hand], axis=-1).mean(),
        rtol=1e-5,
    )
  # The mean of 4 noisy copies is closer than any one of them; the oracle beats the medoid.
  assert np.all(out['mean']['mpvpe'] < out['oracle']['mpvpe'])
  assert np.all(out['oracle']['mpjpe'] <= out['medoid']['mpjpe'] * (1 + 1e-5))  # float32 medoid


def test_uncertainty_diagnostics_against_loops():
  rng = np.random.default_rng(5)
  gt_verts = rng.normal(scale=0.05, size=(7, 778, 3))
  scale = rng.uniform(0.005, 0.03, size=(7, 1, 1, 1))  # per-hand spread
  hypotheses = gt_verts[:, None] + 0.01 + scale * rng.normal(size=(7, 6, 778, 3))
  out = uncertainty.diagnostics(hypotheses, gt_verts)
  spread = lambda h: np.sqrt(((h - h.mean(0)) ** 2).sum(-1).mean(0)).mean()  # h: [K, V, 3]
  first = [spread(h[:3]) for h in hypotheses]
  second = [spread(h[3:]) for h in hypotheses]
  np.testing.assert_allclose(out['split_half'], stats.spearmanr(first, second)[0], rtol=1e-9)
  assert out['split_half'] > 0.9  # the per-hand scales differ by up to 6x: easy to rank
  one_sample = [np.linalg.norm(h - g, axis=-1).mean() for h, g in zip(hypotheses, gt_verts)]
  full = [spread(h) for h in hypotheses]
  np.testing.assert_allclose(
      out['per_hand_vs_sample'], stats.spearmanr(full, one_sample)[0], rtol=1e-9
  )
  bias = sum(((h.mean(0) - g) ** 2).sum() for h, g in zip(hypotheses, gt_verts))
  total = sum(((h - g) ** 2).sum() / len(h) for h, g in zip(hypotheses, gt_verts))
  np.testing.assert_allclose(out['bias_share'], bias / total, rtol=1e-9)
  error_of_mean = lambda h, g: np.linalg.norm(h.mean(0) - g, axis=-1).mean()
  cross = (
      stats.spearmanr(first, [error_of_mean(h[3:], g) for h, g in zip(hypotheses, gt_verts)])[0]
      + stats.spearmanr(second, [error_of_mean(h[:3], g) for h, g in zip(hypotheses, gt_verts)])[0]
  ) / 2
  np.testing.assert_allclose(out['cross_half'], cross, rtol=1e-9)
  std = np.stack([np.sqrt(((h - h.mean(0)) ** 2).sum(-1).mean(0)) for h in hypotheses])
  errors = np.stack([np.linalg.norm(h.mean(0) - g, axis=-1) for h, g in zip(hypotheses, gt_verts)])
  blind = stats.spearmanr(np.tile(std.mean(0), 7), errors.ravel())[0]
  np.testing.assert_allclose(out['image_independent_pooled'], blind, rtol=1e-6)
