"""What a training run reports: metrics.jsonl and TensorBoard, a progress bar or lines, and
the time its steps take (evaluations and checkpoints left out)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from typing import Callable, Iterator

import jax
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'  # also holds profiler traces


class MetricWriter:
    """metrics.jsonl and TensorBoard events; writes on process 0 only.

    A run resumed at ``start_step`` first drops the lines of later steps: a run that
    died between checkpoints logged them, and they are about to be logged again. A write
    that fails (a full disk, a bucket's error) is reported and training goes on: the
    checkpoints hold the work, and a checkpoint that cannot be written stops the run.
    """

    def __init__(self, workdir: epath.Path, start_step: int = 0):
        self._active = jax.process_index() == 0
        if self._active:
            metrics_file = workdir / METRICS_FILE
            if metrics_file.exists():
                lines = metrics_file.read_text().splitlines(keepends=True)
                kept = [line for line in lines if _logged_step(line) <= start_step]
                if len(kept) < len(lines):
                    metrics_file.write_text(''.join(kept))
            self._jsonl_path = str(metrics_file)
            self._jsonl = metrics_file.open('a')
            self._tb_dir = str(workdir / TENSORBOARD_DIR)
            self._tb: EventFileWriter | None = None  # opened at the first write
            self._failing: set[str] = set()  # where the last write failed

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """One line of ``metrics`` for ``step``; nothing when there are none."""
        if not self._active or not metrics:
            return

        def jsonl():
            self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
            self._jsonl.flush()

        def events():
            # TensorBoard's own writer: no TensorFlow needed (through it, gs:// when
            # TensorFlow is installed). Its thread dies with a failed write, so a failure
            # drops it and the next write starts a new events file.
            if self._tb is None:
                self._tb = EventFileWriter(self._tb_dir)
            values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                      for k, v in metrics.items()]
            try:
                self._tb.add_event(event_pb2.Event(step=step, wall_time=time.time(),
                                                   summary=summary_pb2.Summary(value=values)))
                self._tb.flush()
            except BaseException:
                self._tb = None
                raise

        self._attempt(jsonl, f'the metrics of step {step}', self._jsonl_path)
        self._attempt(events, f'the TensorBoard events of step {step}', self._tb_dir)

    def close(self) -> None:
        if self._active:
            self._attempt(self._jsonl.close, 'the last metrics', self._jsonl_path)
            if self._tb is not None:
                self._attempt(self._tb.close, 'the last TensorBoard events', self._tb_dir)

    def _attempt(self, write: Callable[[], None], what: str, where: str) -> None:
        """Runs ``write``; reports its failure, once while writes to ``where`` go on
        failing (a full disk fails every log step)."""
        try:
            write()
        except _write_errors() as e:
            if where not in self._failing:
                self._failing.add(where)
                cause = str(e).splitlines()[0] if str(e) else type(e).__name__
                cause = re.sub(r'^\{\{function_node [^}]*\}\}\s*', '', cause)  # TF's prefix
                print(f'Warning: could not write {what} to {where} ({cause}). Training goes '
                      'on (a checkpoint that cannot be written stops it); further failures '
                      'to write there are not reported until one succeeds.', flush=True)
            return
        self._failing.discard(where)


def _write_errors() -> tuple[type[Exception], ...]:
    """What a failed write raises: OSError for local files, and TensorFlow's OpError where
    TensorFlow is in use (its gfile serves gs:// to TensorBoard's writer)."""
    tf = sys.modules.get('tensorflow')
    return (OSError, tf.errors.OpError) if tf is not None else (OSError,)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (a crash mid-write) counts as
    after every step, so that it is dropped."""
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
        return math.inf


class Progress:
    """A tqdm bar with ETA on a terminal (``mode`` 'bar', or 'auto' on a tty); plain
    lines at each logged step otherwise. Process 0 only."""

    SHOWN_ON_BAR = ('train/loss', 'train/top1', 'train/pixel_acc', 'eval/top1', 'eval/miou')

    def __init__(self, mode: str, start: int, total: int):
        self._active = jax.process_index() == 0
        self._bar = None
        self._total = total
        self._start_time, self._start_step = time.perf_counter(), start
        if self._active and (mode == 'bar' or (mode == 'auto' and sys.stdout.isatty())):
            from tqdm import tqdm  # a terminal's bar only
            self._bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if metrics:
                self._bar.set_postfix({k.split('/')[-1]: f'{v:.4g}' for k, v in metrics.items()
                                       if k in self.SHOWN_ON_BAR})
        elif metrics:
            done = step - self._start_step
            elapsed = time.perf_counter() - self._start_time
            eta = elapsed / max(done, 1) * (self._total - step)
            shown = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
            print(f'step {step}/{self._total} ({100 * step / self._total:.1f}%) {shown} '
                  f'eta {time.strftime("%H:%M:%S", time.gmtime(eta))}', flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class StepTimer:
    """The time spent training since the last ``lap``: evaluations and checkpoint saves
    (``paused``) left out, so that images/s measures the steps alone, and how much of it
    went to waiting for the next batch (``waiting_for_input``)."""

    def __init__(self):
        self._start = time.perf_counter()
        self._paused = self._waiting = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    @contextlib.contextmanager
    def waiting_for_input(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._waiting += time.perf_counter() - start

    def lap(self) -> tuple[float, float]:
        """(seconds trained since the last lap, the share of them spent waiting for
        input); the next lap starts now."""
        now = time.perf_counter()
        seconds = max(now - self._start - self._paused, 1e-9)
        waiting = self._waiting / seconds
        self._start, self._paused, self._waiting = now, 0.0, 0.0
        return seconds, waiting
