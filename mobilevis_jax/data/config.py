"""The data section of every training config (``config.data``).

One ``ml_collections.ConfigDict`` describes the dataset, the split names, the train-time
augmentation recipe and the eval transform. The recipes in ``mobilevis_jax/configs/`` start from
:func:`default_data_config` and override fields; :func:`validate_data_config` is called by the
pipeline so a typo fails before any data is read.

Recipe values, for reference (see ``../shared/reference/training.md`` and each family's
``../shared/reference/<family>.md``):

* RepViT / MobileViG (DeiT recipe): ``randaugment='rand-m9-mstd0.5-inc1'``, bicubic crop,
  ``random_erasing=0.25``, ``repeated_aug=3``, mixup 0.8 / cutmix 1.0, switch 0.5, smoothing 0.1,
  eval ``crop_pct`` 0.875 (Resize 256 -> 224) for RepViT, 0.9 (248 -> 224) for MobileViG.
* ParC-Net: bilinear crop + flip only (cv2: ``antialias=False``), ``normalization='parc_bgr'``,
  ``multi_scale`` = (160, 192, 256, 288, 320) around 256, eval resize 288 -> crop 256
  (``crop_pct`` = 256 / 288) bilinear (``eval_interpolation``), smoothing 0.1.
"""
from __future__ import annotations

import os

import ml_collections

DATASETS = ("mobilevis_digits", "imagenet2012", "imagenet22k")
NORMALIZATIONS = ("imagenet", "parc_bgr", "none")
INTERPOLATIONS = ("bilinear", "bicubic", "random")
BACKENDS = ("tfdata", "grain")


