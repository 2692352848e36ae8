"""Colour-coded predictions of a segmentation checkpoint, next to the image, as PNGs.

    python -m sequencer_jax.experiments.predictions --checkpoint=WORKDIR \
        --num_drawn=8 --output=predictions/

For each of the first ``--num_drawn`` images of the eval split, ``<output>/<i>.png``
shows the image, its label and the prediction side by side (the same colour for a class
in both; black where the label is ignored). Without ``--config``, the workdir's own
config is used; inference is ``config.segmentation``'s (whole or slide, flip).
"""

from __future__ import annotations

import jax
import matplotlib.image
import numpy as np
from absl import flags

from sequencer_jax import cli, config_defaults, storage
from sequencer_jax.data import transforms
from sequencer_jax.errors import UserError
from sequencer_jax.train import tasks

_NUM_DRAWN = flags.DEFINE_integer('num_drawn', 8, 'eval images to draw', lower_bound=1)
for _name in ('config', 'checkpoint', 'output', 'ema'):
    flags.declare_key_flag(_name)
DEFAULT_OUTPUT = 'predictions'


def palette(num_classes: int) -> np.ndarray:
    """uint8 ``[num_classes, 3]``: distinct colours, the same on every call."""
    colours = np.random.RandomState(0).randint(40, 256, (num_classes, 3))
    colours[0] = (0, 0, 128) if num_classes > 1 else colours[0]
    return colours.astype(np.uint8)


def side_by_side(image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                 colours: np.ndarray, ignore_label: int) -> np.ndarray:
    """uint8 ``[h, 3 w, 3]``: the (normalised) image, shown at its label's size ``[h, w]``
    (nearest neighbour), its label and the prediction."""
    rows = np.arange(label.shape[0]) * image.shape[0] // label.shape[0]
    cols = np.arange(label.shape[1]) * image.shape[1] // label.shape[1]
    shown = image[rows][:, cols] * np.asarray(transforms.IMAGENET_STD) + np.asarray(
        transforms.IMAGENET_MEAN)
    shown = np.clip(np.round(shown), 0, 255).astype(np.uint8)
    ignored = label == ignore_label
    drawn_label = np.where(ignored[..., None], 0, colours[np.where(ignored, 0, label)])
    return np.concatenate([shown, drawn_label.astype(np.uint8), colours[prediction]], axis=1)


def predictions(config, checkpoint_dir: str, num_images: int, use_ema: bool = False):
    """(image, label, prediction) of the first ``num_images`` eval images: the image cut
    to its size on the canvas, the label and prediction to the original size."""
    task = tasks.Segmentation(config)
    model, params, spec = task.load(checkpoint_dir, use_ema)

    @jax.jit
    def predict(params, batch):
        return tasks.segmentation_logits(params, batch, model=model,
                                         **task.logits_options()).argmax(-1)

    dataset, _ = task.eval_dataset(spec, min(num_images, 8))
    drawn = []
    for batch in dataset.as_numpy_iterator():
        predicted = np.asarray(predict(params, batch))
        for i in np.flatnonzero(batch['mask'])[:num_images - len(drawn)]:
            (h, w), (lh, lw) = batch['size'][i], batch['label_size'][i]
            drawn.append((batch['image'][i, :h, :w], batch['label'][i, :lh, :lw],
                          predicted[i, :lh, :lw]))
        if len(drawn) == num_images:
            break
    return drawn, spec.num_classes


def main(argv) -> None:
    del argv
    cli.require(cli.CHECKPOINT)
    config = cli.config_or_saved(cli.CHECKPOINT, 'the segmentation config whose eval split '
                                 'to draw, e.g. --config=configs/segmentation.py')
    if config.task != 'segmentation':
        raise UserError(f"{cli.CHECKPOINT.value}: config.task is {config.task!r}; this tool "
                        'draws the predictions of a segmentation run.')
    config_defaults.validate(config, training=False)
    output = cli.output_file(cli.OUTPUT) or storage.output_file(DEFAULT_OUTPUT)
    drawn, num_classes = predictions(config, cli.CHECKPOINT.value, _NUM_DRAWN.value,
                                     cli.EMA.value)
    colours = palette(num_classes)
    output.mkdir(parents=True, exist_ok=True)
    for index, (image, label, predicted) in enumerate(drawn):
        with (output / f'{index}.png').open('wb') as f:
            matplotlib.image.imsave(f, side_by_side(image, label, predicted, colours,
                                                    config.segmentation.ignore_label),
                                    format='png')
    print(f'wrote {len(drawn)} images (image | label | prediction) to {output}/')


if __name__ == '__main__':
    cli.run(main)
