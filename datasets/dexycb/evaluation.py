"""DexYCB hand-mesh metrics as the DexYCB literature reports them (millimetres).

MPJPE / MPVPE: mean Euclidean error after root alignment: prediction and ground truth are
each translated so that their wrist joint (joint 0) is at the origin, and the vertices are
moved with their own set's wrist (the unaligned numbers of HandOccNet and the later papers).
PA-MPJPE / PA-MPVPE: after a per-sample similarity (Procrustes with scale) alignment of the
prediction to the ground truth, joints and vertices aligned separately (metrics.align_w_scale,
the FreiHAND routine).
"""

import numpy as np

from diffhand_jax import metrics

WRIST = 0


def dexycb_metrics(pred_joints, pred_verts, gt_joints, gt_verts):
  """Args: pred/gt joints [N,21,3], verts [N,778,3], metres. Returns: dict of mm floats."""
  pred_joints, gt_joints = np.asarray(pred_joints, np.float64), np.asarray(gt_joints, np.float64)
  pred_verts, gt_verts = np.asarray(pred_verts, np.float64), np.asarray(gt_verts, np.float64)
  if pred_joints.shape != gt_joints.shape or pred_verts.shape != gt_verts.shape:
    raise ValueError(
        f'shape mismatch: joints {pred_joints.shape} vs {gt_joints.shape}, '
        f'verts {pred_verts.shape} vs {gt_verts.shape}'
    )
  pred_root = pred_joints[:, WRIST : WRIST + 1]
  gt_root = gt_joints[:, WRIST : WRIST + 1]

  def mean_mm(a, b):
    return float(np.linalg.norm(a - b, axis=-1).mean() * 1000.0)

  return {
      'mpjpe': mean_mm(pred_joints - pred_root, gt_joints - gt_root),
      'mpvpe': mean_mm(pred_verts - pred_root, gt_verts - gt_root),
      'pa_mpjpe': mean_mm(metrics.align_w_scale(gt_joints, pred_joints), gt_joints),
      'pa_mpvpe': mean_mm(metrics.align_w_scale(gt_verts, pred_verts), gt_verts),
  }
