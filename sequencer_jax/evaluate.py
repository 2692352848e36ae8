"""Evaluates a checkpoint on a TFDS split at one or several resolutions.

    python -m sequencer_jax.evaluate --config=configs/imagenet.py \
        --checkpoint=/path/to/workdir_or_converted_dir \
        --resolutions=128,160,192,224,256,288,320,384 --output_json=/tmp/eval.json \
        --plot=/tmp/sweep.png [--compare=/tmp/other_eval.json,...] [--crop_pct=1.0]

``--checkpoint`` is a training workdir (its newest checkpoint; the model comes from
``--config``, by default the run's own, ``configs/workdir.py:dir=DIR``), a directory
written by ``python -m sequencer_jax.convert`` or published weights on the Hub
(``hf-hub:timm/sequencer2d_s.in1k``; for both the model comes from the checkpoint, and
the resolution, crop and normalisation from its preprocessing unless the flags say
otherwise), or a PyTorch state_dict file (the model from ``--config``). The dataset, batch
size and mesh come from the config. Every example of the split counts exactly once.
Reproducing timm's published top-1 of sequencer2d_s (82.34), with ImageNet's two tars in
``~/tensorflow_datasets/downloads/manual/`` (TFDS prepares both splits on first use)::

    python -m sequencer_jax.evaluate --config=configs/imagenet.py \
        --checkpoint=hf-hub:timm/sequencer2d_s.in1k

A segmentation run (``config.task='segmentation'``) reports mIoU, mAcc, aAcc and loss over
the split, inferred as ``config.segmentation`` says (``--config.segmentation.inference=
slide``, ``--config.segmentation.eval_flip=true``, ...).
"""

from __future__ import annotations

import functools
import os

import jax
from absl import flags

from sequencer_jax import cli, config_defaults, storage, weights, xla_options
from sequencer_jax.data import batches, pipeline
from sequencer_jax.errors import UserError
from sequencer_jax.experiments import resolution
from sequencer_jax.train import mesh as mesh_lib, steps, tasks

_RESOLUTIONS = flags.DEFINE_list('resolutions', None,
                                 'comma-separated image sizes (default: the config\'s)')
_CROP_PCT = flags.DEFINE_float('crop_pct', None, 'centre-crop fraction (default: config)')
_SPLIT = flags.DEFINE_string('split', None, 'TFDS split (default: the config\'s eval split)')
_LABEL = flags.DEFINE_string('label', None, 'name of this checkpoint in JSON and plots')
_PLOT = flags.DEFINE_string('plot', None, 'write a PNG of top-1 against resolution here')
_COMPARE = flags.DEFINE_list('compare', [], 'earlier --output_json files to plot alongside')
for _name in ('config', 'checkpoint', 'output_json', 'ema'):
    flags.declare_key_flag(_name)


def evaluate_checkpoint(config, checkpoint_dir: str, resolutions: list[int],
                        crop_pct: float | None = None, split: str | None = None,
                        use_ema: bool = False, class_mask=None) -> list[dict]:
    """Rows ``{'resolution', 'top1', 'top5', 'loss', 'examples'}``, one per resolution.

    Weights that name their preprocessing (published ones: ``weights.preprocessing``) are
    fed as they want (mean, std, interpolation; ``crop_pct`` unless given), others as the
    config says. ``class_mask`` (bool [K]) restricts predictions to a class subset
    (ImageNet-A/R).
    """
    config_defaults.validate(config, training=False)
    mesh = mesh_lib.make_mesh(config.mesh)
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UserError(f'--crop_pct={crop_pct} must be in (0, 1], e.g. 0.875.')
    bad = [r for r in resolutions if r < 1]
    if bad:
        raise UserError(f'--resolutions must be positive image sizes, got {bad}.')
    params, ema_params, model = weights.load_params(checkpoint_dir)
    preprocessing = weights.preprocessing(checkpoint_dir)
    if preprocessing and crop_pct is None:
        crop_pct = preprocessing['crop_pct']
    spec = pipeline.dataset_spec(config.dataset)
    split = split or spec.eval_split
    examples = pipeline.split_examples(
        spec.builder, split, 'Give --split one of them, or a split expression such as '
        "'validation[:10%]'.")
    if model is None:
        model = config_defaults.model_from_config(
            config, config.model.num_classes or spec.num_classes)
    if class_mask is None:  # a masked subset (ImageNet-A/R) has its own class count
        batches.check_num_classes(model.num_classes, spec, f'The checkpoint {checkpoint_dir}')
    if use_ema:
        if ema_params is None:
            raise UserError(f'{checkpoint_dir} has no EMA weights; drop --ema.')
        params = ema_params
    for size in resolutions:  # all now: not after the first ones' evaluation
        model.check_input_shape((1, size, size, model.in_chans))
    params = weights.fitted(params, model, resolutions[0], checkpoint_dir, config)
    evaluate = _evaluation(config, mesh, params, functools.partial(
        steps.eval_step, model=model, class_mask=class_mask), f'{spec.builder.name} {split}')
    rows = []
    for size in resolutions:
        result = evaluate(lambda batch_size, size=size: pipeline.eval_dataset(
            spec, config, batch_size, image_size=size, crop_pct=crop_pct, split=split,
            preprocessing=preprocessing))
        rows.append({'resolution': size, **result, 'examples': examples})
    return rows


