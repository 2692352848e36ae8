"""One run per workdir, and processes that notice when a peer dies.

A file lock does not exist on buckets (``gs://``), so a run claims its workdir with a
lease: ``<workdir>/lease.json`` names the owner (run id, host, pid, SLURM job, start) and
when process 0 last renewed it. Every ``RENEW_EVERY_S`` a thread renews it and each
other process renews its heartbeat (``<workdir>/heartbeats/process-<i>.json``).

* A second trainer on a workdir whose lease was renewed within ``STALE_AFTER_S`` refuses,
  naming the owner; ``force_takeover`` takes it anyway (the owner, finding another run's
  lease at its next renewal, stops at the end of its step without saving). An older
  lease is taken over with a warning; so is, silently, one of the same SLURM job (the job
  requeued) or of a process of this host that no longer exists (killed, rerun at once).
* Process 0 watches the other processes' heartbeats, they watch the lease. When one has
  been silent for ``PEER_TIMEOUT_S`` (killed, its host lost), the others print which one
  and what to do within ``PEER_TIMEOUT_S + 2 * RENEW_EVERY_S`` (35 s) of its last
  heartbeat, and exit with status 1 at most ``2 * RENEW_EVERY_S`` later: before
  ``jax.distributed`` ends them in a C++ abort that names no process (60-80 s after a
  kill, measured).

The same thread ends a run that made no progress (no train step, no eval batch) for
``config.hang_timeout_s``, every thread's stack written next to the message.

Clocks of the hosts are compared: they should agree to a few seconds (NTP does that).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from sequencer_jax import storage
from sequencer_jax.errors import UserError, on_process_zero

LEASE_FILE = 'lease.json'
HEARTBEAT_DIR = 'heartbeats'
RENEW_EVERY_S = 5.0
STALE_AFTER_S = 120.0
PEER_TIMEOUT_S = 25.0


class WorkdirInUse(UserError):
    """Another live run holds the workdir's lease."""


def _now() -> float:
    return time.time()


