"""PyTorch side by side: the same network trained and sampled in PyTorch and in our JAX (issue 11).

A from-scratch PyTorch implementation of DiffHand's network (diffhand_jax/models): the GroupNorm
ResNet or ViT/DeiT encoder, the cross-modality decoder (U-shaped vertex blocks + feature
blocks), the camera head and the auxiliary joint head. Module names follow the Flax parameter
tree, so `load_flax_params` copies our initial weights into it one to one (a Dense kernel
transposes, a Conv kernel permutes to OIHW); every parameter's shape, and so the parameter
count, is checked against the Flax model in the same run (a mismatch raises), and the forward
outputs on the benchmark inputs are compared. Both frameworks then start from the same weights.

What is timed, on the same inputs (median and min-max over --repeats after a warm-up call that
includes compilation). By default each framework runs in a process of its own
(`--isolation=process`): in one process PyTorch's OpenMP worker threads spin for a while after
each of its parallel regions and take the cores from the XLA call that follows, which on a
2-core CPU made our train step up to 4x slower (BENCHMARKS.md). `--isolation=interleaved` runs
all frameworks in this process, round by round, so that load from other processes on a shared
machine hits every variant alike:

* train step = network forward (encoder, decoder, camera head, auxiliary head) + a simple L2
  loss, mean((x0_hat - x0)^2) + mean((aux_joints - joints)^2) + mean((camera - camera*)^2), +
  backward + Adam (lr 1e-4). The same definition in both frameworks; NOT the full DiffHand loss
  (MANO joints, reprojection, normals, t-sampling; diffhand_jax/train_step.py), timed separately.
  Ours: one `jax.jit` of value_and_grad + optax.adam, params and optimiser state donated.
  PyTorch eager: `torch.optim.Adam(fused=True)`; torch.compile: the model + loss compiled
  (`dynamic=False`) and the optimiser step compiled as in PyTorch's "compiled optimizer" recipe.
* sampling = encoder once + S = 10 DDIM decoder steps (eta 0) for K hypotheses of one image
  (batch 1), then the root-centred mean mesh, its spread and the 21 joints, as
  `sampling.sample`. Ours: the jitted `sampling.sample` (one lax.scan); PyTorch: a Python loop
  under `torch.inference_mode()`, eager or with encoder and decoder step compiled.

Attention in PyTorch uses `F.scaled_dot_product_attention` (its fused kernels: the strongest
idiomatic baseline). On CUDA, float32 matmuls and convolutions may use TF32 in PyTorch, as
XLA's default precision does on the GPU (printed).

Configurations: 'synthetic' (configs/synthetic.py: ResNet-small, 64 px, decoder width 64,
batch 32), 'freihand' (configs/freihand.py with DeiT-Base, 224 px, batch 64; on a CPU the
batch defaults to 4, see --freihand_batch), 'smoke' (configs/synthetic.py:smoke, for tests).

Needs jax, flax, optax, numpy, scipy, ml_collections (configs/*.py) and torch; imports nothing
of TensorFlow (not diffhand_jax.train / input_pipeline / logging_utils).

Usage:
  .venv-torch/bin/python benchmarks/torch_reference.py                       # CPU, ~5 min
  .venv-torch/bin/python benchmarks/torch_reference.py --configs=synthetic --repeats=5
  python benchmarks/torch_reference.py --device=cuda --repeats=20            # a GPU machine
"""

import argparse
import contextlib
import copy
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import freihand
from configs import synthetic
from diffhand_jax import diffusion
from diffhand_jax import host_memory
from diffhand_jax import models
from diffhand_jax import sampling
from diffhand_jax.models import resnet as resnet_lib
from diffhand_jax.models import vit as vit_lib

LEARNING_RATE = 1e-4
SAMPLING_STEPS = 10
HYPOTHESES = (1, 16)
CPU_FREIHAND_BATCH = 4
SAMPLE_STATIC = ('model', 'num_sampling_steps', 'num_hypotheses', 'aggregate')


# ---- Configurations ----


def get_config(name: str):
  """'smoke' | 'synthetic' | 'freihand' (DeiT-Base 224): the experiment ConfigDict."""
  if name == 'smoke':
    return synthetic.get_config('smoke')
  if name == 'synthetic':
    return synthetic.get_config()
  if name == 'freihand':
    config = freihand.get_config()
    config.model.encoder_size = 'base'  # issue 11: DeiT-Base at 224 px, batch 64
    return config
  raise ValueError(f'unknown configuration {name!r} (known: smoke, synthetic, freihand)')


