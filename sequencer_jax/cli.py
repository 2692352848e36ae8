"""Command-line flags shared by the CLIs (absl flags are global: each is defined once)."""

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file',
                                         lock_config=True)
CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'training workdir or converted dir')
OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'write the results here')


def check_args(argv, **required) -> None:
    """Rejects stray positional arguments and missing required flags (name=FlagHolder)."""
    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    missing = [f'--{name}' for name, holder in required.items() if holder.value is None]
    if missing:
        raise app.UsageError(f'Missing required flag(s): {", ".join(missing)}.')
