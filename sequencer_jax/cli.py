"""Command-line flags shared by the absl CLIs (absl flags are global: each is defined once),
and their parser."""

import contextlib
import difflib
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_dict, config_flags

from sequencer_jax import storage

CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file',
                                         lock_config=True)
CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'training workdir or converted dir')
OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'write the results here')


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``: a mistyped
    ``--config.KEY`` override is reported by name, with the nearest keys of the config,
    instead of as ml_collections' bare AttributeError or KeyError from deep inside, and
    overrides without ``--config`` (which the CLIs reading a workdir may leave out) are
    reported as such, not as unknown flags.

    Libraries' INFO logs are hidden unless ``--verbosity`` is given: orbax logs about 45
    lines per checkpoint save, which buried the progress lines (``--verbosity=0`` shows
    them again)."""
    overrides = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
    if overrides and not any(a == '--config' or a.startswith('--config=') for a in argv):
        run_dir = next((a.split('=', 1)[1] for a in argv
                        if a.startswith(('--workdir=', '--checkpoint='))), 'DIR')
        print(f'FATAL Flags parsing error: {", ".join(overrides)} change keys of --config, '
              'which is not given; give it too (for the config a training run saved in its '
              f'workdir: --config=configs/workdir.py:dir={run_dir}).', file=sys.stderr)
        sys.exit(1)
    try:
        remaining = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_overrides_message(argv)
        if message is None:  # not a mistyped key (e.g. a bug in the config file): as is
            raise
        print(f'FATAL Flags parsing error: {message}', file=sys.stderr)
        sys.exit(1)
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    return remaining


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


def check_args(argv, **required) -> None:
    """Rejects stray positional arguments and missing required flags (name=FlagHolder)."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    missing = [f'--{name}' for name, holder in required.items() if holder.value is None]
    if missing:
        raise app.UsageError(f'Missing required flag(s): {", ".join(missing)}.')


@contextlib.contextmanager
def stop_with_message(*errors: type[Exception]):
    """One of ``errors`` ends the CLI with ``error: MESSAGE`` alone and exit status 1: bad
    input found while it works (a ``ValueError``: a config value, a dataset, a checkpoint
    that does not fit), or a run that stopped itself. absl's UsageError would print the
    module's whole flag help before the message, which is about flags and says nothing of
    these."""
    try:
        yield
    except errors as e:
        raise SystemExit(f'error: {e}') from None


def config_or_saved(directory: flags.FlagHolder, example: str) -> config_dict.ConfigDict:
    """``--config``, or without it the config that the training run in the directory
    ``directory`` names last started with (``configs/workdir.py:dir=DIR``; said on stdout).
    ``example`` ends the error when there is neither: what to give as ``--config``."""
    if CONFIG.value is not None:
        return CONFIG.value
    from sequencer_jax import config_defaults  # imports the model: after the flags
    with stop_with_message(ValueError):
        config = config_defaults.saved_config(directory.value)
    saved = storage.resolve(directory.value) / config_defaults.SAVED_CONFIG_FILE
    if config is None:
        raise app.UsageError(f'Missing --config: --{directory.name}={directory.value} holds '
                             f'no {saved.name} (the config a training run saves in its '
                             f'workdir) to use instead; give {example}.')
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
    except ValueError as e:
        raise app.UsageError(f'--{flag.name}={flag.value}: {e}') from None
