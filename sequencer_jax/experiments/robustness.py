"""Robustness suites through TFDS, scored as the paper does, with one command each.

    python -m sequencer_jax.experiments.robustness --config=configs/imagenet.py \
        --checkpoint=DIR --suite=imagenet_c [--output_json=c.json]

Without ``--config``, a training workdir's own config is used (``configs/workdir.py``).

Suites (TFDS names; each must be prepared in the TFDS data dir, several need a manual
download, see the TFDS catalogue):

* ``imagenet_c``: ``imagenet2012_corrupted/<corruption>_<severity>``, 15 corruptions x 5
  severities, centre crop 1.0; corruption error normalised by AlexNet's, as the official
  ``validate_c.py``: CE_c = mean_s err(c, s) / AlexNet_c and mCE = mean_c CE_c.
* ``imagenet_a`` / ``imagenet_r``: the 200-class subsets; logits outside the subset are
  masked before the argmax (the 1,000-class labels are unchanged).
* ``imagenet_sketch``, ``imagenet_v2``: plain top-1 on 1,000 classes.
* ``imagenet_real``: ``imagenet2012_real``, a prediction is right when it is one of the
  ReaL labels; images without any ReaL label are left out.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import flags

from sequencer_jax import cli, storage
from sequencer_jax.errors import UserError
from sequencer_jax.evaluate import evaluate_checkpoint

# Mean top-1 error of AlexNet over the 5 severities (Hendrycks & Dietterich, 2019), the
# normalisation used by the official validate_c.py.
ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948,
    'zoom_blur': 0.798360, 'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324,
    'brightness': 0.564592, 'contrast': 0.853204, 'elastic_transform': 0.646056,
    'pixelate': 0.717840, 'jpeg_compression': 0.606500,
}
SEVERITIES = (1, 2, 3, 4, 5)
# (TFDS name template, split) of ImageNet-C
CORRUPTED_DATASET = ('imagenet2012_corrupted/{corruption}_{severity}', 'validation')

# ImageNet-1K class indices of the 200 ImageNet-A and ImageNet-R classes (Hendrycks et al.).
IMAGENET_A_CLASSES = tuple(int(i) for i in """
    6 11 13 15 17 22 23 27 30 37 39 42 47 50 57 70 71 76 79 89 90 94 96 97 99 105 107
    108 110 113 124 125 130 132 143 144 150 151 207 234 235 254 277 283 287 291 295 298
    301 306 307 308 309 310 311 313 314 315 317 319 323 324 326 327 330 334 335 336 347
    361 363 372 378 386 397 400 401 402 404 407 411 416 417 420 425 428 430 437 438 445
    456 457 461 462 470 472 483 486 488 492 496 514 516 528 530 539 542 543 549 552 557
    561 562 569 572 573 575 579 589 606 607 609 614 626 627 640 641 642 643 658 668 677
    682 684 687 701 704 719 736 746 749 752 758 763 765 768 773 774 776 779 780 786 792
    797 802 803 804 813 815 820 823 831 833 835 839 845 847 850 859 862 870 879 880 888
    890 897 900 907 913 924 932 933 934 937 943 945 947 951 954 956 957 959 971 972 980
    981 984 986 987 988
""".split())
IMAGENET_R_CLASSES = tuple(int(i) for i in """
    1 2 4 6 8 9 11 13 22 23 26 29 31 39 47 63 71 76 79 84 90 94 96 97 99 100 105 107 113
    122 125 130 132 144 145 147 148 150 151 155 160 161 162 163 171 172 178 187 195 199
    203 207 208 219 231 232 234 235 242 245 247 250 251 254 259 260 263 265 267 269 276
    277 281 288 289 291 292 293 296 299 301 308 309 310 311 314 315 319 323 327 330 334
    335 337 338 340 341 344 347 353 355 361 362 365 366 367 368 372 388 390 393 397 401
    407 413 414 425 428 430 435 437 441 447 448 457 462 463 469 470 471 472 476 483 487
    515 546 555 558 570 579 583 587 593 594 596 609 613 617 621 629 637 657 658 701 717
    724 763 768 774 776 779 780 787 805 812 815 820 824 833 847 852 866 875 883 889 895
    907 928 931 932 933 934 936 937 943 945 947 948 949 951 953 954 957 963 965 967 980
    981 983 988
