"""Command-line flags shared by the CLIs (absl flags are global: each is defined once)."""

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file',
                                         lock_config=True)
CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'training workdir or converted dir')
OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'write the results here')
