"""The embedded default: synthetic rendered hands from the procedural MANO-format hand.

Usage:
  python launch.py --config=configs/synthetic.py            # the demo setting
  python launch.py --config=configs/synthetic.py:smoke      # tiny, seconds on one CPU core
  python launch.py --config=configs/synthetic.py --config.decoder=vanilla --config.diffusion=False
"""

import ml_collections

# Crop and colour augmentation of the training images. The real-data configs
# (configs/common.paper_config) and the smoke variant (which the tests train) use it; the
# synthetic default trains without it: its evaluation crops are exactly the unaugmented
# training crops, and at the demo's 640 steps augmentation cost 8 mm MPJPE on unseen hands
# (BENCHMARKS.md, issue 9). Without it the model begins to memorise its training hands: at
# the demo's 640 steps 8,192 of them scored no better than 4,096, but a long run gains from
# more (pretrained/synthetic_demo trained its last legs on 32,768 and 65,536: `data.num_train`).
CROP_AUGMENTATION = dict(rotation_deg=30.0, scale_jitter=0.25, center_jitter=0.1, color_jitter=0.2)


def get_config(arg=None):
  """Returns the experiment config; `arg` picks a variant (None or 'smoke')."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = ''  # workdir of a run whose params start this one (e.g. depth fine-tune)

  # ---- Hand model ----
  config.mano_path = ''  # '' = procedural_hand(mano_seed); else MANO_RIGHT.pkl / .npz
  config.mano_seed = 0
  config.tip_vertex_ids = (744, 320, 443, 555, 672)  # thumb, index, middle, ring, pinky (FreiHAND)
  config.vertex_scale = 0.1  # metres per unit of the diffusion variable

  # ---- Ablation switches (paper Table 4) ----
  config.decoder = 'cross_modality'  # 'cross_modality' | 'vanilla'
  config.diffusion = True  # False: direct regression from a zero input with t = 0

  # ---- Data ----
  config.data = ml_collections.ConfigDict()
  config.data.name = 'synthetic'  # 'synthetic' | 'freihand'
  config.data.root = ''  # FreiHAND root (manual_dir) for name='freihand'
  # Real data sets: an image that cannot be decoded fails the data set build naming the file
  # (False), or is left out with a warning naming it and the count logged (True).
  config.data.skip_corrupt = False
  config.data.tfds_data_dir = 'data/tfds'
  config.data.num_train = 4096  # synthetic set sizes (examples; ~45/s per core at 128 px)
  config.data.num_eval = 256
  config.data.render_size = 128  # synthetic images are rendered at this size
  config.data.image_size = 64  # network input (crop resized to this)
  config.data.shuffle_buffer = 2048
  # Training augmentation (0 = off; CROP_AUGMENTATION above gives the values used elsewhere).
  config.data.scale_jitter = 0.0  # relative crop size jitter
  config.data.center_jitter = 0.0  # crop centre jitter, fraction of the crop size
  config.data.rotation_deg = 0.0  # uniform in [-r, r]
  config.data.color_jitter = 0.0
  config.data.flip = False  # random horizontal flip (right<->left handled)
  config.data.crop_margin = 1.4  # crop side = margin * extent of the 2D joints
  config.data.orientation = 'held'  # 'held' (as hands are held up to a camera) | 'uniform'
  config.data.eval_crop = 'joints'  # eval crop: 'joints' (GT 2D joints) | 'image' (no GT used)

  # ---- Model ----
  config.model = ml_collections.ConfigDict()
  # The CPU default: a small GroupNorm ResNet trained from scratch (DESIGN §4). The paper's
  # setting is a pretrained 'deit' (configs/freihand.py).
  config.model.encoder = 'resnet'  # 'resnet' | 'vit' | 'deit' | 'hrnet'
  config.model.encoder_size = 'small'  # resnet: tiny | small | base; vit/deit: tiny | small |
  #                                     base | large; hrnet: w32 | w48 | w64
  config.model.patch_size = 16
  config.model.distilled = False  # DeiT distillation token
  config.model.pretrained_path = ''  # timm .safetensors/.pth or converted .msgpack (weights.py)
  config.model.hrnet_norm = 'group'  # 'group' | 'frozen_bn' (needed for timm HRNet weights)
  config.model.pretrained_image_size = 224
  # resnet: fold f x f pixel blocks into channels before the stem (resnet.py); image_size must
  # then be a multiple of 32 f. With init_from a model trained at image_size / f, its stem is
  # carried over so that training starts from the same function.
  config.model.space_to_depth = 1
  config.model.width = 64  # decoder channels C
  config.model.num_heads = 4
  config.model.num_blocks = 3  # cross-modality blocks
  config.model.downsample_rate = 4  # r: levels N, N/r, N/r^2
  config.model.num_levels = 2  # downsamplings in the U-shaped vertex block
  config.model.mlp_ratio = 4
  config.model.use_depth = False  # depth-conditioned model; the data then carry depth maps
  config.model.depth_zero_init = (
      'last'  # 'last' (DESIGN §4: only the last conv starts at 0) | 'all'
  )
  config.model.aux_head = True  # auxiliary joint head on the image embedding (L_aux)
  config.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  config.model.remat = False  # recompute decoder blocks in the backward pass (memory for time)
  # CPU rewrites of the dense layers, attention and GELU (models/cpu_kernels.py): the same
  # parameters, function and gradients, 0.8x the CPU train step (BENCHMARKS.md), but custom VJPs
  # (no jax.jvp / jacfwd through the model). This CPU config turns them on; every other config
  # and the sampling API run the plain JAX path. False: plain tracing for debugging.
  config.model.cpu_kernels = True

  # ---- Diffusion ----
  config.schedule = ml_collections.ConfigDict()
  config.schedule.num_timesteps = 1000
  config.schedule.cosine_s = 0.008
  config.sampling = ml_collections.ConfigDict()
  # DDIM steps. 1 = one decoder call at t = T - 1 (the x̂0 of pure noise: the model's estimate of
  # the posterior mean), the best measured setting of the shipped model on unseen hands (issue 36,
  # docs/experiments/2026-12-08-sampler.md; `--mode=eval --config.seed=1000`, 256 hands): MPJPE
  # 33.0 / PA-MPJPE 18.8 mm (0.441 / 0.500 of the mean hand), roughness 1.37x the true meshes', at
  # 1/10 of the cost. The paper's 10 steps (S = 10, K = 1): 39.5 / 21.9 mm (0.53 / 0.58); with
  # noise_scale 0, 35.9 / 18.9; the mean of K = 8 samples of 10 steps, 34.4 / 19.2. (A 640-step
  # `make demo` model keeps the better PA-MPJPE with 10 steps, 25.8 against 28.2 mm. Use 10 to
  # compare with the paper, and with num_hypotheses > 1 for uncertainty: one-step hypotheses barely
  # differ.)
  config.sampling.num_sampling_steps = 1
  config.sampling.eta = 0.0
  # Standard deviation of the starting noise x_T (the paper and training: 1; < 1 samples
  # closer to the learned distribution's centre, a temperature; 0 starts every hypothesis at 0).
  config.sampling.noise_scale = 1.0
  config.sampling.num_hypotheses = 1
  config.sampling.aggregate = 'mean'  # 'mean' | 'medoid'
  # Taubin lambda|mu passes over each sampled mesh (mesh.taubin_smooth): the decoder's output
  # carries per-vertex noise (1.37x the true meshes' roughness, even from the clean mesh at t = 0);
  # one pass brings the shipped model to 1.00x with MPVPE unchanged (29.77 -> 29.74 mm, seed 1000;
  # docs/experiments/2026-12-08-sampler.md). 0 = the raw decoder output.
  config.sampling.smoothing_iterations = 1

  # ---- Losses (DESIGN §5) ----
  config.loss = ml_collections.ConfigDict()
  config.loss.x0_weight = 1.0
  config.loss.joints_weight = 1.0
  config.loss.reprojection_weight = 0.1
  config.loss.normal_weight = 0.05
  config.loss.aux_weight = 1.0
  # L_lap (losses.laplacian_loss): the predicted mesh's umbrella Laplacian against the true one's,
  # a surface term for smooth meshes (issue 36); 0 = off (the step without the term).
  config.loss.laplacian_weight = 0.0

  # ---- Optimiser ----
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip_norm = 1.0
  config.optim.ema_decay = 0.0  # > 0: keep an EMA of params, used for evaluation

  # ---- Training ----
  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 32
  config.train.num_steps = 640  # make demo: 5 passes over 4,096 hands (the shipped model: longer)
  # > 0: training counts the prepared training split and sets num_steps (and warm-up,
  # checkpoint and eval intervals) for this many epochs (configs/common.epoch_schedule);
  # the real-data configs use it. 0: num_steps as given.
  config.train.num_epochs = 0.0
  config.train.t_max_fraction = 0.5  # share of each batch trained at t = T - 1 (DESIGN §5)
  config.train.parallelism = 'jit'  # 'jit' (NamedSharding over a 1-D data mesh) | 'pmap'
  # CPU tools, on in this CPU config only. flat_state: the compiled step holds params, AdamW
  # moments and EMA as flat vectors (flat_state.py): 0.24x the executable-load time of a warm
  # start on the CPU, same step time; checkpoints keep the tree. step_cache: the lowered step is
  # kept on disk beside the compilation cache (step_cache.py), so a warm start skips tracing;
  # False traces the Python loss every run (breakpoints, jax_debug_nans).
  config.train.flat_state = True
  config.train.step_cache = False
  config.train.log_every = 25
  config.train.eval_every = 500
  config.train.checkpoint_every = 250
  config.train.keep_checkpoints = 3
  config.train.best_metric = 'pa_mpvpe'  # lower is better
  # A non-finite loss, gradient or update: False stops training naming the step; True drops
  # that update (params and optimiser state unchanged), counts it and trains on.
  config.train.skip_nonfinite = False

  # ---- Evaluation ----
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 64
  config.eval.tta_angles = ()  # degrees, e.g. (-10., 0., 10.)
  config.eval.num_examples = -1  # -1 = the whole split

  # ---- Prediction on user images (--mode=predict) ----
  config.predict = ml_collections.ConfigDict()
  config.predict.focal_length_224 = 500.0  # px at a 224 px crop, scaled with the image; no K given

  if arg == 'smoke':
    config.data.num_train = 64
    config.data.num_eval = 16
    config.data.render_size = 64
    config.data.image_size = 64
    config.data.shuffle_buffer = 64
    config.data.update(CROP_AUGMENTATION)  # the tests train through the augmentation path
    config.model.width = 32
    config.model.num_heads = 2
    config.model.num_blocks = 1
    config.model.encoder_size = 'micro'  # ResNet widths 8-64, one block a stage: tests, smoke runs
    config.sampling.num_sampling_steps = 2
    config.optim.warmup_steps = 2
    config.train.global_batch_size = 8
    config.train.num_steps = 4
    config.train.log_every = 1
    config.train.eval_every = 4
    config.train.checkpoint_every = 2
    config.eval.batch_size = 8
  elif arg not in (None, ''):
    raise ValueError(f'unknown variant {arg!r} of configs/synthetic.py (known: smoke)')
  return config