def evaluate_segmentation(config, checkpoint_dir: str, split: str | None = None,
                          use_ema: bool = False) -> dict:
    """``{'miou', 'macc', 'aacc', 'loss', 'examples'}`` of a segmentation checkpoint over
    ``split`` (default: the config's eval split), every labelled pixel counted once."""
    config_defaults.validate(config, training=False)
    mesh = mesh_lib.make_mesh(config.mesh)
    task = tasks.Segmentation(config)
    model, params, spec = task.load(checkpoint_dir, use_ema)
    split = split or spec.eval_split
    examples = pipeline.split_examples(spec.builder, split, 'Give --split one of them.')
    evaluate = _evaluation(config, mesh, params, task.eval_step(model),
                           f'{spec.builder.name} {split}', task.summarise)
    result = evaluate(lambda batch_size: task.eval_dataset(spec, batch_size, split))
    return {**result, 'examples': examples}


def _evaluation(config, mesh, params, eval_step, name: str, summarise=None):
    """``evaluate(dataset)``: the metrics of ``eval_step(params, batch)`` (jitted, the
    params placed on ``mesh`` by ``config.param_rules``) over the split that
    ``dataset(local_batch_size)`` gives as ``(tf.data.Dataset, batches)``, global
    batches split over the mesh; ``name`` names the split in input errors."""
    param_shardings = mesh_lib.tree_shardings(params, mesh, config.param_rules)
    params = jax.device_put(params, param_shardings)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    step = jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=mesh_lib.replicated(mesh),
                   compiler_options=xla_options.compiler_options())
    local_batch = batches.local_batch_size(config.eval_batch_size or config.batch_size)

    def evaluate(dataset) -> dict[str, float]:
        def batches():
            ds, n = dataset(local_batch)
            return pipeline.GlobalBatches(ds, batch_sharding, name), n

        with jax.set_mesh(mesh):  # recurrence='pallas' splits its kernels over it
            return steps.evaluate(params, batches, step, summarise)

    return evaluate


def format_table(rows: list[dict]) -> str:
    lines = [f'{"resolution":>10} {"top-1":>8} {"top-5":>8} {"loss":>8} {"examples":>9}']
    for r in rows:
        lines.append(f'{r["resolution"]:>10} {r["top1"]:>8.4f} {r["top5"]:>8.4f} '
                     f'{r["loss"]:>8.4f} {r["examples"]:>9}')
    return '\n'.join(lines)


def main(argv) -> None:
    del argv
    cli.require(cli.CHECKPOINT)
    config = cli.config_or_saved(cli.CHECKPOINT, 'the config that names the dataset to '
                                 'evaluate on, e.g. --config=configs/imagenet.py')
    output_json = cli.output_file(cli.OUTPUT_JSON)
    plot = cli.output_file(_PLOT)
    if _COMPARE.value and not plot:
        raise UserError('--compare adds curves to --plot; give --plot=FILE.png too.')
    try:
        compared = [resolution.load_rows(p) for p in _COMPARE.value]
    except (UserError, OSError) as e:
        raise UserError(f'--compare: {e}') from None
    if config.task == 'segmentation':
        if _RESOLUTIONS.value or _CROP_PCT.value or _PLOT.value:
            raise UserError('--resolutions, --crop_pct and --plot are for classification; a '
                            'segmentation run is evaluated as config.segmentation says.')
        row = evaluate_segmentation(config, cli.CHECKPOINT.value, _SPLIT.value, cli.EMA.value)
        if jax.process_index() == 0:
            print('  '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                            for k, v in row.items()))
            if output_json:
                storage.write_json(output_json, {'checkpoint': cli.CHECKPOINT.value, **row})
        return
    preprocessing = weights.preprocessing(cli.CHECKPOINT.value)
    resolutions = [preprocessing['input_size'][-1] if preprocessing
                   else config.eval_image_size or config.image_size]
    if _RESOLUTIONS.value:
        if not all(r.strip().isdigit() for r in _RESOLUTIONS.value):
            raise UserError(f'--resolutions={",".join(_RESOLUTIONS.value)}: give '
                            'comma-separated image sizes in pixels, e.g. 224,288.')
        resolutions = [int(r) for r in _RESOLUTIONS.value]
    rows = evaluate_checkpoint(config, cli.CHECKPOINT.value, resolutions, _CROP_PCT.value,
                               _SPLIT.value, cli.EMA.value)
    if jax.process_index() != 0:
        return
    print(format_table(rows))
    label = _LABEL.value or os.path.basename(os.path.normpath(cli.CHECKPOINT.value))
    if output_json:
        storage.write_json(output_json, {'checkpoint': cli.CHECKPOINT.value, 'label': label,
                                         'rows': rows})
    if plot:
        resolution.plot_resolution_sweep([(label, rows)] + compared, plot)
        print(f'wrote {plot}')


if __name__ == '__main__':
    cli.run(main, huge_pages=True)