def default_data_dir() -> str:
  """Where TFDS datasets live unless the config says otherwise: ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets`` (the TFDS default)."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def default_data_config() -> ml_collections.ConfigDict:
  """The default data section: the embedded ``mobilevis_digits`` dataset at 32x32, light
  augmentation.

  Every field:

  * ``name``: TFDS dataset, one of ``mobilevis_digits`` (embedded, built offline from scikit-learn's
    digits), ``imagenet2012`` (TFDS's own builder, manual tars), ``imagenet22k`` (our builder).
  * ``builder_config``: TFDS builder config (``imagenet22k``: ``fall11`` or ``winter21``); '' =
    default.
  * ``data_dir``: TFDS data directory; '' means ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
  * ``file_format``: ``tfrecord`` or ``array_record`` (used when preparing; reading detects it).
  * ``backend``: the input pipeline: ``tfdata`` (:mod:`~mobilevis_jax.data.pipeline`, any build)
    or ``grain`` (:mod:`~mobilevis_jax.data.grain_pipeline`: ArrayRecord builds only, so
    ``file_format='array_record'``; global shuffling, the iterator state in the checkpoint,
    restorable onto another process count).
  * ``train_split`` / ``eval_split``: TFDS split names (any TFDS split expression, e.g.
    ``train[:90%]``).
  * ``image_size``: train crop size and eval crop size (pixels, square).
  * ``interpolation``: resize kernel of RandomResizedCrop: ``bilinear``, ``bicubic`` or ``random``
    (per image, bilinear or bicubic with equal probability, like timm's ``random``).
  * ``eval_interpolation``: resize kernel of the eval transform (timm uses bicubic; ParC-Net's
    cvnets uses cv2 bilinear).
  * ``antialias``: train and eval resizes widen the kernel when downsampling (PIL/timm); False
    samples without it, as OpenCV's ``cv2.resize`` does (ParC-Net's cvnets transforms).
  * ``crop_pct``: eval transform resizes the shorter side to ``floor(image_size / crop_pct)`` then
    centre-crops ``image_size``.
  * ``scale`` / ``ratio``: RandomResizedCrop area fraction range and aspect-ratio range.
  * ``hflip``: probability of a horizontal flip.
  * ``normalization``: ``imagenet`` (RGB, /255, ImageNet mean/std), ``parc_bgr`` (ParC-Net's cv2
    convention: BGR channel order, /255, no mean/std), ``none`` (RGB in [0, 1]).
  * ``randaugment``: timm RandAugment string (e.g. ``rand-m9-mstd0.5-inc1``) or '' for none.
  * ``color_jitter``: brightness/contrast/saturation strength (torchvision ColorJitter); 0 = off.
    As in timm, it is not applied when ``randaugment`` is set.
  * ``random_erasing``: probability of erasing one rectangle per image (timm ``RandomErasing``,
    pixel mode: per-pixel standard-normal values in the normalised space); 0 = off.
  * ``repeated_aug``: k > 1 selects DeiT's RASampler: per epoch each of ``floor(N / 256) * 256``
    samples is one of k consecutive copies of an image (independent augmentations), dealt
    round-robin over the devices so the copies land on different devices; an epoch is
    ``floor(floor(N / 256) * 256 / D) // (global_batch / D)`` steps (see ``pipeline``); 1 = off.
  * ``multi_scale``: square resolutions of cvnets' variable-batch sampler (ParC-Net); each step
    draws one, and each device takes ``make_divisible(max(b, round(b * image_size**2 / r**2)),
    D)`` images, ``b`` the per-device batch at ``image_size`` (``pipeline.variable_batch_table``);
    an epoch is one pass over the data. () = off. Cannot be combined with ``repeated_aug``.
  * ``mixup_alpha`` / ``cutmix_alpha`` / ``mixup_switch_prob`` / ``label_smoothing``: batch-level
    Mixup/CutMix (timm semantics), applied by the trainer with :mod:`mobilevis_jax.train.mixup`.
  * ``shuffle_buffer``: per-host example shuffle buffer (on top of a per-epoch file-order shuffle).
  * ``skip_corrupt``: False = a truncated/undecodable image raises ``CorruptImageError`` naming the
    file; True = it is skipped, counted and logged (at prepare time it is also recorded in the
    dataset's metadata).
  * ``cache``: cache the (host's share of the) encoded records in memory; for small datasets.
  * ``prefetch``: batches to prefetch on the host.
  * ``num_parallel_calls``: tf.data parallelism for decoding/augmenting; -1 = AUTOTUNE.
  """
  c = ml_collections.ConfigDict()
  c.name = "mobilevis_digits"
  c.builder_config = ""
  c.data_dir = ""
  c.file_format = "tfrecord"
  c.backend = "tfdata"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 32
  c.interpolation = "bicubic"
  c.eval_interpolation = "bicubic"
  c.antialias = True
  c.crop_pct = 0.875
  c.scale = (0.08, 1.0)
  c.ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.hflip = 0.5
  c.normalization = "imagenet"
  c.randaugment = ""
  c.color_jitter = 0.0
  c.random_erasing = 0.0
  c.repeated_aug = 1
  c.multi_scale = ()
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.mixup_switch_prob = 0.5
  c.label_smoothing = 0.0
  c.shuffle_buffer = 10_000
  c.skip_corrupt = False
  c.cache = False
  c.prefetch = 2
  c.num_parallel_calls = -1
  return c


def imagenet_deit_config(image_size: int = 224,
                         crop_pct: float = 0.875) -> ml_collections.ConfigDict:
  """ImageNet-1K with the DeiT-style recipe RepViT and MobileViG train with."""
  c = default_data_config()
  c.name = "imagenet2012"
  c.image_size = image_size
  c.crop_pct = crop_pct
  c.interpolation = "bicubic"
  c.randaugment = "rand-m9-mstd0.5-inc1"
  c.color_jitter = 0.4  # inert while randaugment is set (timm semantics), kept for the record
  c.random_erasing = 0.25
  c.repeated_aug = 3
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.label_smoothing = 0.1
  c.shuffle_buffer = 50_000
  return c


def parc_config() -> ml_collections.ConfigDict:
  """ImageNet-1K with ParC-Net's recipe: bilinear crop + flip, BGR/255 input, multi-scale
  batches."""
  c = default_data_config()
  c.name = "imagenet2012"
  c.image_size = 256
  c.crop_pct = 256 / 288
  c.interpolation = "bilinear"
  c.normalization = "parc_bgr"
  # cvnets' scales for crop 256, 160..320, 5 scales, check_scale 32 (pipeline.cvnets_scales).
  c.multi_scale = (160, 192, 256, 288, 320)
  c.eval_interpolation = "bilinear"  # cvnets' eval Resize(288) is cv2.resize INTER_LINEAR ...
  c.antialias = False                # ... as is its RandomResizedCrop: no antialiasing
  c.label_smoothing = 0.1
  c.shuffle_buffer = 50_000
  return c


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field with a value the pipeline cannot honour."""
  if cfg.name not in DATASETS:
    raise ValueError(f"data.name={cfg.name!r}; expected one of {DATASETS}")
  if cfg.normalization not in NORMALIZATIONS:
    raise ValueError(f"data.normalization={cfg.normalization!r}; expected one of {NORMALIZATIONS}")
  for field in ("interpolation", "eval_interpolation"):
    if cfg[field] not in INTERPOLATIONS:
      raise ValueError(f"data.{field}={cfg[field]!r}; expected one of {INTERPOLATIONS}")
  if not 0.0 < cfg.crop_pct <= 1.0:
    raise ValueError(f"data.crop_pct={cfg.crop_pct}; expected 0 < crop_pct <= 1")
  validate_sampler_config(cfg)
  if not 0.0 <= cfg.random_erasing <= 1.0:
    raise ValueError(f"data.random_erasing={cfg.random_erasing}; expected a probability")
  if cfg.file_format not in ("tfrecord", "array_record"):
    raise ValueError(f"data.file_format={cfg.file_format!r}; expected 'tfrecord' or 'array_record'")
  backend = cfg.get("backend", "tfdata")
  if backend not in BACKENDS:
    raise ValueError(f"data.backend={backend!r}; expected one of {BACKENDS}")
  if backend == "grain" and cfg.file_format != "array_record":
    raise ValueError("data.backend='grain' reads ArrayRecord builds (random access): set "
                     "data.file_format='array_record' (and prepare the dataset with "
                     "--file-format array_record)")
  if cfg.randaugment:
    from mobilevis_jax.data.randaugment import parse_randaugment
    parse_randaugment(cfg.randaugment)  # raises ValueError on a bad string


def validate_sampler_config(cfg: ml_collections.ConfigDict) -> None:
  """The sampler fields alone (``repeated_aug``, ``multi_scale``; any data source, also the
  trainer's synthetic one): raises ValueError naming the field."""
  if int(cfg.repeated_aug) < 1:
    raise ValueError(f"data.repeated_aug={cfg.repeated_aug}; expected an integer >= 1")
  for r in cfg.multi_scale:
    if int(r) <= 0:
      raise ValueError(f"data.multi_scale={tuple(cfg.multi_scale)}; resolutions must be positive")
  if int(cfg.repeated_aug) > 1 and cfg.multi_scale:
    raise ValueError(f"data.repeated_aug={cfg.repeated_aug} with data.multi_scale="
                     f"{tuple(cfg.multi_scale)}: the two samplers (DeiT's RASampler, cvnets' "
                     "variable-batch sampler) cannot be combined; set one of them off")
