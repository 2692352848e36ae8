"""The command line of every tool: the flags they share (absl flags are global, so each is
defined once, here) and the one way a tool ends on bad input.

Every CLI module defines its own flags, declares the shared ones it reads as key flags
(so that its ``--help`` lists them) and ends with ``cli.run(main)``: a ``UserError``
raised anywhere below ``main`` is printed as ``error: MESSAGE`` and the tool exits with
status 1; ``--help`` prints the tool's flags and exits 0.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from typing import Callable

from absl import app, flags, logging
from etils import epath
from ml_collections import config_dict, config_flags

from sequencer_jax import host_memory, storage
from sequencer_jax.errors import UserError

CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file, '
                                         'FILE[:VARIANT] (e.g. configs/imagenet.py:model='
                                         'sequencer2d_l)', lock_config=True)
CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                 'weights: a training workdir, a converted directory, a Hub '
                                 'repository (hf-hub:timm/sequencer2d_s.in1k) or a state_dict '
                                 'file (its model from --config)')
OUTPUT = flags.DEFINE_string('output', None, 'the file or directory to write')
OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'also write the results here (JSON)')
MODEL = flags.DEFINE_string('model', None, 'a registered variant, e.g. sequencer2d_s')
MODEL_ARGS = flags.DEFINE_string('model_args', '{}', 'JSON object of create_model options, '
                                 'e.g. \'{"scan_blocks": true}\'')
NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'classifier width', lower_bound=1)
IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'image side in pixels', lower_bound=1)
BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'images per batch', lower_bound=1)
DATA_DIR = flags.DEFINE_string('data_dir', None, "TFDS data dir (default: TFDS's)")
EMA = flags.DEFINE_bool('ema', False, 'the EMA weights of a training checkpoint')

HELP_FLAGS = ('--help', '-h', '-?', '--helpshort')


def run(main: Callable[[list[str]], None], huge_pages: bool = False) -> None:
    """The entry point of a CLI (``if __name__ == '__main__': cli.run(main)``).
    ``huge_pages``: first re-run the process with huge pages for malloc where that helps
    (the tools that run models; see ``host_memory``)."""
    if huge_pages:
        try:
            host_memory.rerun_with_huge_pages()
        except UserError as e:
            _exit_with(e)
    app.run(functools.partial(_main_or_message, main), flags_parser=parse_flags)


def _main_or_message(main: Callable[[list[str]], None], argv: list[str]) -> None:
    try:
        main(argv)
    except UserError as e:
        _exit_with(e)


def _exit_with(error: UserError) -> None:
    print(f'error: {error}', file=sys.stderr, flush=True)
    # Nothing is left to say: orbax's and tensorstore's threads may still print tracebacks
    # while the interpreter shuts down (hundreds after a failed checkpoint write), which
    # would bury the message. fd 2: Python and C++ threads write there.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with three changes. ``--help`` lists the tool's own flags and
    the shared ones it uses, and exits 0. A mistyped ``--config.KEY`` override is named,
    with the nearest keys of the config (not ml_collections' bare AttributeError), and
    overrides without ``--config`` are reported as such. Libraries' INFO logs are hidden
    unless ``--verbosity`` is given (orbax logs ~45 lines per checkpoint save)."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print((sys.modules['__main__'].__doc__ or '').strip() + '\n')
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    overrides = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
    if overrides and not any(a == '--config' or a.startswith('--config=') for a in argv):
        run_dir = next((a.split('=', 1)[1] for a in argv
                        if a.startswith(('--workdir=', '--checkpoint='))), 'DIR')
        _flag_error(f'{", ".join(overrides)} change keys of --config, which is not given; '
                    'give it too (for the config a training run saved in its workdir: '
                    f'--config=configs/workdir.py:dir={run_dir}).')
    try:
        remaining = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_overrides_message(argv)
        if message is None:  # not a mistyped key (e.g. a bug in the config file): as is
            raise
        _flag_error(message)
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    if len(remaining) > 1:
        _flag_error(f'unexpected arguments {remaining[1:]}; every argument is a --flag.')
    return remaining


def _flag_error(message: str) -> None:
    """Ends the CLI as absl does for a bad flag."""
    print(f'FATAL Flags parsing error: {message}', file=sys.stderr)
    sys.exit(1)


def unknown_overrides_message(argv: list[str]) -> str | None:
    """Which ``--config.KEY`` overrides in ``argv`` name no key of the ``--config`` file,
    and the keys they may have meant; None if that cannot be told."""
    config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if config_arg is None:
        return None
    try:
        keys = _dotted_keys(flags.FLAGS['config'].parser.parse(config_arg))
    except Exception:  # noqa: BLE001 - a config that fails to load has its own error.
        return None
    problems = []
    for arg in argv:
        if arg.startswith('--config.'):
            key = arg[len('--config.'):].split('=', 1)[0]
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
                hint = f' (did you mean {", ".join(close)}?)' if close else ''
                problems.append(f'--config.{key}: the config has no key {key!r}{hint}')
    if not problems:
        return None
    return ('; '.join(problems) + '. Every key, with its meaning: base_config() in '
            'sequencer_jax/config_defaults.py.')


def _dotted_keys(config: config_dict.ConfigDict, prefix: str = '') -> list[str]:
    """Every key of ``config``, nested ones as 'optimizer.base_lr'."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, config_dict.ConfigDict):
            keys += _dotted_keys(value, f'{prefix}{key}.')
    return keys


def require(*holders: flags.FlagHolder) -> None:
    """A UserError naming the flags among ``holders`` that are not given."""
    missing = [f'--{holder.name}' for holder in holders if holder.value is None]
    if missing:
        raise UserError(f'Missing required flag(s): {", ".join(missing)}; see --help.')


def config_or_saved(directory: flags.FlagHolder, example: str) -> config_dict.ConfigDict:
    """``--config``, or without it the config that the training run in the directory
    ``directory`` names last started with (``configs/workdir.py:dir=DIR``; said on stdout).
    ``example`` ends the error when there is neither: what to give as ``--config``."""
    if CONFIG.value is not None:
        return CONFIG.value
    from sequencer_jax import config_defaults  # imports the model: after the flags
    config = config_defaults.saved_config(directory.value)
    saved = storage.resolve(directory.value) / config_defaults.SAVED_CONFIG_FILE
    if config is None:
        raise UserError(f'Missing --config: --{directory.name}={directory.value} holds no '
                        f'{saved.name} (the config a training run saves in its workdir) to '
                        f'use instead; give {example}.')
    config.lock()
    import jax
    if jax.process_index() == 0:
        print(f'Config: {saved}, the latest start of that run (to change keys: '
              f'--config=configs/workdir.py:dir={directory.value} --config.KEY=VALUE)', flush=True)
    return config


def output_file(flag: flags.FlagHolder) -> epath.Path | None:
    """The file a flag names, its directory created now, before the work whose results go
    there (a directory that cannot be made must stop the run at once, not lose its
    results at the end); None when the flag is unset or empty."""
    if not flag.value:
        return None
    try:
        return storage.output_file(flag.value)
    except UserError as e:
        raise UserError(f'--{flag.name}={flag.value}: {e}') from None
