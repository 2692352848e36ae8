"""Shared test set-up: 8 fake CPU devices for sharding tests, and common fixtures."""

import importlib
import json
import os
import tempfile

# Must happen before jax is imported anywhere in the test session. The 8 fake devices'
# threads share 2 cores with another test worker: one may reach a collective more than
# XLA's default 40 s after the others, which then abort the process (seen once in CI, in
# a resumed 8-device training); that is load, not a hang, so they wait longer here.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_cpu_collective_call_terminate_timeout_seconds=600')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# huggingface_hub reads these at import: no telemetry request, and a Hub cache of the
# tests' own, never the user's (tests that fetch weights serve them on 127.0.0.1).
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('HF_HOME', tempfile.mkdtemp(prefix='sequencer_jax_tests_hf_'))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    # With the PyTorch reference installed, its Triton (which timm imports) must load
    # before TensorFlow: the other order segfaults at collection (both bundle LLVM).
    importlib.import_module('triton')
except ImportError:
    pass

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'timm_parity.npz')


def fixture_images(h: int, w: int) -> np.ndarray:
    """The fixture's images [1, h, w, 3]: random, from a seed of their size (numpy's
    legacy generator never changes its stream), rounded to float16 values."""
    images = np.random.RandomState(1000 * h + w).randn(1, h, w, 3)
    return images.astype(np.float16).astype(np.float32)


class TimmFixture:
    """The committed timm fixture: tiny models' weights, images and reference logits."""

    def __init__(self, path: str = FIXTURE):
        self._data = np.load(path)
        self.meta = json.loads(self._data['meta'].tobytes())

    @property
    def cases(self) -> list[str]:
        return list(self.meta['cases'])

    def case(self, name: str) -> dict:
        return self.meta['cases'][name]

    def state_dict(self, name: str) -> dict[str, np.ndarray]:
        flat = self._data[f'{name}/weights'].astype(np.float32)
        out, start = {}, 0
        for key, shape in self.case(name)['keys']:
            size = int(np.prod(shape))
            out[key] = flat[start:start + size].reshape(shape)
            start += size
        return out

    def images(self, h: int, w: int) -> np.ndarray:
        return fixture_images(h, w)

    def logits(self, name: str, h: int, w: int) -> np.ndarray:
        return self._data[f'{name}/logits_{h}x{w}']


@pytest.fixture(scope='session')
def timm_fixture() -> TimmFixture:
    return TimmFixture()


def run_cli(main, *args: str):
    """Runs a CLI's ``main`` in this process as ``python -m`` would: its flags parsed from
    ``args`` (every other flag at its default); returns what ``main`` returns."""
    from absl import flags
    from sequencer_jax import cli
    flags.FLAGS.unparse_flags()
    return main(cli.parse_flags(['prog', *args]))
