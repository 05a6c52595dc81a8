"""Progress of training as a user sees it, in the terminal of the process that runs ``kdray``.

The loop knows one small interface, ``Progress``: ``update(...)`` every few steps and
``epoch_done(metrics)`` once per epoch, on rank 0 only. Where the events go:

- ``workers: 0`` (the loop runs in this process): straight to a ``Renderer`` on this process's stderr;
- Ray Train workers: to a ``ProgressHub``, a small named Ray actor that the driver creates for the run
  (``hub(job)``); a thread of the driver drains it twice a second and renders there, so the driver's
  terminal shows the workers' progress (nothing is printed by the workers themselves).

A ``Renderer`` draws a live rich bar (steps done/total, samples/s, running loss, ETA) when its stream
is an interactive terminal, and otherwise writes one plain line per epoch, without ANSI codes (CI,
Prefect, Kubernetes logs). Every number in those lines has one format (``number``).

The same renderer draws two other kinds of line:

- a task of driver-side work (a teacher cache, a data import): ``meter(log)`` is a ``kdray.core.meter.Meter``
  whose tasks go to the renderer of this process's display or hub, to a parent process's hub through Ray,
  or to a live bar of their own on a terminal; without a terminal, plain lines through ``log`` (at the
  start, at most every 10 s, at the end);
- a remote job's state while a launcher waits (``StateWatch``): a line on each change with the time
  since the wait began, and on a terminal a spinner line with the state and the elapsed time.

``display()`` makes one renderer the process's shared one while a command runs (``kdray submit`` follows
several jobs at once, and rich allows one live display per process). Colours follow rich's rules:
none without a terminal, none with ``NO_COLOR`` set.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from typing import IO, Any, Iterator, Protocol

from rich.console import Console, RenderableType
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.progress import Task as RichTask
from rich.table import Table
from rich.text import Text

from kdray.core.meter import Log, LogTask, Meter, Task, duration, number, short_time, task_line

# what the per-epoch line shows, in this order, under these names
EPOCH_FIELDS = {
    "train_loss": "train_loss",
    "train_acc": "train_acc",
    "val_loss": "val_loss",
    "val_acc": "val_acc",
    "samples_per_s": "samples/s",
}
HUB_NAMESPACE = "kdray"


def epoch_line(title: str, metrics: dict[str, Any], epochs: int | None = None) -> str:
    """``[pipeline/stage] epoch 2/3  train_loss 0.4213  val_acc 0.8125  samples/s 1,234  s 3.2``.

    A metric that is None is left out: an adapt stage's ``train_acc`` is None because its batches mix
    labelled source rows with unlabelled target rows, so no accuracy over them would mean anything."""
    epoch = metrics.get("epoch", "?")
    head = f"[{title}] epoch {epoch}" + (f"/{epochs}" if epochs else "")
    parts = [f"{name} {number(metrics[k])}" for k, name in EPOCH_FIELDS.items() if metrics.get(k) is not None]
    if isinstance(metrics.get("epoch_seconds"), (int, float)):
        parts.append(short_time(metrics["epoch_seconds"]))
    return "  ".join([head, *parts])


class Sink(Protocol):
    def update(self, title: str, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None: ...

    def epoch_done(self, title: str, epochs: int, metrics: dict[str, Any]) -> None: ...


class _Line(ProgressColumn):
    """A whole line per task, laid out on its own (a table's columns would line up the rows, and one long
    title would squeeze every other row's bar): ``count`` lines (training steps, cache rows) show a bar,
    the count, a text and the ETA; ``state`` lines (a remote job) a spinner, the text and the time."""

    def __init__(self) -> None:
        super().__init__()
        self.spinner, self.bar, self.count = SpinnerColumn(), BarColumn(bar_width=30), MofNCompleteColumn()
        self.eta, self.elapsed = TimeRemainingColumn(), TimeElapsedColumn()

    def render(self, task: RichTask) -> RenderableType:
        title, info = Text(task.description, style="bold"), Text(task.fields.get("info", ""))
        cells: list[RenderableType]
        if task.fields.get("kind") == "state":
            cells = [self.spinner(task), title, info, self.elapsed(task)]
        else:
            cells = [title, self.bar(task), self.count(task), info, self.eta(task)]
        line = Table.grid(padding=(0, 1))
        for _ in cells:
            line.add_column(no_wrap=True)
        line.add_row(*cells)
        return line


def interactive(stream: IO[str]) -> bool:
    """Whether ``stream`` gets a live display: an interactive terminal (not ``TERM=dumb``)."""
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except ValueError:  # a closed stream
        return False


class Renderer:
    """Draws progress events on a stream: a live bar on a terminal, one plain line per epoch otherwise."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None, every_s: float = 10.0):
        self.stream = stream if stream is not None else sys.stderr
        self.live = interactive(self.stream) if live is None else live
        self.every_s = every_s  # without a live bar, a task's line at most this often
        self._bar: RichProgress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._printed: dict[str, float] = {}  # task title -> when its last plain line was written
        self._lock = threading.Lock()

    def _progress(self) -> RichProgress:
        if self._bar is None:
            console = Console(file=self.stream, force_terminal=True, stderr=self.stream is sys.stderr)
            self._bar = RichProgress(
                _Line(),
                console=console,
                transient=True,
                refresh_per_second=4,
                redirect_stdout=False,
                redirect_stderr=self.stream is sys.stderr,  # other stderr lines print above the bar
            )
            try:
                self._bar.start()
            except LiveError:  # another live display of this process (not kdray's): plain lines instead
                self._bar, self.live = None, False
                raise
        return self._bar

    def _live_bar(self) -> RichProgress | None:
        """The live bar, started on first use; None without a terminal or when another display holds it."""
        if not self.live:
            return None
        try:
            return self._progress()
        except LiveError:
            return None

    def update(self, title: str, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None:
        with self._lock:
            bar = self._live_bar()
            if bar is None:
                return
            desc = f"{title} epoch {epoch + 1}/{epochs}"
            task = self._tasks.get(title)
            fresh = task is None or _task(bar, task).description != desc
            if task is None:
                task = self._tasks[title] = bar.add_task(desc, total=total, kind="count", info="")
            elif fresh:  # a new epoch: restart the bar and its ETA
                bar.reset(task, total=total, description=desc)
            info = f"steps  loss {number(float(loss))}  {number(float(rate))} samples/s  ETA"
            bar.update(task, completed=done, info=info)
            if fresh:
                bar.refresh()  # shown at once, even if the epoch is over before the next refresh

    def epoch_done(self, title: str, epochs: int, metrics: dict[str, Any]) -> None:
        line = epoch_line(title, metrics, epochs)
        with self._lock:
            if self.live and self._bar is not None:
                task = self._tasks.get(title)
                if task is not None and epochs and metrics.get("epoch") == epochs:  # the stage's bar is done
                    self._bar.remove_task(self._tasks.pop(title))
                elif task is not None:  # the epoch's last steps came after the last update
                    self._bar.update(task, completed=_task(self._bar, task).total)
                self._bar.console.print(line, markup=False, highlight=False)  # above the live bar
            else:
                print(line, file=self.stream, flush=True)

    def task(self, title: str, done: int, total: int, unit: str, seconds: float, note: str = "") -> None:
        """A task of driver-side work (``kdray.core.meter``): a bar with rows/s and ETA on a terminal;
        otherwise a plain line when it starts and at most every ``every_s`` seconds."""
        with self._lock:
            if self.live:
                try:
                    bar = self._progress()
                except LiveError:
                    pass
                else:
                    rate = number(done / seconds) if done and seconds > 0 else "-"
                    info = f"{unit}  {rate} {unit}/s" + (f"  {note}" if note else "") + "  ETA"
                    task = self._tasks.get(title)
                    if task is None:
                        task = self._tasks[title] = bar.add_task(title, total=total, kind="count", info=info)
                        bar.refresh()
                    bar.update(task, total=total, completed=done, info=info)
                    return
            now = time.monotonic()
            if title not in self._printed or now - self._printed[title] >= self.every_s:
                self._printed[title] = now
                print(task_line(title, done, total, unit, seconds, note), file=self.stream, flush=True)

    def task_done(self, title: str, line: str) -> None:
        """The task's final line (above a live bar), and its bar gone."""
        with self._lock:
            self._printed.pop(title, None)
            if self.live and self._bar is not None:
                if title in self._tasks:
                    self._bar.remove_task(self._tasks.pop(title))
                self._bar.console.print(line, markup=False, highlight=False)
            else:
                print(line, file=self.stream, flush=True)

    def state(self, title: str, state: str) -> None:
        """A remote job's spinner line (live only: without a terminal the launcher logs each change)."""
        with self._lock:
            bar = self._live_bar()
            if bar is None:
                return
            task = self._tasks.get(title)
            if task is None:
                self._tasks[title] = bar.add_task(title, total=None, kind="state", info=state)
            else:
                bar.update(task, info=state)
            bar.refresh()  # a new state is shown at once

    def state_done(self, title: str) -> None:
        with self._lock:
            if self._bar is not None and title in self._tasks:
                self._bar.remove_task(self._tasks.pop(title))

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None
                self._tasks.clear()


def _task(bar: RichProgress, task: TaskID) -> Any:
    return next(t for t in bar.tasks if t.id == task)


class Progress:
    """What the training loop calls (rank 0 only; other ranks pass ``enabled=False``)."""

    def __init__(self, enabled: bool, title: str, epochs: int = 0, sink: Sink | None = None):
        self.enabled = enabled
        self.title = title
        self.epochs = epochs
        self.sink: Sink | None = (sink or Renderer()) if enabled else None

    def update(self, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None:
        if self.sink is not None:
            self.epochs = epochs
            self.sink.update(self.title, epoch, epochs, done, total, loss, rate)

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.epoch_done(self.title, self.epochs, metrics)

    def close(self) -> None:
        """End a live bar this progress drew itself (a hub's renderer is closed by the hub)."""
        if isinstance(self.sink, Renderer) and self.sink not in _active:
            self.sink.close()


# --------------------------------------------------------------------------- through Ray


class ProgressHub:
    """A named Ray actor holding rank 0's progress events until the driver drains them."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def push(self, event: tuple[Any, ...]) -> None:
        last = self.events[-1] if self.events else None
        if event[0] == "update" and last is not None and last[0] == "update":
            self.events[-1] = event  # only the newest bar position matters
        elif event[0] == "task" and last is not None and last[:2] == event[:2]:
            self.events[-1] = event  # the same for a task's count
        else:
            self.events.append(event)

    def drain(self) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        return events


class HubSink:
    """A rank-0 sink that sends events to the driver's hub (fire and forget: progress never blocks training)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def update(self, title: str, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None:
        self.actor.push.remote(("update", title, epoch, epochs, done, total, float(loss), float(rate)))

    def epoch_done(self, title: str, epochs: int, metrics: dict[str, Any]) -> None:
        import ray

        try:  # waited for (once an epoch), so the line is there before the driver's fit() returns
            ray.get(self.actor.push.remote(("epoch", title, epochs, dict(metrics))), timeout=10)
        except Exception:  # best effort: the driver may be gone
            pass

    def task(self, title: str, done: int, total: int, unit: str, seconds: float, note: str = "") -> None:
        self.actor.push.remote(("task", title, done, total, unit, float(seconds), note))

    def task_done(self, title: str, line: str) -> None:
        import ray

        try:  # waited for, so the line comes before what the stage logs next
            ray.get(self.actor.push.remote(("task_done", title, line)), timeout=10)
        except Exception:  # best effort: the driver may be gone
            pass


def worker_progress(hub: str | None, rank: int, title: str) -> Progress:
    """The loop's progress on a Ray Train worker: to the driver's hub, or plain lines when there is none."""
    if rank != 0:
        return Progress(False, title)
    import ray

    try:
        actor = ray.get_actor(hub, namespace=HUB_NAMESPACE) if hub else None
    except ValueError:  # the hub is gone (its driver stopped)
        actor = None
    return Progress(True, title, sink=HubSink(actor) if actor is not None else Renderer(live=False))


def local_progress(title: str) -> Progress:
    """The loop's progress in this process (``workers: 0``): the renderer of a hub this process runs, if any."""
    return Progress(True, title, sink=_active[-1] if _active else Renderer())


def replay(renderer: Renderer, events: list[tuple[Any, ...]]) -> None:
    for e in events:
        if e[0] == "update":
            renderer.update(*e[1:])
        elif e[0] == "epoch":
            renderer.epoch_done(*e[1:])
        elif e[0] == "task":
            renderer.task(*e[1:])
        elif e[0] == "task_done":
            renderer.task_done(*e[1:])


_active: list[Renderer] = []  # the renderers of the hubs this process runs
HUB_ENV = "KDRAY_PROGRESS_HUB"  # the hub of the process that started this one (children inherit it)


def existing_hub() -> str | None:
    """The name of a live hub run by this process or a parent process (``$KDRAY_PROGRESS_HUB``)."""
    import ray

    name = os.environ.get(HUB_ENV)
    if not name:
        return None
    try:
        ray.get_actor(name, namespace=HUB_NAMESPACE)
    except ValueError:
        return None
    return name


@contextlib.contextmanager
def hub(renderer: Renderer | None = None, every_s: float = 0.5) -> Iterator[str]:
    """A hub actor for Ray Train workers and a thread rendering what they send, while the block runs;
    yields the hub's name (also in ``$KDRAY_PROGRESS_HUB`` for the child processes started meanwhile).
    Needs Ray to be initialised."""
    import ray

    renderer = renderer or Renderer()
    name = f"kdray-progress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    actor: Any = ray.remote(ProgressHub).options(name=name, namespace=HUB_NAMESPACE, num_cpus=0).remote()
    stop = threading.Event()

    def pump() -> None:
        while True:
            stopping = stop.wait(every_s)
            try:
                replay(renderer, ray.get(actor.drain.remote(), timeout=10))
            except Exception:  # progress is best effort: a slow or gone hub must not end the fit
                pass
            if stopping:
                return

    thread = threading.Thread(target=pump, name="kdray-progress", daemon=True)
    thread.start()
    saved = os.environ.get(HUB_ENV)
    os.environ[HUB_ENV] = name
    _active.append(renderer)
    try:
        yield name
    finally:
        _active.remove(renderer)
        if saved is None:
            os.environ.pop(HUB_ENV, None)
        else:
            os.environ[HUB_ENV] = saved
        stop.set()
        thread.join(timeout=15)
        renderer.close()
        with contextlib.suppress(Exception):
            ray.kill(actor)


# --------------------------------------------------------------------------- tasks, job states, one display


@contextlib.contextmanager
def display(renderer: Renderer | None = None) -> Iterator[Renderer]:
    """One renderer for everything this process shows while the block runs (tasks, job states, the
    loop's bars): rich allows one live display per process, and a command may follow several jobs."""
    renderer = renderer or Renderer()
    _active.append(renderer)
    try:
        yield renderer
    finally:
        _active.remove(renderer)
        renderer.close()


class TaskSink(Protocol):
    def task(self, title: str, done: int, total: int, unit: str, seconds: float, note: str = "") -> None: ...

    def task_done(self, title: str, line: str) -> None: ...


class LiveTask:
    """A ``kdray.core.meter.Task`` drawn by a renderer, here or through a hub (at most ``every_s`` apart)."""

    every_s = 0.25

    def __init__(self, sink: TaskSink, title: str, total: int, unit: str, own: Renderer | None = None):
        self.sink, self.title, self.total, self.unit, self.own = sink, title, total, unit, own
        self.done, self.note, self.closed = 0, "", False
        self.t0 = time.monotonic()
        self.last = -self.every_s
        self.update(0)

    def update(self, done: int, note: str = "") -> None:
        self.done, self.note = done, note or self.note
        now = time.monotonic()
        if now - self.last >= self.every_s and not self.closed:
            self.last = now
            self.sink.task(self.title, done, self.total, self.unit, now - self.t0, self.note)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.monotonic() - self.t0
        self.sink.task_done(
            self.title, task_line(self.title, self.done, self.total, self.unit, seconds, self.note, True)
        )
        if self.own is not None:
            self.own.close()


def _parent_hub() -> Any:
    """The actor of a parent process's hub (``$KDRAY_PROGRESS_HUB``), if this process is connected to Ray."""
    if not os.environ.get(HUB_ENV) or "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    name = existing_hub()
    return ray.get_actor(name, namespace=HUB_NAMESPACE) if name else None


def meter(log: Log | None = None) -> Meter:
    """Tasks of driver-side work, shown where this process shows progress: the renderer of a display or
    hub this process runs, else a parent process's hub (through Ray), else a live bar of their own on a
    terminal, else plain lines through ``log`` (at the start, at most every 10 s, at the end)."""

    def make(title: str, total: int, unit: str) -> Task:
        if _active:
            return LiveTask(_active[-1], title, total, unit)
        try:
            actor = _parent_hub()
        except Exception:  # progress is best effort
            actor = None
        if actor is not None:
            return LiveTask(HubSink(actor), title, total, unit)
        own = Renderer()
        if own.live:
            return LiveTask(own, title, total, unit, own=own)
        return LogTask(log or (lambda line: print(line, file=sys.stderr, flush=True)), title, total, unit)

    return make


class StateWatch:
    """A remote job's state while a launcher waits for it: on each change a line through ``log`` with
    the time since the wait began (``[p] Ray job X: RUNNING after 0:04``), and on a terminal a spinner
    line with the state and the elapsed time, redrawn by rich between the launcher's polls."""

    def __init__(self, title: str, log: Log, renderer: Renderer | None = None):
        self.title, self.log = title, log
        self.own = renderer is None and not _active
        self.renderer = renderer or (_active[-1] if _active else Renderer())
        self.t0 = time.monotonic()
        self.last: str | None = None

    def state(self, state: str) -> None:
        if state != self.last:
            self.last = state
            self.log(f"{self.title}: {state} after {duration(time.monotonic() - self.t0)}")
        self.renderer.state(self.title, state)

    def close(self) -> None:
        self.renderer.state_done(self.title)
        if self.own:
            self.renderer.close()

    def __enter__(self) -> StateWatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
