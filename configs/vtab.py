"""Head2Toe on one task. `get_config()` is the offline default.

    python -m h2t.main --config=configs/vtab.py --workdir=/tmp/h2t
    python -m h2t.main --config=configs/vtab.py --workdir=/tmp/h2t \
        --config.dataset=fashion_mnist \
        --config.learning.feature_selection.keep_fraction=0.05

Option names follow google-research/head2toe (configs_eval/finetune*.py), so
its commands translate one to one: `additional_features_target_size`,
`learning.feature_selection.keep_fraction`,
`learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef`,
`learning.learning_rate`, `learning.training_steps`, ...
"""

import ml_collections

VARIANTS = ("paper",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The offline default: EfficientNet-Lite0 (ImageNet) on scikit-learn's digits.

  `configs/vtab.py:paper` searches the paper's grid instead: the ℓ2,1
  coefficient {1e-3, 1e-5}, target sizes {1024, 16384, 40000} (the ResNet-50
  values), keep fractions {0.01, 0.05, 0.1, 0.2}, learning rates {0.1, 0.01}
  and {500, 5000} steps. It is meant for an accelerator.
  """
  if arg and arg not in VARIANTS:
    raise ValueError(f"configs/vtab.py:{arg}: unknown variant; expected one of {', '.join(VARIANTS)}")
  config = ml_collections.ConfigDict()
  # Task: 'digits' or 'fashion_mnist' (offline), or a VTAB-1k task name.
  config.dataset = "digits"
  config.data_dir = ""  # TFDS data directory; '' uses TFDS's default.
  config.fashion_mnist_dir = ""  # Fashion-MNIST IDX files; '' uses /usr/share/datasets/fashion-mnist.
  # 'test': train on the 1000 training images, report test accuracy.
  # 'valid': mean accuracy over the reference's 5 folds of the 1000 images.
  config.eval_mode = "test"
  config.seed = 8  # The reference's seed.
  # The grid searched by 5-fold CV: `path=v1,v2;path=v1,v2` over learning.* and
  # backbone.* fields (see h2t/grid.py). '' = no search, the values above.
  # Small enough for a 2-core CPU; `configs/vtab.py:paper` is the paper's grid.
  config.sweep = (
    "learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef=1e-4,1e-5;"
    "learning.feature_selection.keep_fraction=0.05,0.1"
  )
  config.cache_dir = ""  # Pooled-feature cache; '' = WORKDIR/cache.
  # Compiled XLA programs, reused by later runs of the same shapes; '' = <cache dir>/jax, 'off' = none.
  config.compilation_cache_dir = ""
  # Methods run side by side on the same features (h2t/evaluate.py METHODS):
  # head2toe, linear (`pre_logits` alone, same trainer), all_features (every
  # tap, no selection, the configured penalties), ridge, finetune.
  config.methods = ("head2toe", "linear")

  config.backbone = ml_collections.ConfigDict()
  # efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 (optional packages) | resnet50 |
  # vit_b16, or several at once joined by '+'
  # (e.g. resnet50+vit_b16; the reference's imagenetr50_2x is resnet50+resnet50).
  config.backbone.name = "efficientnet_lite0"
  # '' uses the backbone's default (packaged) weights; several backbones: one
  # path per member, comma-separated.
  config.backbone.checkpoint = ""
  config.backbone.input_size = 0  # 0 runs at the checkpoint's resolution.
  # Taps to use: 'all' (every tap, network order) or a comma-separated list.
  config.backbone.additional_features = "all"
  config.backbone.include_input = False  # Also use the (pooled) input image.
  # Each tap is average-pooled to about this many features (0: use pool_size).
  config.backbone.additional_features_target_size = 1024
  config.backbone.additional_features_pool_size = 0  # Used when target size is 0; 0 = global.
  # Pool every tap at each of these sizes too, e.g. '1024,8192' (comma-separated;
  # overrides additional_features_target_size; taps become '<tap>@<size>').
  config.backbone.additional_features_multi_target_sizes = ""
  config.backbone.cls_token_pool = "normal"  # normal | only_cls | nopool_cls (token taps).
  config.backbone.batch_size = (
    64  # Images per extraction forward pass; 0: the platform's (64 CPU, 256 GPU/TPU).
  )
  # The forward pass's dtype: float32, or bfloat16 (faster on accelerators; features move by ~5%,
  # experiments/results/bench_extraction_cpu.md). Pooled features are float32 either way.
  config.backbone.dtype = "float32"

  config.learning = ml_collections.ConfigDict()
  config.learning.optimizer = "adam"  # adam | sgd (momentum 0.9)
  config.learning.learning_rate = 0.1
  config.learning.grad_clip_value = -1.0  # Applied when positive.
  config.learning.l1_regularizer = 0.0
  config.learning.l2_regularizer = 0.0
  config.learning.group_lrp_regularizer_coef = 0.0  # ℓ2,1 coefficient of the final head.
  config.learning.group_lrp_regularizer_r = 2.0  # Inner norm order (or 'inf').
  config.learning.group_lrp_regularizer_p = 1.0  # Outer norm order (or 'inf').
  config.learning.group_lrp_is_embedding = False  # Groups are whole taps, not features.
  config.learning.training_steps = 500
  config.learning.use_cosine_decay = True
  config.learning.train_batch_size = 128
  config.learning.eval_batch_size = 50
  config.learning.feature_normalization = "unit_vector"  # unit_vector | per_feature | ''
  config.learning.output_head_zeroinit = False  # First layer of the head starts at zeros.
  # nohidden (linear head), random_N (a frozen random ReLU layer of N units
  # first), trainable_N (the same layer, trained); N = 0 means N = classes.
  config.learning.output_head_type = "nohidden"
  # Method 'finetune': its learning rate and steps are these multiples of the above.
  config.learning.finetune_lr_multiplier = 1.0
  config.learning.finetune_steps_multiplier = 1.0
  # Train on a balanced k-shot subset, k = max(int(1000 * fraction / classes), 1).
  config.learning.data_fraction = 1.0
  # Probe matmuls: 'highest' (full float32 on every device), 'high' or 'default'
  # (the platform's fastest: TF32 on NVIDIA GPUs, bfloat16 passes on TPUs).
  config.learning.precision = "highest"
  # Linear probes train at a bucket of class counts (the next power of two, at
  # least 8; padding masked out), so the tasks of a sweep whose class counts
  # share a bucket reuse the compiled grid programs. The numbers equal the
  # unpadded ones up to float rounding (a wider matmul may sum in another order).
  config.learning.class_buckets = True
  # The dtype the probes' normalised training features are stored in on the
  # device: bfloat16 halves the bytes a training step reads (each minibatch is
  # cast back to float32 before the matmuls); float32 gives the exact numbers.
  config.learning.feature_dtype = "float32"

  fs = config.learning.feature_selection = ml_collections.ConfigDict()
  # connectivity_l2 (the paper's), connectivity_l1, connectivity_linf,
  # connectivity_l2layer; data scores: random, variance, sklearn_chi2,
  # sklearn_f_classif, sklearn_mutual_info_classif, sklearn_trees; or none.
  fs.type = "connectivity_l2"
  fs.keep_fraction = 0.1  # Fraction of all features kept.
  fs.keep_fraction_offset = 0  # Skip the k best features (an ablation).
  fs.mean_interpolation_coef = 0.0  # Pull scores toward their tap's mean.
  fs.average_over_k = 1  # Average the scores of k selection runs.
  # Select the features on this other task's training set ('' = the task itself);
  # same backbone and pooling. A task name as for config.dataset.
  fs.fs_dataset = ""
  fs.is_overwrite = True  # Selection run uses learning_config_overwrite.
  fs.learning_config_overwrite = ml_collections.ConfigDict()
  fs.learning_config_overwrite.group_lrp_regularizer_coef = 1e-4

  if arg == "paper":
    config.sweep = ";".join(
      [
        "learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef=1e-3,1e-5",
        "backbone.additional_features_target_size=1024,16384,40000",
        "learning.feature_selection.keep_fraction=0.01,0.05,0.1,0.2",
        "learning.learning_rate=0.1,0.01",
        "learning.training_steps=500,5000",
      ]
    )
  return config
