"""The README's commands are what CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands():
    blocks = re.findall(r'```bash\n(.+?)\n\s*```', (ROOT / 'README.md').read_text())
    return [block.strip() for block in blocks]


def test_ci_runs_the_readme_test_command():
    test_command = _readme_commands()[1]
    assert 'pytest' in test_command
    ci_lines = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert test_command in ci_lines


def test_readme_main_command_uses_an_existing_config():
    main_command = _readme_commands()[0]
    config = re.search(r'--config=(\S+?)(:\S+)?\s', main_command + ' ').group(1)
    assert 'sequencer_jax.main' in main_command
    assert (ROOT / config).exists()