""".split())

# suite -> (TFDS name, split, label key, class subset or None)
SUITES = {
    'imagenet_a': ('imagenet_a', 'test', 'label', IMAGENET_A_CLASSES),
    'imagenet_r': ('imagenet_r', 'test', 'label', IMAGENET_R_CLASSES),
    'imagenet_sketch': ('imagenet_sketch', 'test', 'label', None),
    'imagenet_v2': ('imagenet_v2', 'test', 'label', None),
    'imagenet_real': ('imagenet2012_real', 'validation', 'real_label', None),
}
SUITE_NAMES = ('imagenet_c',) + tuple(SUITES)

_SUITE = flags.DEFINE_enum('suite', None, SUITE_NAMES, 'which robustness suite')
for _name in ('config', 'checkpoint', 'output_json'):
    flags.declare_key_flag(_name)


def mean_corruption_error(errors: dict[str, dict[int, float]]) -> dict[str, float]:
    """errors[corruption][severity] = top-1 error in [0, 1] -> per-corruption CE (%),
    'mCE' (%) and 'mCE_unnormalized' (%), as validate_c.py computes them."""
    missing = sorted(set(ALEXNET_ERRORS) - set(errors))
    if missing:
        raise UserError(f'mCE needs all 15 corruptions; missing {missing}.')
    out, ces, raw = {}, [], []
    for corruption, alexnet in ALEXNET_ERRORS.items():
        by_severity = errors[corruption]
        if sorted(by_severity) != list(SEVERITIES):
            raise UserError(f'{corruption}: need severities {SEVERITIES}, got '
                             f'{sorted(by_severity)}.')
        mean_error = float(np.mean([by_severity[s] for s in SEVERITIES]))
        out[corruption] = 100 * mean_error / alexnet
        ces.append(mean_error / alexnet)
        raw.append(mean_error)
    out['mCE'] = 100 * float(np.mean(ces))
    out['mCE_unnormalized'] = 100 * float(np.mean(raw))
    return out


def class_mask(num_classes: int, subset) -> np.ndarray | None:
    """Boolean [K] mask of the classes a suite scores (None: all)."""
    if subset is None:
        return None
    mask = np.zeros(num_classes, bool)
    mask[list(subset)] = True
    return mask


def _dataset_config(config, name: str, split: str, label_key: str):
    dataset = ml_collections.ConfigDict(config.dataset.to_dict())
    dataset.name, dataset.eval_split, dataset.label_key = name, split, label_key
    return dataset


def run_suite(config, checkpoint_dir: str, suite: str) -> dict:
    """Scores one suite; returns a JSON-able dict with a 'table' of rows."""
    eval_config = ml_collections.ConfigDict(config.to_dict())
    size = config.eval_image_size or config.image_size
    if suite == 'imagenet_c':
        errors, rows = {}, []
        for corruption in ALEXNET_ERRORS:
            errors[corruption] = {}
            for severity in SEVERITIES:
                template, split = CORRUPTED_DATASET
                name = template.format(corruption=corruption, severity=severity)
                eval_config.dataset = _dataset_config(config, name, split, 'label')
                # Its images are centre crops already: none again, whatever crop the
                # weights name (published ones: 0.875).
                (row,) = evaluate_checkpoint(eval_config, checkpoint_dir, [size], crop_pct=1.0)
                errors[corruption][severity] = 1.0 - row['top1']
                rows.append({'corruption': corruption, 'severity': severity,
                             'top1': row['top1']})
        return {'suite': suite, 'table': rows, 'scores': mean_corruption_error(errors)}
    name, split, label_key, subset = SUITES[suite]
    eval_config.dataset = _dataset_config(config, name, split, label_key)
    num_classes = config.model.num_classes or 1000
    (row,) = evaluate_checkpoint(eval_config, checkpoint_dir, [size],
                                 class_mask=class_mask(num_classes, subset))
    return {'suite': suite, 'table': [row], 'scores': {'top1': 100 * row['top1'],
                                                      'top5': 100 * row['top5']}}


def main(argv) -> None:
    del argv
    cli.require(cli.CHECKPOINT, _SUITE)
    config = cli.config_or_saved(cli.CHECKPOINT, 'the config of the model and the batch '
                                 'size, e.g. --config=configs/imagenet.py')
    output_json = cli.output_file(cli.OUTPUT_JSON)
    result = run_suite(config, cli.CHECKPOINT.value, _SUITE.value)
    if jax.process_index() != 0:
        return
    for key, value in result['scores'].items():
        print(f'{key:<22}{value:>8.2f}')
    if output_json:
        storage.write_json(output_json, result)


if __name__ == '__main__':
    cli.run(main)
