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
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import uuid
from typing import IO, Any, Iterator, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

# what the per-epoch line shows, in this order, under these names
EPOCH_FIELDS = {
    "train_loss": "train_loss",
    "train_acc": "train_acc",
    "val_loss": "val_loss",
    "val_acc": "val_acc",
    "samples_per_s": "samples/s",
}
HUB_NAMESPACE = "kdray"


def number(v: Any) -> str:
    """The one number format of kdray's logs: ``12,345`` for counts and large values, ``0.8125`` for
    fractions and losses, ``993`` rather than ``993.1`` beside ``25,250`` (no exponent notation)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.4f}"


def epoch_line(title: str, metrics: dict[str, Any], epochs: int | None = None) -> str:
    """``[pipeline/stage] epoch 2/3  train_loss 0.4213  val_acc 0.8125  samples/s 1,234  s 3.2``.

    A metric that is None is left out: an adapt stage's ``train_acc`` is None because its batches mix
    labelled source rows with unlabelled target rows, so no accuracy over them would mean anything."""
    epoch = metrics.get("epoch", "?")
    head = f"[{title}] epoch {epoch}" + (f"/{epochs}" if epochs else "")
    parts = [f"{name} {number(metrics[k])}" for k, name in EPOCH_FIELDS.items() if metrics.get(k) is not None]
    if isinstance(metrics.get("epoch_seconds"), (int, float)):
        parts.append(f"{metrics['epoch_seconds']:.1f}s")
    return "  ".join([head, *parts])


class Sink(Protocol):
    def update(self, title: str, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None: ...

    def epoch_done(self, title: str, epochs: int, metrics: dict[str, Any]) -> None: ...


class Renderer:
    """Draws progress events on a stream: a live bar on a terminal, one plain line per epoch otherwise."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(self.stream.isatty()) if live is None else live
        self._bar: RichProgress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def _progress(self) -> RichProgress:
        if self._bar is None:
            console = Console(file=self.stream, force_terminal=True, stderr=self.stream is sys.stderr)
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps  loss {task.fields[loss]}  {task.fields[rate]} samples/s  ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
                refresh_per_second=4,
                redirect_stdout=False,
                redirect_stderr=self.stream is sys.stderr,  # other stderr lines print above the bar
            )
            self._bar.start()
        return self._bar

    def update(self, title: str, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None:
        if not self.live:
            return
        with self._lock:
            bar = self._progress()
            desc = f"{title} epoch {epoch + 1}/{epochs}"
            task = self._tasks.get(title)
            fresh = task is None or _task(bar, task).description != desc
            if task is None:
                task = self._tasks[title] = bar.add_task(desc, total=total, loss="-", rate="-")
            elif fresh:  # a new epoch: restart the bar and its ETA
                bar.reset(task, total=total, description=desc)
            bar.update(task, completed=done, loss=number(float(loss)), rate=number(float(rate)))
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
        if event[0] == "update" and self.events and self.events[-1][0] == "update":
            self.events[-1] = event  # only the newest bar position matters
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
