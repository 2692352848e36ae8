"""Main job CLI.

    python -m sequencer_jax.main --config=configs/default.py --workdir=/tmp/sequencer

Until the training loop lands, the main job builds the configured model, prints a
summary (parameters per stage) and runs a timed forward pass.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from sequencer_jax.models import registry

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for outputs')


def summarize(params) -> list[tuple[str, int]]:
    """(top-level module, parameter count) rows in module order."""
    return [(name, sum(x.size for x in jax.tree.leaves(sub))) for name, sub in params.items()]


def run(config, workdir: str) -> None:
    model = registry.create_model(config.model.name, config.model.num_classes,
                                  **config.model.args.to_dict())
    images = jax.random.normal(jax.random.PRNGKey(config.seed),
                               (config.batch_size, config.image_size, config.image_size, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), images[:1])['params']
    print(f'{config.model.name} ({config.model.num_classes} classes), '
          f'{config.image_size}px input')
    for name, count in summarize(params):
        print(f'  {name:<24}{count:>12,}')
    total = sum(x.size for x in jax.tree.leaves(params))
    print(f'  {"total":<24}{total:>12,}')
    forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
    start = time.perf_counter()
    logits = forward(params, images).block_until_ready()
    first = time.perf_counter() - start
    start = time.perf_counter()
    forward(params, images).block_until_ready()
    print(f'forward pass: logits {tuple(logits.shape)}, first call (with compile) {first:.2f}s, '
          f'then {time.perf_counter() - start:.3f}s for {config.batch_size} images')
    os.makedirs(workdir, exist_ok=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError('Both --config and --workdir are required.')
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
