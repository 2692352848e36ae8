"""The CLIs re-run themselves with huge pages for malloc where the kernel needs asking."""

import os
import subprocess
import sys
import textwrap

import pytest

from sequencer_jax import host_memory
from sequencer_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


def test_environment_adds_the_tunable_only_where_it_changes_something():
    env = host_memory.huge_page_environment({'HOME': '/root'}, 'madvise', GLIBC)
    assert env == {'HOME': '/root', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
    kept = host_memory.huge_page_environment(
        {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'madvise', GLIBC)
    assert kept['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
    for environ, thp_mode, glibc in [
            ({}, 'always', GLIBC),  # every page may be huge already
            ({}, 'never', GLIBC),
            ({}, None, GLIBC),  # no THP (not Linux, or a kernel without it)
            ({}, 'madvise', None),  # musl, macOS: no glibc tunables
            ({}, 'madvise', (2, 34)),  # the tunable came with glibc 2.35
            ({'SEQUENCER_JAX_HUGETLB': '0'}, 'madvise', GLIBC),
            ({'SEQUENCER_JAX_HUGETLB': 'False'}, 'madvise', GLIBC),
            ({'SEQUENCER_JAX_HUGETLB': ' off '}, 'madvise', GLIBC),
            ({'LD_PRELOAD': '/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4'}, 'madvise', GLIBC),
            ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'madvise', GLIBC),
            ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, 'madvise', GLIBC)]:
        assert host_memory.huge_page_environment(environ, thp_mode, glibc) is None


def test_the_opt_out_variable_is_read_as_a_switch_or_refused(monkeypatch):
    for value in ['1', 'yes', 'ON', '']:
        env = host_memory.huge_page_environment({'SEQUENCER_JAX_HUGETLB': value},
                                                'madvise', GLIBC)
        assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
    with pytest.raises(ValueError, match="SEQUENCER_JAX_HUGETLB='maybe' is not understood"):
        host_memory.huge_page_environment({'SEQUENCER_JAX_HUGETLB': 'maybe'}, 'never', GLIBC)
    monkeypatch.setenv('SEQUENCER_JAX_HUGETLB', '2')
    with pytest.raises(UserError, match="SEQUENCER_JAX_HUGETLB='2' is not understood: set it "
                       'to 0'):
        host_memory.rerun_with_huge_pages()
    # A CLI says so in one line, before any work.
    run = subprocess.run([sys.executable, '-m', 'sequencer_jax.benchmark', '--help'],
                         env=dict(os.environ, SEQUENCER_JAX_HUGETLB='2'), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and run.stdout == '', run.stderr[-3000:]
    assert run.stderr.rstrip().splitlines()[-1] == (
        "error: SEQUENCER_JAX_HUGETLB='2' is not understood: set it to 0 to keep 4 KiB pages "
        'for malloc, or unset it (or 1) to let the CLI turn huge pages on where the kernel '
        'needs asking.')


def test_thp_mode_and_glibc_version_are_read(tmp_path):
    mode_file = tmp_path / 'enabled'
    mode_file.write_text('always [madvise] never\n')
    assert host_memory.transparent_hugepages(str(mode_file)) == 'madvise'
    assert host_memory.transparent_hugepages(str(tmp_path / 'missing')) is None
    mode_file.write_text('garbled\n')
    assert host_memory.transparent_hugepages(str(mode_file)) is None
    version = host_memory.glibc_version()
    assert version is None or version >= (2, 17)


def test_a_failed_rerun_continues_in_this_process(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(host_memory, 'transparent_hugepages', lambda: 'madvise')
    monkeypatch.setattr(host_memory, 'glibc_version', lambda: GLIBC)
    monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
    monkeypatch.delenv('SEQUENCER_JAX_HUGETLB', raising=False)
    monkeypatch.delenv('LD_PRELOAD', raising=False)
    monkeypatch.setattr(sys, 'executable', str(tmp_path / 'no-such-python'))
    host_memory.rerun_with_huge_pages()
    stderr = capsys.readouterr().err
    assert 're-running' in stderr and 'could not re-run' in stderr and '4 KiB pages' in stderr


# Touches 256 MiB from malloc (not numpy, which asks for huge pages by itself) and
# prints how much of the process is in huge pages, and its arguments.
MALLOC_PROBE = textwrap.dedent("""
    import ctypes, sys
    from sequencer_jax import host_memory
    host_memory.rerun_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 << 20
    ctypes.memset(libc.malloc(size), 1, size)
    with open('/proc/self/smaps_rollup') as f:
        huge_kib = [int(l.split()[1]) for l in f if l.startswith('AnonHugePages:')][0]
    print(huge_kib, sys.argv[1:])
""")

needs_madvise_mode = pytest.mark.skipif(
    host_memory.huge_page_environment({}, host_memory.transparent_hugepages(),
                                      host_memory.glibc_version()) is None,
    reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")


def _environ_without_tunables(**env):
    """This process's environment without GLIBC_TUNABLES (so the re-run decides), plus
    ``env``."""
    return {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'} | env


def _run_probe(tmp_path, **env):
    script = tmp_path / 'probe.py'
    script.write_text(MALLOC_PROBE)
    result = subprocess.run([sys.executable, str(script), 'a', '--b=c'], cwd=ROOT,
                            env=_environ_without_tunables(**env), capture_output=True,
                            text=True, timeout=120, check=True)
    huge_kib, argv = result.stdout.split(maxsplit=1)
    return int(huge_kib), argv.strip(), result.stderr


@needs_madvise_mode
def test_rerun_puts_malloc_in_huge_pages_keeping_the_arguments(tmp_path):
    huge_kib, argv, stderr = _run_probe(tmp_path)
    assert huge_kib >= 200 << 10
    assert argv == "['a', '--b=c']"
    assert stderr.count('re-running with GLIBC_TUNABLES=glibc.malloc.hugetlb=1') == 1
    huge_kib, argv, stderr = _run_probe(tmp_path, SEQUENCER_JAX_HUGETLB='0')
    assert huge_kib < 32 << 10
    assert argv == "['a', '--b=c']" and 're-running' not in stderr


@needs_madvise_mode
@pytest.mark.parametrize('cli, flag', [('main', '--workdir'), ('evaluate', '--checkpoint'),
                                       ('benchmark', '--model')])
def test_clis_rerun_with_huge_pages(cli, flag):
    result = subprocess.run([sys.executable, '-m', f'sequencer_jax.{cli}', '--help'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=_environ_without_tunables())
    assert flag in result.stdout, result.stderr  # the help, from the re-run process
    assert 're-running with GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in result.stderr