# ---- The network in PyTorch (names = the Flax parameter tree) ----


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2 (layers.Mlp)."""

  def __init__(self, in_dim, hidden_dim, out_dim=None):
    super().__init__()
    self.fc1 = nn.Linear(in_dim, hidden_dim)
    self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class ConvNorm(nn.Module):
  """Conv (no bias, 'same'-style padding k // 2) -> GroupNorm(gcd(32, C)) -> ReLU (hrnet.ConvNorm)."""

  def __init__(self, in_channels, features, kernel=3, stride=1, relu=True):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, features, kernel, stride, kernel // 2, bias=False)
    self.norm = nn.GroupNorm(math.gcd(32, features), features, eps=1e-5)
    self.relu = relu

  def forward(self, x):
    x = self.norm(self.conv(x))
    return F.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
  """Two 3x3 ConvNorms + residual; 1x1 strided shortcut when the shape changes."""

  def __init__(self, in_channels, features, stride):
    super().__init__()
    self.conv1 = ConvNorm(in_channels, features, 3, stride)
    self.conv2 = ConvNorm(features, features, 3, relu=False)
    if stride != 1 or in_channels != features:
      self.shortcut = ConvNorm(in_channels, features, 1, stride, relu=False)
    else:
      self.shortcut = None

  def forward(self, x):
    y = self.conv2(self.conv1(x))
    return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class ResNetEncoder(nn.Module):
  """resnet.ResNet: stride-16 tokens + a learned linear pooling of the stride-32 map."""

  def __init__(self, spec, image_size):
    super().__init__()
    self.stem = ConvNorm(3, spec.stem, 3, resnet_lib.STEM_STRIDE)
    channels = spec.stem
    for stage, (width, count) in enumerate(zip(spec.widths, spec.blocks), start=1):
      for block in range(count):
        self.add_module(
            f'stage{stage}_block{block}', ResidualBlock(channels, width, 2 if block == 0 else 1)
        )
        channels = width
    self.spec = spec
    out_dim = spec.widths[3]
    self.token_proj = nn.Conv2d(spec.widths[2], out_dim, 1)
    self.token_pos_embed = nn.Parameter(torch.randn((image_size // 16) ** 2, out_dim) * 0.02)
    self.embed_pool = nn.Linear(out_dim * (image_size // 32) ** 2, out_dim)

  def forward(self, images):
    """images [B, 3, S, S] -> tokens [B, (S/16)^2, D], embedding [B, D]."""
    x = self.stem(images)
    token_map = None
    for stage, count in enumerate(self.spec.blocks, start=1):
      for block in range(count):
        x = getattr(self, f'stage{stage}_block{block}')(x)
      if stage == 3:
        token_map = x
    tokens = self.token_proj(token_map).flatten(2).transpose(1, 2) + self.token_pos_embed
    # Flatten in (H, W, C) order, as the NHWC Flax module, so its kernel maps by a transpose.
    embedding = self.embed_pool(x.permute(0, 2, 3, 1).flatten(1))
    return tokens, embedding


class ViTAttention(nn.Module):
  """Fused-qkv multi-head self-attention (layers.SelfAttention)."""

  def __init__(self, width, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    batch, tokens, width = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, tokens, head_dim]
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class ViTBlock(nn.Module):
  """Pre-norm transformer block (vit.EncoderBlock)."""

  def __init__(self, width, num_heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=vit_lib.LAYER_NORM_EPS)
    self.attn = ViTAttention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=vit_lib.LAYER_NORM_EPS)
    self.mlp = Mlp(width, mlp_ratio * width)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
  """vit.VisionTransformer without depth or distillation token, position embedding on the
  input grid (a from-scratch model: no resampling)."""

  def __init__(self, width, depth, num_heads, patch_size, image_size):
    super().__init__()
    grid = image_size // patch_size
    self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
    self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, width) * 0.02)
    for i in range(depth):
      self.add_module(f'block{i}', ViTBlock(width, num_heads, vit_lib.MLP_RATIO))
    self.depth = depth
    self.norm = nn.LayerNorm(width, eps=vit_lib.LAYER_NORM_EPS)

  def forward(self, images):
    """images [B, 3, S, S] -> tokens [B, (S/p)^2, D], embedding [B, D] (class token)."""
    x = self.patch_embed(images).flatten(2).transpose(1, 2)
    cls = self.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + self.pos_embed
    for i in range(self.depth):
      x = getattr(self, f'block{i}')(x)
    x = self.norm(x)
    return x[:, 1:], x[:, 0]


class Attention(nn.Module):
  """flax nn.MultiHeadDotProductAttention: separate query/key/value/out projections."""

  def __init__(self, width, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.query = nn.Linear(width, width)
    self.key = nn.Linear(width, width)
    self.value = nn.Linear(width, width)
    self.out = nn.Linear(width, width)

  def _heads(self, x):
    batch, length, width = x.shape
    return x.reshape(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

  def forward(self, x, context):
    batch, length, width = x.shape
    out = F.scaled_dot_product_attention(
        self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
    )
    return self.out(out.transpose(1, 2).reshape(batch, length, width))


class AttentionBlock(nn.Module):
  """decoder.AttentionBlock: self-attention, + g, cross-attention to the tokens, MLP."""

  def __init__(self, width, num_heads, mlp_ratio):
    super().__init__()
    self.norm_self = nn.LayerNorm(width, eps=1e-6)
    self.self_attention = Attention(width, num_heads)
    self.norm_cross = nn.LayerNorm(width, eps=1e-6)
    self.cross_attention = Attention(width, num_heads)
    self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
    self.mlp = Mlp(width, mlp_ratio * width)

  def forward(self, h, g, tokens):
    x = self.norm_self(h)
    h = h + self.self_attention(x, x) + g[:, None, :]
    h = h + self.cross_attention(self.norm_cross(h), tokens)
    return h + self.mlp(self.norm_mlp(h))


class PointUpsample(nn.Module):
  """Linear map over the point axis: [B, n_in, C] -> [B, n_out, C]."""

  def __init__(self, num_in, num_out):
    super().__init__()
    self.point_map = nn.Linear(num_in, num_out)

  def forward(self, h):
    return self.point_map(h.transpose(1, 2)).transpose(1, 2)


class VertexBlock(nn.Module):
  """decoder.VertexBlock: FPS gathers + attention blocks down, point upsampling + laterals up."""

  def __init__(self, level_indices, num_points, width, num_heads, mlp_ratio):
    super().__init__()
    self.num_levels = len(level_indices)
    sizes = [num_points] + [len(indices) for indices in level_indices]
    for level, indices in enumerate(level_indices, start=1):
      self.register_buffer(f'indices_{level}', torch.tensor(indices, dtype=torch.long))
      self.add_module(f'down_attention_{level}', AttentionBlock(width, num_heads, mlp_ratio))
      self.add_module(f'upsample_{level}', PointUpsample(sizes[level], sizes[level - 1]))

  def forward(self, h, g, tokens):
    down = [h]
    for level in range(1, self.num_levels + 1):
      x = down[-1].index_select(1, getattr(self, f'indices_{level}'))
      down.append(getattr(self, f'down_attention_{level}')(x, g, tokens))
    up = down[-1]
    for level in range(self.num_levels, 0, -1):
      up = getattr(self, f'upsample_{level}')(up) + down[level - 1]
    return up


class FeatureBlock(nn.Module):
  """decoder.FeatureBlock: pre-norm per-point MLP with a residual."""

  def __init__(self, width, mlp_ratio):
    super().__init__()
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.mlp = Mlp(width, mlp_ratio * width)

  def forward(self, h):
    return h + self.mlp(self.norm(h))


def timestep_embedding(t, dim, max_period=10000.0):
  """decoder.timestep_embedding: [B] -> [B, dim] (cos | sin)."""
  half = dim // 2
  freqs = torch.exp(
      -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
  )
  angles = t.to(torch.float32)[:, None] * freqs[None]
  return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Decoder(nn.Module):
  """decoder.Decoder, kind 'cross_modality'."""

  def __init__(self, num_points, width, num_heads, num_blocks, mlp_ratio, level_indices, in_dim):
    super().__init__()
    self.width = width
    self.num_blocks = num_blocks
    self.position_embedding = nn.Parameter(torch.randn(num_points, width) * 0.02)
    self.vertex_embed = nn.Linear(3, width)
    self.time_mlp = Mlp(width, width)
    self.global_embed = nn.Linear(in_dim, width)
    self.token_proj = nn.Linear(in_dim, width)
    for block in range(num_blocks):
      self.add_module(
          f'vertex_block_{block}',
          VertexBlock(level_indices, num_points, width, num_heads, mlp_ratio),
      )
      self.add_module(f'feature_block_{block}', FeatureBlock(width, mlp_ratio))
    self.norm_out = nn.LayerNorm(width, eps=1e-6)
    self.out = nn.Linear(width, 3)

  def forward(self, x_t, t, tokens, embedding):
    """x_t [B, N, 3], t [B], tokens [B, P, D], embedding [B, D] -> x0_hat [B, N, 3]."""
    h = self.vertex_embed(x_t) + self.position_embedding
    g = self.global_embed(embedding) + self.time_mlp(timestep_embedding(t, self.width))
    tokens = self.token_proj(tokens)
    for block in range(self.num_blocks):
      h = getattr(self, f'vertex_block_{block}')(h, g, tokens)
      h = getattr(self, f'feature_block_{block}')(h)
    return self.out(self.norm_out(h))


class JointHead(nn.Module):
  """diffhand.JointHead: Dense -> tanh-GELU (flax's default) -> Dense to 21 x 3."""

  def __init__(self, dim, num_joints):
    super().__init__()
    self.num_joints = num_joints
    self.hidden = nn.Linear(dim, dim)
    self.out = nn.Linear(dim, num_joints * 3)

  def forward(self, embedding):
    hidden = F.gelu(self.hidden(embedding), approximate='tanh')
    return self.out(hidden).reshape(-1, self.num_joints, 3)


class DiffHandTorch(nn.Module):
  """diffhand.DiffHand: encoder + decoder + camera head (+ auxiliary joint head)."""

  def __init__(self, config, level_indices, joint_regressor):
    super().__init__()
    model_config = config.model
    if config.decoder != 'cross_modality' or not config.diffusion or model_config.use_depth:
      raise ValueError('the PyTorch reference implements the diffusion cross-modality model')
    image_size = int(config.data.image_size)
    if model_config.encoder == 'resnet':
      spec = resnet_lib.RESNET_SIZES[model_config.encoder_size]
      self.encoder = ResNetEncoder(spec, image_size)
      dim = spec.widths[3]
    elif model_config.encoder in ('vit', 'deit') and not model_config.distilled:
      depth, dim, heads = vit_lib.VIT_SIZES[model_config.encoder_size]
      self.encoder = ViTEncoder(dim, depth, heads, model_config.patch_size, image_size)
    else:
      raise ValueError(f'no PyTorch reference for encoder {model_config.encoder!r}')
    num_points = joint_regressor.shape[1]
    self.decoder = Decoder(
        num_points,
        model_config.width,
        model_config.num_heads,
        model_config.num_blocks,
        model_config.mlp_ratio,
        level_indices,
        dim,
    )
    self.camera_head = nn.Linear(dim, 3)
    self.aux_head = JointHead(dim, joint_regressor.shape[0]) if model_config.aux_head else None
    self.register_buffer('joint_regressor', torch.tensor(np.asarray(joint_regressor)))
    self.vertex_scale = float(config.vertex_scale)

  def encode(self, images):
    return self.encoder(images)

  def denoise(self, x_t, t, tokens, embedding):
    return self.decoder(x_t, t, tokens, embedding)

  def camera(self, embedding):
    raw = self.camera_head(embedding)
    scale = models.diffhand.INITIAL_CAMERA_SCALE * torch.exp(raw[:, :1])
    return torch.cat([scale, raw[:, 1:]], dim=-1)

  def forward(self, images, x_t, t):
    tokens, embedding = self.encode(images)
    out = {'x0': self.denoise(x_t, t, tokens, embedding), 'camera': self.camera(embedding)}
    if self.aux_head is not None:
      out['aux_joints'] = self.aux_head(embedding)
    return out


def build_torch_model(config, flax_model) -> DiffHandTorch:
  """The PyTorch twin of `flax_model` (its FPS levels and joint regressor)."""
  return DiffHandTorch(config, flax_model.decoder.level_indices, flax_model.joint_regressor.array)


# ---- Parameters: counts, shapes and the weight copy ----


def count_flax(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def count_torch(model: nn.Module) -> int:
  return int(sum(p.numel() for p in model.parameters()))


def _torch_value(module: nn.Module, leaf: str, value: np.ndarray) -> tuple:
  """(torch parameter name in `module`, value laid out as PyTorch stores it)."""
  if isinstance(module, nn.Linear):
    if leaf == 'kernel':  # Dense [in, out]; attention DenseGeneral [C, H, hd] / [H, hd, C]
      if value.ndim == 3 and value.shape[0] == module.in_features:  # query / key / value
        value = value.reshape(value.shape[0], -1)
      else:  # out [H, hd, C], or already 2-D
        value = value.reshape(-1, value.shape[-1])
      return 'weight', value.T
    return 'bias', value.reshape(-1)
  if isinstance(module, nn.Conv2d):
    return ('weight', value.transpose(3, 2, 0, 1)) if leaf == 'kernel' else ('bias', value)
  if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
    return ('weight' if leaf == 'scale' else 'bias'), value
  return leaf, value  # a bare parameter (embeddings, tokens)


def load_flax_params(model: nn.Module, params) -> None:
  """Copies the Flax params into `model`; raises unless every parameter matches in shape.

  Raises:
    ValueError: naming every Flax leaf without a PyTorch counterpart of the same shape and
      every PyTorch parameter left without a value.
  """
  torch_params = dict(model.named_parameters())
  assigned, errors = set(), []
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value)
    module_path = '.'.join(path[:-1])
    try:
      module = model.get_submodule(module_path) if module_path else model
    except AttributeError:
      errors.append(f'{"/".join(path)}: no PyTorch module {module_path!r}')
      continue
    leaf, value = _torch_value(module, path[-1], value)
    name = f'{module_path}.{leaf}' if module_path else leaf
    if name not in torch_params:
      errors.append(f'{"/".join(path)}: no PyTorch parameter {name!r}')
    elif tuple(torch_params[name].shape) != value.shape:
      errors.append(
          f'{"/".join(path)}: shape {value.shape} vs PyTorch {name} '
          f'{tuple(torch_params[name].shape)}'
      )
    else:
      with torch.no_grad():
        torch_params[name].copy_(torch.from_numpy(np.array(value)))
      assigned.add(name)
  errors += [
      f'PyTorch parameter {n!r} has no Flax value' for n in torch_params if n not in assigned
  ]
  if errors:
    raise ValueError('PyTorch and Flax parameters differ:\n  ' + '\n  '.join(errors))


def check_parameter_counts(name, flax_params, torch_model) -> tuple:
  """Prints both counts; raises SystemExit-worthy ValueError when they differ."""
  flax_count, torch_count = count_flax(flax_params), count_torch(torch_model)
  print(f'[{name}] parameters: Flax {flax_count:,}  PyTorch {torch_count:,}', flush=True)
  if flax_count != torch_count:
    raise ValueError(
        f'[{name}] parameter counts differ: Flax {flax_count:,} vs PyTorch {torch_count:,}'
    )
  return flax_count, torch_count


# ---- Inputs and the benchmarked steps ----


def make_inputs(config, batch, num_points, seed=0) -> dict:
  """Random training inputs (numpy, NHWC images), shared by both frameworks."""
  rng = np.random.default_rng(seed)
  size = int(config.data.image_size)
  return {
      'images': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      'x_t': rng.normal(size=(batch, num_points, 3)).astype(np.float32),
      't': rng.integers(0, int(config.schedule.num_timesteps), size=batch).astype(np.int32),
      'x0': (rng.normal(size=(batch, num_points, 3)) * 0.5).astype(np.float32),
      'joints': (rng.normal(size=(batch, 21, 3)) * 0.5).astype(np.float32),
      'camera': np.concatenate(
          [np.full((batch, 1), 10.0), rng.normal(size=(batch, 2)) * 0.1], -1
      ).astype(np.float32),
  }


def l2_loss(out: dict, batch: dict, mean):
  """The benchmark's loss (module docstring), in either framework (`mean` = its mean)."""
  loss = mean((out['x0'] - batch['x0']) ** 2) + mean((out['camera'] - batch['camera']) ** 2)
  if 'aux_joints' in out:
    loss = loss + mean((out['aux_joints'] - batch['joints']) ** 2)
  return loss


def jax_train_step(model, params, inputs, device):
  """() -> loss: one jitted step (value_and_grad + optax.adam), params/state donated."""
  optimizer = optax.adam(LEARNING_RATE)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in inputs.items()}, device)
  # Fresh buffers (a numpy copy): the step donates them, the caller keeps `params`.
  state = {'params': jax.device_put(jax.tree_util.tree_map(np.array, params), device)}
  state['opt_state'] = jax.device_put(optimizer.init(state['params']), device)

  def loss_fn(p, b):
    out = model.apply({'params': p}, b['images'], b['x_t'], b['t'])
    return l2_loss(out, b, jnp.mean)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, opt_state, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  def run():
    state['params'], state['opt_state'], loss = step(state['params'], state['opt_state'], batch)
    return jax.block_until_ready(loss)

  return run


def torch_batch(inputs, device) -> dict:
  batch = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
  batch['images'] = batch['images'].permute(0, 3, 1, 2).contiguous()  # NCHW
  batch['t'] = batch['t'].long()
  return batch


class TrainLoss(nn.Module):
  """model + the benchmark loss as one module (what torch.compile compiles)."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def forward(self, batch):
    return l2_loss(self.model(batch['images'], batch['x_t'], batch['t']), batch, torch.mean)


def synchronize(device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def autocast(device, dtype: str):
  """torch.autocast to `dtype` ('bfloat16', as our config.model.dtype) or no autocast."""
  if dtype == 'float32':
    return contextlib.nullcontext()
  return torch.autocast(device.type, dtype=getattr(torch, dtype))


def torch_train_step(model, inputs, device, compiled, compile_mode, dtype='float32'):
  """() -> loss: forward + loss + backward + Adam, eager or torch.compile'd.

  With `dtype` 'bfloat16' the forward and loss run under `torch.autocast` (parameters, their
  gradients and Adam stay float32), as our model computes with config.model.dtype.
  """
  model = copy.deepcopy(model).to(device).train()
  batch = torch_batch(inputs, device)
  loss_module = TrainLoss(model)
  if compiled:
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.compile(loss_module, mode=compile_mode, dynamic=False)
    opt_step = torch.compile(optimizer.step, mode=compile_mode, dynamic=False)
  else:
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=True)
    loss_fn, opt_step = loss_module, optimizer.step

  def run():
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, dtype):
      loss = loss_fn(batch)
    loss.backward()
    opt_step()
    synchronize(device)
    return loss

  return run


def ddim_coefficients(num_timesteps, cosine_s, num_steps):
  """[(t, sqrt(a), sqrt(1 - a), sqrt(a'), sqrt(max(1 - a', 0)))] per DDIM step (eta 0)."""
  alphas = np.asarray(diffusion.cosine_schedule(num_timesteps, cosine_s).alphas_cumprod)
  timesteps = diffusion.ddim_timesteps(num_timesteps, num_steps)
  out = []
  for i, t in enumerate(timesteps):
    a = float(alphas[t])
    a_next = float(alphas[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
    out.append((int(t), a**0.5, (1 - a) ** 0.5, a_next**0.5, max(1 - a_next, 0.0) ** 0.5))
  return out


def torch_sampler(model, config, images_nhwc, device, k, compiled, compile_mode):
  """() -> vertices: encoder once + S DDIM decoder steps for K hypotheses, summarised."""
  model = copy.deepcopy(model).to(device).eval()
  images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous().to(device)
  encode, denoise, camera = model.encode, model.denoise, model.camera
  if compiled:
    encode = torch.compile(encode, mode=compile_mode, dynamic=False)
    denoise = torch.compile(denoise, mode=compile_mode, dynamic=False)
  steps = ddim_coefficients(
      int(config.schedule.num_timesteps), float(config.schedule.cosine_s), SAMPLING_STEPS
  )
  generator = torch.Generator(device=device).manual_seed(0)
  regressor = model.joint_regressor
  batch, n = images.shape[0], regressor.shape[1]

  @torch.inference_mode()
  def run():
    tokens, embedding = encode(images)
    cam = camera(embedding)
    tokens_k = tokens.repeat_interleave(k, 0)
    embedding_k = embedding.repeat_interleave(k, 0)
    x = torch.randn(batch * k, n, 3, generator=generator, device=device)
    for t, sqrt_a, sqrt_1ma, sqrt_a_next, direction in steps:
      x0 = denoise(x, torch.full((batch * k,), t, device=device), tokens_k, embedding_k)
      x = sqrt_a_next * x0 + direction * (x - sqrt_a * x0) / sqrt_1ma
    hypotheses = x.reshape(batch, k, n, 3) * model.vertex_scale
    hypotheses = hypotheses - torch.einsum('n,bknd->bkd', regressor[0], hypotheses)[:, :, None]
    mean = hypotheses.mean(1)
    spread = ((hypotheses - mean[:, None]) ** 2).sum(-1).mean(1).sqrt()
    joints = torch.einsum('jn,bnd->bjd', regressor, mean)
    synchronize(device)
    return mean, joints, spread, cam

  return run


def jax_sampler(model, params, images_nhwc, device, k):
  params = jax.device_put(params, device)
  images = jax.device_put(jnp.asarray(images_nhwc), device)
  sample = jax.jit(sampling.sample, static_argnames=SAMPLE_STATIC)
  key = jax.device_put(jax.random.key(0), device)

  def run():
    out = sample(model, params, images, key, num_sampling_steps=SAMPLING_STEPS, num_hypotheses=k)
    return jax.block_until_ready(out['vertices'])

  return run


# ---- Timing ----


def time_interleaved(fns: dict, repeats: int) -> dict:
  """{name: (first call s, [repeat s])}; fns that fail report the error instead.

  One warm-up call each (compilation included: its time is the 'first call'), then `repeats`
  rounds that call every function once, so that load from other processes affects all alike.
  """
  results, live = {}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    try:
      fn()
    except Exception as error:  # pylint: disable=broad-except
      traceback.print_exc()
      results[name] = f'failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}'
      continue
    results[name] = (time.perf_counter() - start, [])
    live[name] = fn
  for _ in range(repeats):
    for name, fn in live.items():
      start = time.perf_counter()
      fn()
      results[name][1].append(time.perf_counter() - start)
  return results


def _median(result):
  return float(np.median(result[1])) if isinstance(result, tuple) else None


def _cell(result, scale=1e3, digits=1):
  """'median (min-max)' in ms, or the failure."""
  if not isinstance(result, tuple):
    return result
  times = np.asarray(result[1]) * scale
  return f'{np.median(times):.{digits}f} ({times.min():.{digits}f}-{times.max():.{digits}f})'


def _ratio(ours, other):
  a, b = _median(ours), _median(other)
  return f'{a / b:.2f}' if a and b else '-'


# ---- Main ----


FRAMEWORKS = ('jax', 'eager', 'compile')


def benchmark_config(name, args, jax_device, torch_device, config=None) -> dict:
  """Builds both models, checks them and times the frameworks of `args.frameworks`.

  `config` (optional) replaces `get_config(name)`; its train.global_batch_size is then the
  batch. `args.dtype` (default float32) is the compute dtype of both frameworks.

  Returns:
    {'description': str, 'batch': int, 'results': {workload: {framework: result}}} with
    workload 'train' or the number of hypotheses K (as a string), and result a
    (first call s, [repeat s]) pair or the failure's message.
  """
  given = config is not None
  config = config if given else get_config(name)
  dtype = getattr(args, 'dtype', 'float32')
  config.model.dtype = dtype
  if name == 'freihand' and not given:
    batch = args.freihand_batch or (CPU_FREIHAND_BATCH if torch_device.type == 'cpu' else 64)
  else:
    batch = int(config.train.global_batch_size)
  size = int(config.data.image_size)
  flax_model = models.build_model(config)
  with jax.default_device(jax_device):
    params = models.init_params(flax_model, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  torch.manual_seed(0)
  torch_model = build_torch_model(config, flax_model)
  count, _ = check_parameter_counts(name, params, torch_model)
  load_flax_params(torch_model, params)

  inputs = make_inputs(config, batch, flax_model.num_points)
  # Same weights, same inputs: the forward outputs agree (float32; TF32 on a GPU loosens it).
  with jax.default_device(jax_device):
    out = flax_model.apply({'params': params}, inputs['images'], inputs['x_t'], inputs['t'])
  with torch.no_grad():
    tb = torch_batch(inputs, torch_device)
    out_torch = torch_model.to(torch_device)(tb['images'], tb['x_t'], tb['t'])
  diff = max(float(np.max(np.abs(np.asarray(out[k]) - out_torch[k].cpu().numpy()))) for k in out)
  print(f'[{name}] forward outputs, max |Flax - PyTorch| = {diff:.2e}', flush=True)

  def make(workload, framework):
    if workload == 'train':
      if framework == 'jax':
        return jax_train_step(flax_model, params, inputs, jax_device)
      return torch_train_step(
          torch_model, inputs, torch_device, framework == 'compile', args.compile_mode, dtype
      )
    k = int(workload)
    images = inputs['images'][:1]
    if framework == 'jax':
      return jax_sampler(flax_model, params, images, jax_device, k)
    return torch_sampler(
        torch_model, config, images, torch_device, k, framework == 'compile', args.compile_mode
    )

  results = {}
  for workload in workloads(args):
    print(f'[{name}] {workload_label(workload, batch)} ...', flush=True)
    fns = {f: make(workload, f) for f in selected_frameworks(args)}
    results[workload] = time_interleaved(fns, args.repeats)
  description = (
      f'{config.model.encoder}-{config.model.encoder_size} {size} px, decoder width '
      f'{config.model.width} x {config.model.num_blocks} blocks, {count / 1e6:.2f} M params'
  )
  return {'description': description, 'batch': batch, 'results': results}


def selected_frameworks(args) -> list:
  return [f for f in FRAMEWORKS if f in args.frameworks.split(',')]


def workloads(args) -> list:
  return ['train'] + [str(k) for k in HYPOTHESES if not args.skip_sampling]


def workload_label(workload, batch) -> str:
  return f'train step, batch {batch}' if workload == 'train' else f'sample S=10 K={workload}'


def table_rows(name, summary) -> list:
  """Markdown cells per workload of one config's `benchmark_config` summary."""
  rows = []
  for workload, results in summary['results'].items():
    label = workload_label(workload, summary['batch'])
    first = name
    if workload == 'train' and isinstance(results.get('jax'), tuple):
      first = f'{name} ({summary["batch"] / _median(results["jax"]):.1f} img/s ours)'
    rows.append(
        (
            first,
            label,
            *(_cell(results.get(f, '-')) for f in FRAMEWORKS),
            _ratio(results.get('jax'), results.get('eager')),
            _ratio(results.get('jax'), results.get('compile')),
            *(
                f'{results[f][0]:.1f}' if isinstance(results.get(f), tuple) else '-'
                for f in FRAMEWORKS
            ),
        )
    )
  return rows


def benchmark_in_processes(name, args) -> dict:
  """`benchmark_config` for each framework in a fresh process of its own; merged summary.

  A child that fails (e.g. torch.compile without a compiler) reports its exit status for
  that framework instead of results.
  """
  merged = {'description': '', 'batch': 0, 'results': {w: {} for w in workloads(args)}}
  for framework in selected_frameworks(args):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'results.json')
      command = [
          sys.executable,
          os.path.abspath(__file__),
          f'--configs={name}',
          f'--frameworks={framework}',
          '--isolation=interleaved',
          f'--device={args.device}',
          f'--repeats={args.repeats}',
          f'--freihand_batch={args.freihand_batch}',
          f'--compile_mode={args.compile_mode}',
          f'--dtype={args.dtype}',
          f'--results_json={out}',
      ] + (['--skip_sampling'] if args.skip_sampling else [])
      print(f'[{name}] {framework} in its own process ...', flush=True)
      code = subprocess.run(command, check=False).returncode
      if code != 0 or not os.path.exists(out):
        summary = {'results': {w: {framework: f'failed: exit {code}'} for w in workloads(args)}}
      else:
        with open(out) as f:
          summary = json.load(f)[name]
    merged['description'] = merged['description'] or summary.get('description', '')
    merged['batch'] = merged['batch'] or summary.get('batch', 0)
    for workload, results in summary['results'].items():
      merged['results'][workload].update(
          {f: tuple(r) if isinstance(r, list) else r for f, r in results.items()}
      )
  return merged


def machine_line(jax_device, torch_device) -> str:
  torch_name = (
      torch.cuda.get_device_name(torch_device)
      if torch_device.type == 'cuda'
      else (platform.processor() or platform.machine())
  )
  tf32 = (
      f', TF32 matmul {torch.backends.cuda.matmul.allow_tf32} / conv '
      f'{torch.backends.cudnn.allow_tf32}'
      if torch_device.type == 'cuda'
      else ''
  )
  return (
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, '
      f'{platform.platform()}, {os.cpu_count()} CPU cores; '
      f'jax {jax.__version__} on {jax_device.platform} ({jax_device.device_kind}); '
      f'torch {torch.__version__} on {torch_device} ({torch_name}, '
      f'{torch.get_num_threads()} threads{tf32}).'
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='synthetic,freihand')
  parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
      '--freihand_batch',
      type=int,
      default=0,
      help=f'0 = 64 on a GPU, {CPU_FREIHAND_BATCH} on the CPU',
  )
  parser.add_argument(
      '--frameworks', default=','.join(FRAMEWORKS), help='subset of jax,eager,compile'
  )
  parser.add_argument('--compile_mode', default='default', help='torch.compile mode')
  parser.add_argument(
      '--dtype',
      default='float32',
      choices=('float32', 'bfloat16'),
      help='compute dtype: our config.model.dtype; PyTorch under torch.autocast (train step)',
  )
  parser.add_argument('--skip_sampling', action='store_true')
  parser.add_argument(
      '--isolation',
      default='process',
      choices=('process', 'interleaved'),
      help='process: each framework in a fresh process (the default, see the docstring); '
      'interleaved: all in this process, round by round',
  )
  parser.add_argument(
      '--results_json', default='', help='also write the raw timings here (used by process mode)'
  )
  args = parser.parse_args(argv)

  if args.device == 'auto':
    torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    jax_device = jax.devices()[0]
  else:
    torch_device = torch.device(args.device)
    jax_device = jax.devices('gpu' if args.device == 'cuda' else 'cpu')[0]
  if torch_device.type == 'cuda':
    # XLA's default float32 precision on the GPU uses TF32 for dots and convolutions.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  machine = machine_line(jax_device, torch_device)
  print(machine, flush=True)

  isolate = args.isolation == 'process' and len(selected_frameworks(args)) > 1
  summaries = {}
  for name in args.configs.split(','):
    if isolate:
      summaries[name] = benchmark_in_processes(name, args)
    else:
      summaries[name] = benchmark_config(name, args, jax_device, torch_device)
  if args.results_json:
    with open(args.results_json, 'w') as f:
      json.dump(summaries, f)

  lines = [
      '| config | workload | ours (JAX) ms | PyTorch eager ms | torch.compile ms | '
      'ours / eager | ours / compile | first call s: ours / eager / compile |',
      '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for name, summary in summaries.items():
    for row in table_rows(name, summary):
      lines.append('| ' + ' | '.join(row[:7]) + ' | ' + ' / '.join(row[7:]) + ' |')
  print()
  print(machine)
  how = 'each framework in a process of its own' if isolate else 'interleaved calls in one process'
  print(
      f'Median (min-max) of {args.repeats} calls after a warm-up, {how}; '
      'ratio < 1: ours faster. Train step = forward + L2 loss + backward + Adam.'
  )
  print('\n'.join(f'- {name}: {summary["description"]}' for name, summary in summaries.items()))
  print()
  print('\n'.join(lines))
  return summaries


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
  main()