def _read(path: epath.Path) -> dict | None:
    """A lease or heartbeat file's contents; None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: epath.Path, record: dict) -> None:
    """Writes ``record`` whole: a reader never sees half a file (a rename on local disks;
    a bucket's objects appear whole anyway)."""
    staged = path.parent / f'.{path.name}.{os.getpid()}'
    staged.write_text(json.dumps(record))
    staged.replace(path)


def describe(owner: dict) -> str:
    """'host h (pid 1, SLURM job 7), started 2026-12-02 10:00:00 UTC'."""
    job = f', SLURM job {owner["job"]}' if owner.get('job') else ''
    started = datetime.datetime.fromtimestamp(owner.get('started', 0), datetime.timezone.utc)
    return (f'host {owner.get("host", "?")} (pid {owner.get("pid", "?")}{job}), started '
            f'{started:%Y-%m-%d %H:%M:%S} UTC')


def _is_gone(owner: dict) -> bool:
    """Whether the owner was a process of this host that no longer exists (a run killed
    here and rerun at once need not wait for its lease to go stale)."""
    if owner.get('host') != socket.gethostname() or not isinstance(owner.get('pid'), int):
        return False
    try:
        os.kill(owner['pid'], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _shared_run_id() -> str:
    """A new run id, process 0's for every process."""
    raw = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    if jax.process_count() > 1:
        raw = np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)
    return raw.tobytes().hex()


class Lease:
    """Holds ``workdir`` for this run while in a ``with`` block (every process enters it).

    ``taken_over`` is set (on process 0) when another run has taken the lease; the
    training loop then stops without saving. ``exit`` (default ``os._exit``) ends a
    process whose peer died; tests replace it.
    """

    def __init__(self, workdir: epath.Path, force_takeover: bool = False,
                 hang_timeout_s: float | None = None,
                 exit: Callable[[int], None] = os._exit):
        self._workdir, self._force, self._exit = workdir, force_takeover, exit
        self._hang_timeout_s, self._progress = hang_timeout_s, time.monotonic()
        self._path = workdir / LEASE_FILE
        self._index, self._count = jax.process_index(), jax.process_count()
        self.taken_over: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_done, daemon=True,
                                        name='workdir-lease')

    def progressed(self) -> None:
        """The run made progress (a train step, an eval batch): not hung."""
        self._progress = time.monotonic()

    def __enter__(self) -> Lease:
        run = _shared_run_id()
        self._record = {'run': run, 'host': socket.gethostname(), 'pid': os.getpid(),
                        'job': os.environ.get('SLURM_JOB_ID'), 'started': _now(),
                        'processes': self._count}
        on_process_zero(self._claim, lambda: UserError(
            'Process 0 could not take the workdir (its output says why, e.g. the run that '
            'holds it); this process stops too.'))
        if self._index > 0:
            self._beat()
        self._thread.start()
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if self._count > 1 and error_type is not None and issubclass(
                error_type, jax.errors.JaxRuntimeError):
            # A collective failing is how a dead peer first shows: give the watchdog the
            # time to name it (it then ends the process) before the error goes on.
            self._done.wait(PEER_TIMEOUT_S + 2 * RENEW_EVERY_S)
        self._done.set()
        self._thread.join()
        if self._index == 0 and self.taken_over is None:
            current = _read(self._path)
            if current is not None and current.get('run') == self._record['run']:
                self._path.unlink(missing_ok=True)

    def _claim(self) -> None:
        """Process 0: takes the lease, or WorkdirInUse naming its live owner."""
        owner = _read(self._path)
        if owner is not None and not _is_gone(owner):
            age = _now() - owner.get('renewed', 0)
            same_job = owner.get('job') is not None and owner['job'] == self._record['job']
            if age < STALE_AFTER_S and not same_job and not self._force:
                raise WorkdirInUse(
                    f'The workdir {self._workdir} is in use by another run: {describe(owner)}, '
                    f'its lease renewed {age:.0f} s ago. Wait for it to end, train in another '
                    '--workdir, or, if it is surely gone (its host lost), take the workdir '
                    f'over with --force_takeover (a lease not renewed for {STALE_AFTER_S:.0f} '
                    's is taken over by itself).')
            if age < STALE_AFTER_S and self._force:
                print(f'Warning: taking the workdir over from a live run ({describe(owner)}); '
                      'it stops at the end of its current step without saving. Waiting '
                      f'{2 * RENEW_EVERY_S:.0f} s for it to notice.', flush=True)
                self._renew()
                time.sleep(2 * RENEW_EVERY_S)
            elif not same_job:
                print(f'Warning: taking the workdir over from a run that stopped renewing its '
                      f'lease {age:.0f} s ago ({describe(owner)}): presumed dead.', flush=True)
        self._renew()

    def _renew(self) -> None:
        _write(self._path, {**self._record, 'renewed': _now()})

    def _heartbeat_path(self, index: int) -> epath.Path:
        return self._workdir / HEARTBEAT_DIR / f'process-{index}.json'

    def _beat(self) -> None:
        path = self._heartbeat_path(self._index)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, {'run': self._record['run'], 'host': socket.gethostname(),
                      'pid': os.getpid(), 'renewed': _now()})

    def _renew_until_done(self) -> None:
        while not self._done.wait(RENEW_EVERY_S):
            idle = time.monotonic() - self._progress
            if self._hang_timeout_s is not None and idle > self._hang_timeout_s:
                self._hung(idle)
            try:
                if self._index == 0:
                    self._renew_lease_and_watch_peers()
                else:
                    self._beat()
                    self._watch_process_0()
            except OSError:
                continue  # a storage hiccup: the next renewal tries again

    def _renew_lease_and_watch_peers(self) -> None:
        current = _read(self._path)
        if current is not None and current.get('run') != self._record['run']:
            self.taken_over = describe(current)
            self._done.set()
            return
        self._renew()
        for index in range(1, self._count):
            beat = _read(self._heartbeat_path(index))
            if beat is None or beat.get('run') != self._record['run']:
                beat = {'renewed': self._record['started'], 'host': '?', 'pid': '?'}
            silent = _now() - beat['renewed']
            if silent > PEER_TIMEOUT_S:
                message = (f'Process {index} of {self._count} (host {beat["host"]}, pid '
                           f'{beat["pid"]}) has not been heard from for {silent:.0f} s: it '
                           'died or lost its host. Process 0 stops too.')
                _write(self._path, {**self._record, 'renewed': _now(), 'failed': message})
                # Process 0 hosts jax.distributed: the others read the verdict first.
                self._stop(message, linger=2 * RENEW_EVERY_S)

    def _watch_process_0(self) -> None:
        lease = _read(self._path)
        if lease is None or lease.get('run') != self._record['run']:
            return  # taken over or released: process 0 decides
        too = f'Process {self._index} stops too.'
        if lease.get('failed'):
            self._stop(lease['failed'].replace('Process 0 stops too.', too))
        silent = _now() - lease['renewed']
        if silent > PEER_TIMEOUT_S:
            self._stop(f'Process 0 of {self._count} (host {lease["host"]}, pid '
                       f'{lease["pid"]}) has not been heard from for {silent:.0f} s: it '
                       f'died or lost its host. {too}')

    def _hung(self, idle: float) -> None:
        """Ends a run that made no progress for ``hang_timeout_s``, keeping every thread's
        stack: where each process waits is what tells a hang's cause."""
        name = f'hang-process{self._index}.txt'
        path = (os.path.join(tempfile.gettempdir(), f'sequencer_jax-{os.getpid()}-{name}')
                if storage.is_bucket(self._workdir) else str(self._workdir / name))
        with open(path, 'w') as f:
            faulthandler.dump_traceback(f, all_threads=True)
        self._stop(f'No train step or eval batch finished for {idle:.0f} s (config.'
                   f'hang_timeout_s={self._hang_timeout_s:g}): the run is hung. Every '
                   f"thread's stack is in {path}.")

    def _stop(self, message: str, linger: float = 0.0) -> None:
        rerun = 'every process' if self._count > 1 else 'it'
        print(f'error: {message} Rerun {rerun} with the same command to resume from the '
              'newest checkpoint.', file=sys.stderr, flush=True)
        sys.stdout.flush()
        time.sleep(linger)
        if self._index == 0:  # the run ends: a rerun need not wait for the lease to go stale
            self._path.unlink(missing_ok=True)
        self._exit(1)  # os._exit: jax.distributed's shutdown would wait for the dead peer
        self._done.set()  # only where exit returns (tests)
