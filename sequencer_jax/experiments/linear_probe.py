"""Example: Sequencer's stage features inside other JAX code (a linear probe).

This is what research code importing the Flax module looks like: load converted (or
trained) weights, call ``model.apply(..., method='features')`` for the four stage maps,
pool them, and fit a linear classifier with optax on the embedded digits dataset.

    python -m sequencer_jax.convert --input=sequencer2d_s.pth --model=sequencer2d_s --output=/tmp/s
    python -m sequencer_jax.experiments.linear_probe --checkpoint=/tmp/s --image_size=224

``--checkpoint`` is a converted directory, a training workdir, a Hub repository
(``hf-hub:timm/sequencer2d_s.in1k``) or a state_dict file (``.pth``, ``.safetensors``,
``.npz``; its model from ``--config``). Prints the probe's test accuracy for the pooled
features of each stage and of all four.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import flags

import sequencer_jax.data.builders  # noqa: F401  (registers 'sklearn_digits' with TFDS)
from sequencer_jax import cli, weights
from sequencer_jax.data import transforms

for _name in ('checkpoint', 'config', 'image_size', 'data_dir'):
    flags.declare_key_flag(_name)
DEFAULT_IMAGE_SIZE = 224


def load_digits(split: str, image_size: int, data_dir: str | None = None):
    """Digits as normalised images [N, S, S, 3] and labels [N], via TFDS."""
    images, labels = tfds.as_numpy(tfds.load('sklearn_digits', split=split, batch_size=-1,
                                             as_supervised=True, data_dir=data_dir))
    rgb = np.repeat(images.astype(np.float32), 3, axis=-1)
    rgb = jax.image.resize(rgb, (len(rgb), image_size, image_size, 3), 'bicubic')
    mean, std = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
    return (np.clip(np.asarray(rgb), 0, 255) - mean) / std, labels


def pooled_stage_features(model, variables, images, batch_size: int = 64) -> list[np.ndarray]:
    """Global-average-pooled features of each stage: 4 arrays [N, C_i]."""
    features = jax.jit(lambda x: [f.mean(axis=(1, 2)) for f in
                                  model.apply(variables, x, method='features')])
    chunks = [features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return [np.concatenate([np.asarray(c[s]) for c in chunks]) for s in range(4)]


def fit_linear_probe(train_x, train_y, test_x, test_y, num_classes: int,
                     steps: int = 500, learning_rate: float = 0.05) -> float:
    """Standardised features -> softmax regression (AdamW); returns test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    params = {'w': jnp.zeros((train_x.shape[1], num_classes)), 'b': jnp.zeros(num_classes)}
    tx = optax.adamw(learning_rate, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = train_x @ p['w'] + p['b']
            return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    predictions = np.argmax(test_x @ params['w'] + params['b'], axis=-1)
    return float(np.mean(predictions == test_y))


def main(argv) -> dict[str, float]:
    del argv
    cli.require(cli.CHECKPOINT)
    image_size = cli.IMAGE_SIZE.value or DEFAULT_IMAGE_SIZE
    model, params = weights.load_model(cli.CHECKPOINT.value, image_size, cli.CONFIG.value)
    variables = {'params': params}
    train_x, train_y = load_digits('train', image_size, cli.DATA_DIR.value)
    test_x, test_y = load_digits('test', image_size, cli.DATA_DIR.value)
    train_f = pooled_stage_features(model, variables, train_x)
    test_f = pooled_stage_features(model, variables, test_x)
    results = {f'stage{i}': fit_linear_probe(train_f[i], train_y, test_f[i], test_y, 10)
               for i in range(4)}
    results['all_stages'] = fit_linear_probe(np.concatenate(train_f, 1), train_y,
                                             np.concatenate(test_f, 1), test_y, 10)
    for name, accuracy in results.items():
        print(f'linear probe on {name:<11} test top-1 {accuracy:.4f}')
    return results


if __name__ == '__main__':
    cli.run(main)
