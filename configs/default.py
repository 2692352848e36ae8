"""The README's main job: a small Sequencer2D trained on the embedded digits, on CPU.

scikit-learn's handwritten digits (``sklearn_digits``, shipped as a TFDS builder) at
32 px; about 2 minutes of training on a 2-core CPU. Variant string:
``configs/default.py:mesh=data``; ``dataset=synthetic`` trains the same model on random
images made on the devices (no TensorFlow; see ``config.dataset.synthetic``).
"""

from sequencer_jax import config_defaults


def get_config(arg=None):
    config = config_defaults.base_config()
    config.model.name = 'sequencer2d_s'
    # Sequencer2D-S's structure, narrowed and shortened for 32 px digits on a CPU.
    config.model.args.update(layers=(1, 1, 2, 1), patch_sizes=(4, 2, 1, 1),
                             embed_dims=(32, 64, 64, 64), hidden_sizes=(8, 16, 16, 16),
                             drop_path_rate=0.0)
    config.dataset = config_defaults.dataset_config('sklearn_digits', shuffle_buffer=2048)
    # dataset=synthetic: the digits' classes and split sizes.
    config.dataset.synthetic.update(num_classes=10, train_examples=1437, eval_examples=360)
    # Digits are not mirror-symmetric, and tiny: no flip, mild crops, light mixing.
    config.augment = config_defaults.augment_config(
        crop_scale=(0.6, 1.0), flip=False, randaugment=None, erase_prob=0.0,
        mixup_alpha=0.0, cutmix_alpha=0.0)
    config.image_size = 32
    config.crop_pct = 1.0
    config.batch_size = 64
    config.num_epochs = 30
    config.optimizer.base_lr = 2e-3
    config.optimizer.reference_batch_size = 64
    config.optimizer.warmup_epochs = 1
    config.optimizer.weight_decay = 0.05
    config.log_every_steps = 50
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    return config_defaults.apply_variant(config, arg, {'mesh': config_defaults.set_mesh,
                                                       'dataset': config_defaults.set_dataset})
