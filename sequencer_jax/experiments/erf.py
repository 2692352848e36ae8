"""Effective receptive field (ERF) of a checkpoint's last stage.

As the official ``generate_erf.py`` / ``visualize_erf.py`` (after RepLKNet): for each
image, the gradient of the (ReLU-ed, channel-summed) centre position of the last stage's
feature map with respect to the input; absolute values summed over colour channels and
averaged over images. The map is drawn as ``log10(erf + 1)`` scaled to [0, 1].

    python -m sequencer_jax.experiments.erf --config=configs/imagenet.py \
        --checkpoint=DIR --num_images=50 --output=erf.png

Without ``--config``, a training workdir's own config is used (``configs/workdir.py``);
``--image_size`` defaults to the config's, ``--output`` to erf.png.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sequencer_jax import cli, config_defaults, storage, weights, xla_options
from sequencer_jax.data import pipeline
from sequencer_jax.errors import UserError

_NUM_IMAGES = flags.DEFINE_integer('num_images', 50, 'eval images to average over',
                                   lower_bound=1)
for _name in ('config', 'checkpoint', 'image_size', 'output'):
    flags.declare_key_flag(_name)
DEFAULT_OUTPUT = 'erf.png'


def centre_gradient_map(model, variables, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] -> summed |d centre / d input| over channels and images [H, W]."""

    def centre(image):
        feats = model.apply(variables, image[None], method='features')[-1]  # [1, h, w, C]
        h, w = feats.shape[1:3]
        return jnp.sum(jax.nn.relu(feats[0, h // 2, w // 2].astype(jnp.float32)))

    grads = jax.vmap(jax.grad(centre))(images)
    return jnp.sum(jnp.abs(grads), axis=(0, 3))


def normalise_for_display(erf: np.ndarray) -> np.ndarray:
    """``log10(erf + 1)`` scaled to [0, 1], as visualize_erf.py draws it."""
    shown = np.log10(erf + 1.0)
    return shown / max(float(shown.max()), 1e-12)


def high_contribution_area(erf: np.ndarray, fraction: float) -> float:
    """The smallest fraction of the input area holding ``fraction`` of the total ERF mass
    (smaller = more concentrated)."""
    values = np.sort(erf.ravel())[::-1]
    cumulative = np.cumsum(values) / max(values.sum(), 1e-30)
    return float((np.searchsorted(cumulative, fraction) + 1) / values.size)


def save_png(erf: np.ndarray, output: str | os.PathLike,
             title: str = 'Effective receptive field') -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    im = ax.imshow(normalise_for_display(erf), cmap='RdYlGn', vmin=0, vmax=1)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    storage.write_figure(fig, output)
    plt.close(fig)


def compute_erf(config, checkpoint_dir: str, num_images: int, image_size: int) -> np.ndarray:
    """The averaged ERF [image_size, image_size] over ``num_images`` eval images."""
    params, _, model = weights.load_params(checkpoint_dir)
    spec = pipeline.dataset_spec(config.dataset)
    if model is None:
        model = config_defaults.model_from_config(
            config, config.model.num_classes or spec.num_classes)
    model.check_input_shape((1, image_size, image_size, model.in_chans))
    variables = {'params': weights.fitted(params, model, image_size, checkpoint_dir, config)}
    dataset, _ = pipeline.eval_dataset(spec, config, min(num_images, 16),
                                       image_size=image_size, process_index=0,
                                       process_count=1)
    grad_map = jax.jit(lambda v, x: centre_gradient_map(model, v, x),
                       compiler_options=xla_options.compiler_options())
    total, seen = np.zeros((image_size, image_size)), 0
    for batch in dataset.as_numpy_iterator():
        images = batch['image'][batch['mask'].astype(bool)][:num_images - seen]
        if len(images):
            total += np.asarray(grad_map(variables, images))
            seen += len(images)
        if seen >= num_images:
            break
    if seen == 0:
        raise UserError('The evaluation split has no images.')
    return total / seen


def main(argv) -> None:
    del argv
    cli.require(cli.CHECKPOINT)
    config = cli.config_or_saved(cli.CHECKPOINT, 'the config whose evaluation split to '
                                 'draw images from, e.g. --config=configs/imagenet.py')
    size = cli.IMAGE_SIZE.value or config.image_size
    output = cli.output_file(cli.OUTPUT) or storage.output_file(DEFAULT_OUTPUT)
    if output.suffix.lower() != '.png':
        raise UserError(f'--output={output}: give a .png file (the raw map goes next to it '
                        'as .npy).')
    erf = compute_erf(config, cli.CHECKPOINT.value, _NUM_IMAGES.value, size)
    with output.with_suffix('.npy').open('wb') as f:
        np.save(f, erf)
    save_png(erf, output)
    areas = {f: high_contribution_area(erf, f) for f in (0.2, 0.3, 0.5, 0.99)}
    print('high-contribution area ratio: ' +
          ', '.join(f'{int(100 * f)}%: {a:.4f}' for f, a in areas.items()))
    print(f'wrote {output} and {output.with_suffix(".npy")}')


if __name__ == '__main__':
    cli.run(main)
