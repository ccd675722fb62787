"""The ``femeta`` command line: train, evaluate and reproduce the paper's tables."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from femeta._fenics import MissingFenicsError
from femeta._io import write_atomic
from femeta.experiments import (
    EXPERIMENTS,
    Experiment,
    Option,
    get_experiment,
    resolve_device,
)
from femeta.experiments.base import TORCH
from femeta.parallel import launcher_place, share_cores, world
from femeta.training import EpochRecord, TrainResult
from femeta.workflow import (
    GENERIC_OPTIONS,
    TrainOptions,
    base_alpha,
    baseline_metasolver,
    evaluate_metasolver,
    load_checkpoint,
    load_metasolver,
    resume_training,
    train_metasolver,
)

app = typer.Typer(
    help="Learn per-instance parameters of iterative solvers (gradient-based meta-solving).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
reproduce_app = typer.Typer(
    help="Reproduce the paper's tables.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(reproduce_app, name="reproduce")

stderr = Console(stderr=True)


class UsageError(ValueError):
    """Bad command-line input."""


def friendly(command: Callable) -> Callable:
    """Turn the errors a user can fix into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, MissingFenicsError, OSError) as err:  # TOMLDecodeError is a ValueError
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def check_problem(problem: str) -> None:
    if problem not in EXPERIMENTS:
        raise UsageError(f"unknown problem {problem!r}; expected one of {sorted(EXPERIMENTS)}")


def read_config(path: Path | None) -> dict[str, Any]:
    """Options from a TOML file, keyed by long option name (``batch-size`` or ``batch_size``)."""
    if path is None:
        return {}
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    with path.open("rb") as stream:
        data = tomllib.load(stream)
    known = set(GENERIC_OPTIONS) | {o.name for e in EXPERIMENTS.values() for o in e.options}
    options = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown keys {unknown} in {path}; allowed: {sorted(known)}")
    return options


def show_progress() -> bool:
    return sys.stdout.isatty() and stderr.is_terminal


Problem = Annotated[str, typer.Argument(help="The task family: one of the registered problems.")]
Device = Annotated[
    str, typer.Option(help="Where to compute: auto (a CUDA GPU when there is one), cpu, cuda.")
]


def per_problem(value: Callable[[type[Experiment]], str]) -> str:
    """``value`` of each registered experiment, for help: ``poisson1d 25; elasticity 125``."""
    return "; ".join(f"{name} {value(experiment)}" for name, experiment in EXPERIMENTS.items())


def paper_settings(experiment: type[Experiment]) -> str:
    """``smooth 0, engine torch``: an experiment's :attr:`paper_options`, for help
    (and the paper's optimiser and network where a better set-up is known)."""
    settings = ", ".join(
        f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
        for name, value in experiment.paper_options.items()
    )
    if experiment.recommended_train is not None:
        settings += ", the paper's optimiser, schedule and network"
    return settings


def engines_help() -> str:
    return per_problem(lambda experiment: ", ".join(experiment.engines))


@app.command("train")
@friendly
def train_command(
    problem: Problem,
    out: Annotated[
        Path | None, typer.Option("--out", help="New run directory to write the model into.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the interrupted run in this directory (other options unused)."),
    ] = None,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="Checkpoint the training state at most this often.")
    ] = 10.0,
    loss: Annotated[
        str | None,
        typer.Option(help="'surrogate' (L~_eps, eq. 10) or 'm' (L_m). [default: surrogate]"),
    ] = None,
    m: Annotated[
        int | None,
        typer.Option(
            "--m",
            help="Iterations of L_m, or the cap of the surrogate's solve. [default: "
            f"{per_problem(lambda e: f'{e.train_defaults.m} / {e.shown_cap()}')}]",
        ),
    ] = None,
    tol: Annotated[
        float | None,
        typer.Option(
            help="Training tolerance eps of the surrogate. "
            f"[default: {per_problem(lambda e: f'{e.default_tol:g}')}]"
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Training epochs. "
            f"[default: {per_problem(lambda e: e.train_set_up(False).epochs)}]"
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the data and the weights. [default: 0]")
    ] = None,
    gain: Annotated[
        float | None,
        typer.Option(
            help="Sigmoid gain a of the surrogate (log space). "
            f"[default: {per_problem(lambda e: e.train_set_up(False).gain)}]"
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Tasks per step. "
            f"[default: {per_problem(lambda e: e.train_set_up(False).batch_size)}]"
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Adam learning rate. "
            f"[default: {per_problem(lambda e: f'{e.train_set_up(False).lr:g}')}]"
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="Run the training, validation and monitor solves with one of the problem's "
            f"engines ({engines_help()}); evaluation stays in torch. 'petsc' solves a KSP "
            "per task on the CPU, shared over the ranks of mpiexec, and needs a smoothed "
            "derivative. [default: the problem's best known]"
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            help="Which epoch's weights to keep: the lowest validation loss (the paper) or "
            "the fewest mean validation iterations (needs the monitor). [default: loss]"
        ),
    ] = None,
    paper: Annotated[
        bool,
        typer.Option(
            "--paper",
            help="Train with the paper's settings instead of the best known ones (where they "
            "differ: "
            f"{per_problem(paper_settings)}"
            "). An option given beside it that differs from the paper's is an error.",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(help="TOML file with any of these options; the command line wins."),
    ] = None,
    monitor: Annotated[
        bool,
        typer.Option(
            help="Also record the mean iterations on the validation tasks after each epoch "
            "(one more validation solve per epoch)."
        ),
    ] = True,
    device: Device = "auto",
    **problem_options: Any,
) -> None:
    """Train a meta-solver and save it to a run directory.

    Without options it trains with the problem's best known settings; --paper
    gives the paper's. An option of one problem only says so in its help.
    """
    check_problem(problem)
    if (out is None) == (resume is None):
        raise UsageError("give exactly one of --out NEW_RUN_DIR or --resume RUN_DIR")
    options = None
    if resume is None:
        given = {"loss": loss, "m": m, "tol": tol, "epochs": epochs, "seed": seed, "gain": gain,
                 "batch_size": batch_size, "lr": lr, "select": select, "engine": engine,
                 "paper": True if paper else None}  # fmt: skip
        given |= problem_options
        options = new_run_options(problem, given, config, out)
    run = functools.partial(run_training, problem, options, out, resume, checkpoint_seconds,
                            monitor, device)  # fmt: skip
    try:
        out, result = with_epoch_progress(run)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; continue with `femeta train {problem} --resume {out}`", err=True)
        raise typer.Exit(130) from None
    typer.echo(saved_message(out, result))


def new_run_options(
    problem: str, given: dict[str, Any], config: Path | None, out: Path
) -> TrainOptions:
    """The options of a new run: ``config``'s, overridden by those ``given`` (not ``None``)."""
    values = read_config(config) | {k: v for k, v in given.items() if v is not None}
    try:
        options = TrainOptions(problem=problem, **values)
    except TypeError as err:
        where = f" in {config}" if config is not None else ""
        raise UsageError(f"bad option value{where}: {err}") from None
    # Rank 0 looks, so that no rank sees a directory that another has begun to write.
    if world().bcast(out.exists() and any(out.iterdir()), root=0):
        raise UsageError(
            f"{out} exists and is not empty; choose a new --out directory, "
            f"or continue an interrupted run with --resume {out}"
        )
    return options


def run_training(
    problem: str, options: TrainOptions | None, out: Path | None, resume: Path | None,
    checkpoint_seconds: float, monitor: bool, device: str,
    on_epoch: Callable[[EpochRecord], None], set_total: Callable[[int], None],
) -> tuple[Path, TrainResult]:  # fmt: skip
    """Train a new run (``options``) into ``out``, or continue the run in ``resume``."""
    if options is not None:
        epochs = options.epochs
        set_total(EXPERIMENTS[problem].train_set_up(options.paper).epochs if epochs is None
                  else epochs)  # fmt: skip
        _, _, result = train_metasolver(options, out, on_epoch, checkpoint_seconds, monitor, device)
        return out, result
    _, _, result = resume_training(resume, problem, on_epoch, checkpoint_seconds, monitor, device)
    return resume, result


def with_epoch_progress(run: Callable[..., Any]) -> Any:
    """``run(on_epoch, set_total)`` under a progress bar over the epochs (on a terminal)."""
    progress = Progress(
        TextColumn("epoch {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn(
            "loss {task.fields[train]:.3g} validation {task.fields[validation]:.3g} "
            "iterations {task.fields[iterations]:.1f}"
        ),
        TimeRemainingColumn(),
        console=stderr,
        disable=not show_progress(),
    )
    with progress:
        bar = progress.add_task(
            "train", total=None, train=math.nan, validation=math.nan, iterations=math.nan
        )

        def advance(record: EpochRecord) -> None:
            iterations = record.validation_iterations
            progress.update(
                bar,
                completed=record.epoch,
                train=record.train_loss,
                validation=record.validation_loss,
                iterations=math.nan if iterations is None else iterations,
            )

        return run(advance, lambda total: progress.update(bar, total=total))


def saved_message(out: Path, result: TrainResult) -> str:
    """What ``femeta train`` says at the end: the epoch kept and its validation numbers."""
    kept = result.history[result.best_epoch - 1] if result.best_epoch > 0 else None
    if kept is not None and kept.validation_iterations is not None:
        iterations = f", {kept.validation_iterations:.6g} validation iterations"
    else:
        iterations = ""
    return (
        f"saved {out}: kept epoch {result.best_epoch} (validation loss "
        f"{result.best_validation_loss:.6g}{iterations}); {result.skipped_steps} steps skipped"
    )


@app.command("evaluate")
@friendly
def evaluate_command(
    problem: Problem,
    model: Annotated[
        Path | None, typer.Option(help="Run directory written by `femeta train`.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="The checkpoint.pt of an interrupted or running `femeta train --out "
            "RUN_DIR`: evaluates its best weights so far."
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Evaluate a baseline instead of a model: 'base' (Psi_base) or another of "
            f"the problem's ({per_problem(lambda e: ', '.join(e.baselines))}): 'best' is a "
            "per-task grid search (slow), 'petsc' PETSc's own default (docs/cli.md)."
        ),
    ] = None,
    tol: Annotated[
        float | None,
        typer.Option(
            help=f"Test tolerance eps. [default: {per_problem(lambda e: f'{e.default_tol:g}')}]"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the test tasks.")] = 0,
    max_iterations: Annotated[
        int | None, typer.Option(help="Iteration cap; unconverged tasks count as the cap.")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help=f"Solve with one of the problem's engines ({engines_help()}): 'petsc' is "
            "a KSP per task, shared over the ranks of mpiexec (Psi_best's 31 shifts several "
            "times faster than in torch). The counts differ only by rounding."
        ),
    ] = "torch",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
    device: Device = "auto",
    **task_options: Any,
) -> None:
    """Mean iterations to reach a tolerance on the test tasks (L_eps)."""
    check_problem(problem)
    check_evaluate_input(problem, model, checkpoint, baseline, tol, max_iterations)
    experiment, metasolver, progress = evaluated(
        problem, model, checkpoint, baseline, seed, device, task_options
    )
    tol = experiment.default_tol if tol is None else tol
    stats = evaluate_metasolver(experiment, metasolver, tol, seed, max_iterations, engine)
    task_p = getattr(experiment, "p", None)
    name = str(model or checkpoint or baseline)
    summary = {"problem": problem, "model": name, "p": task_p, "engine": engine}
    summary |= progress | stats.summary()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    where = problem if task_p is None else f"{problem} (p = {task_p})"
    if engine != TORCH:
        where += f" with the {engine} engine"
    if progress:
        name += (
            f" (best weights so far: epoch {progress['best_epoch']} of "
            f"{progress['epochs_done']} done)"
        )
    typer.echo(
        f"{name} on {where}, tol {tol:g}, cap {stats.max_iterations}: "
        f"{stats.mean_iterations:.2f} ± {stats.std_iterations:.2f} iterations, "
        f"convergence ratio {stats.convergence_ratio:.3f} over {summary['n_tasks']} tasks"
    )


def check_evaluate_input(
    problem: str, model: Path | None, checkpoint: Path | None, baseline: str | None,
    tol: float | None, max_iterations: int | None,
) -> None:  # fmt: skip
    kinds = EXPERIMENTS[problem].baselines
    if sum(given is not None for given in (model, checkpoint, baseline)) != 1:
        raise UsageError(
            "give exactly one of --model RUN_DIR, --checkpoint RUN_DIR/checkpoint.pt or "
            f"--baseline {{{','.join(kinds)}}}"
        )
    if baseline is not None and baseline not in kinds:
        raise UsageError(f"--baseline for {problem} must be one of {list(kinds)}, got {baseline!r}")
    if tol is not None and not (tol > 0 and tol < 1):
        raise UsageError(f"tolerance must lie in (0, 1), got {tol}")
    if max_iterations is not None and max_iterations < 1:
        raise UsageError(f"--max-iterations must be >= 1, got {max_iterations}")


def evaluated(
    problem: str, model: Path | None, checkpoint: Path | None, baseline: str | None, seed: int,
    device: str, task_options: dict[str, Any],
) -> tuple[Any, Any, dict[str, Any]]:  # fmt: skip
    """The experiment, the meta-solver to evaluate and, for a checkpoint, how far it came.

    ``task_options`` (``None``: not given) change the test tasks of the model's problem.
    """
    overrides = {name: value for name, value in task_options.items() if value is not None}
    if model is not None:
        return *load_metasolver(model, problem, device=device, **overrides), {}
    if checkpoint is not None:
        return load_checkpoint(checkpoint, problem, device, **overrides)
    experiment_class = EXPERIMENTS[problem]
    experiment_class.check_options(overrides)
    experiment = get_experiment(problem, **overrides, device=resolve_device(device))
    return experiment, baseline_metasolver(experiment, baseline, seed), {}


@app.command("solve")
@friendly
def solve_command(
    problem: Problem,
    model: Annotated[Path, typer.Option(help="Run directory written by `femeta train`.")],
    cells: Annotated[
        tuple[int, int, int],
        typer.Option(help="elasticity only: hexahedra along the length and across the section."),
    ] = (8, 2, 2),
    width: Annotated[
        float, typer.Option("--W", help="elasticity only: width and height W of the beam.")
    ] = 0.1,
    lam: Annotated[float, typer.Option("--lam", help="elasticity only: Lame's lambda.")] = 1.0,
    mu: Annotated[float, typer.Option("--mu", help="elasticity only: shear modulus mu.")] = 1.0,
    rho: Annotated[float, typer.Option("--rho", help="elasticity only: density rho.")] = 1.0,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", help="family only: a parameter of the task, NAME=VALUE (one per parameter)."
        ),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(help="family only: the family file, FILE.py:FUNCTION. [default: the model's]"),
    ] = None,
    tol: Annotated[float, typer.Option(help="Relative residual ||b - Ax|| / ||b||.")] = 1e-6,
    max_iterations: Annotated[
        int | None, typer.Option(help="Iteration cap of every solver. [default: 10 N]")
    ] = None,
    extrapolate: Annotated[
        bool, typer.Option(help="Apply the model outside the ranges it was trained on.")
    ] = False,
    with_gamg: Annotated[
        bool,
        typer.Option(
            "--gamg/--no-gamg", help="Also solve with GAMG (with the rigid-body modes for a beam)."
        ),
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
) -> None:
    """Assemble one task with DOLFINx (on all MPI ranks) and solve it with the model's
    shift (guarded), Psi_base's shift, PETSc's default ICC and GAMG."""
    scriptable = [name for name, experiment in EXPERIMENTS.items() if experiment.scriptable]
    if problem not in scriptable:
        raise UsageError(f"femeta solve assembles {scriptable} tasks only, not {problem!r}")
    if any(c < 1 for c in cells):
        raise UsageError(f"--cells must be three integers >= 1, got {' '.join(map(str, cells))}")
    if not 0 < tol < 1:
        raise UsageError(f"--tol must lie in (0, 1), got {tol}")
    if max_iterations is not None and max_iterations < 1:
        raise UsageError(f"--max-iterations must be >= 1, got {max_iterations}")
    import femeta
    from femeta._fenics import import_dolfinx

    loaded = femeta.load(model)
    if loaded.problem != problem:
        raise UsageError(f"{model} holds a model for {loaded.problem!r}, not {problem!r}")
    import_dolfinx()
    from mpi4py import MPI

    from femeta import comparison
    from femeta.fenics import configure

    comm = MPI.COMM_WORLD
    given = {"cells": cells, "W": width, "lambda_": lam, "mu": mu, "rho": rho,
             "param": param, "family": family}  # fmt: skip
    start = time.perf_counter()
    system = EXPERIMENTS[problem].script_system(comm, loaded, given)
    A, b = system.A, system.b
    assembly = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    n = A.getSize()[0]
    cap = 10 * n if max_iterations is None else max_iterations
    probe = _probe_ksp(A)
    alpha = configure(probe, loaded, extrapolate=extrapolate, **system.params).alpha
    probe.destroy()
    base = base_alpha(loaded)
    outcomes = [
        comparison.shifted_icc("femeta", A, b, alpha, tol, cap),
        comparison.shifted_icc("psi_base", A, b, base, tol, cap),
        comparison.default_icc(A, b, tol, cap),
    ]
    if with_gamg:
        outcomes.append(comparison.gamg(A, b, tol, cap, system.near_nullspace))
    summary = {
        "task": system.label, "unknowns": n, "ranks": comm.size, "tol": tol,
        "max_iterations": cap, "assembly_seconds": assembly,
        "params": {name.rstrip("_"): value for name, value in system.params.items()},
        "solvers": [outcome.as_dict() for outcome in outcomes],
    }  # fmt: skip
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"{system.label}, {n} unknowns on {comm.size} rank(s), "
        f"assembled in {assembly:.2f} s; CG to {tol:g} (cap {cap}):"
    )
    gamg = "GAMG" if system.near_nullspace is None else "GAMG + near-nullspace"
    labels = {"femeta": "learned alpha", "psi_base": "Psi_base alpha",
              "petsc_icc": "PETSc ICC default", "gamg": gamg}  # fmt: skip
    for outcome in outcomes:
        shift = "" if outcome.alpha is None else f" (alpha {outcome.alpha:.4g})"
        retried = f", {len(outcome.attempts)} attempts" if len(outcome.attempts) > 1 else ""
        typer.echo(
            f"  {labels[outcome.name] + shift:34s} {outcome.iterations:6d} iterations  "
            f"{outcome.seconds:8.3f} s  {outcome.reason}{retried}"
        )


def _probe_ksp(A: Any) -> Any:
    """A KSP on ``A`` only to predict the model's shift with (it may read norms of A)."""
    from petsc4py import PETSc

    ksp = PETSc.KSP().create(A.comm)
    ksp.setOperators(A)
    return ksp


RunEpochs = Annotated[int | None, typer.Option(help="Override the epochs of every run.")]
Jobs = Annotated[int, typer.Option(help="Rows computed in parallel (processes).")]
TableSeed = Annotated[int, typer.Option(help="Seed of data and weights.")]
TableJson = Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")]


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")


def row_labels(rows: str | None) -> list[str] | None:
    """The labels of ``--rows a,b,c``; ``None`` (every row) when not given."""
    return None if rows is None else [label.strip() for label in rows.split(",")]


def report_table(
    results: dict[str, Any], rich_table: Callable[[dict[str, Any]], Any], out: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Write ``OUT/results.json`` when asked, then print JSON or the rich table."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out) / "results.json", json.dumps(results, indent=1).encode())
    if as_json:
        typer.echo(json.dumps(results))
    else:
        Console().print(rich_table(results))
        if out is not None:
            typer.echo(f"wrote {out}/results.json")


def table_progress(as_json: bool) -> Progress:
    """A bar over the rows of a table, on stderr, only on a terminal and without --json."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rows"),
        TimeElapsedColumn(),
        console=stderr,
        disable=as_json or not show_progress(),
    )


@reproduce_app.command("table3")
@friendly
def table3_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="A reduced budget (minutes, not an hour).")
    ] = False,
    paper: Annotated[
        bool,
        typer.Option(
            "--paper",
            help="Train with the paper's literal set-up (2500 epochs; --quick 150) instead of "
            "femeta's default for poisson1d (700 epochs; --quick 50).",
        ),
    ] = False,
    both: Annotated[
        bool,
        typer.Option("--both", help="Train with both set-ups and show them side by side."),
    ] = False,
    epochs: RunEpochs = None,
    jobs: Jobs = 2,
    seed: TableSeed = 0,
    out: Annotated[
        Path | None, typer.Option(help="Directory for results.json and the figures.")
    ] = None,
    as_json: TableJson = False,
) -> None:
    """Table 3 / Figures 1-2: Jacobi initial guesses on 1D Poisson, L_m against L~_eps.

    By default every network trains with femeta's default set-up for poisson1d;
    --paper trains with the paper's, --both with each. The figures show the
    default set-up's runs when they were made.
    """
    from femeta import reproduce

    check_jobs(jobs)
    if paper and both:
        raise UsageError("give --paper or --both, not both")
    setups = reproduce.SETUPS if both else ("paper",) if paper else ("recommended",)
    budget = {
        setup: reproduce.epochs_budget("table3" if setup == "recommended" else "table3-paper",
                                       quick, epochs)
        for setup in setups
    }  # fmt: skip
    progress = table_progress(as_json)
    with progress:
        bar = progress.add_task("table 3", total=len(reproduce.table3_grid(setups)))
        results = reproduce.run_table3(budget, seed, jobs, lambda: progress.advance(bar))
    if out is not None:
        reproduce.save_table3(results, Path(out))
    if as_json:
        typer.echo(json.dumps(results))
    else:
        Console().print(reproduce.table3_rich(results))
        if out is not None:
            typer.echo(f"wrote {out}/results.json, {out}/figure1.png, {out}/figure2.png")


@reproduce_app.command("table2")
@friendly
def table2_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="5 epochs per training instead of 200.")
    ] = False,
    epochs: RunEpochs = None,
    max_iterations: Annotated[
        int | None,
        typer.Option(help="Cap M of the test solves and of the surrogate's training. [default: N]"),
    ] = None,
    rows: Annotated[
        str | None,
        typer.Option(help="Only these rows, comma-separated, e.g. base,best,eps=1e-06."),
    ] = None,
    smooth: Annotated[
        float | None,
        typer.Option(
            help="Train every row with the smoothed derivative of `femeta train elasticity "
            "--smooth` (not in the paper). [default: the exact derivative]"
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(help="With --smooth: 'petsc' runs the training solves in PETSc."),
    ] = "torch",
    ic_pattern: Annotated[
        str | None,
        typer.Option(
            help="IC(0)'s sparsity pattern in every row, 'stored' or 'values', as in "
            "`femeta train elasticity`. [default: stored]"
        ),
    ] = None,
    jobs: Jobs = 2,
    seed: TableSeed = 0,
    out: Annotated[Path | None, typer.Option(help="Directory for results.json.")] = None,
    as_json: TableJson = False,
) -> None:
    """Table 2: the ICCG shift on clamped beams, L_m against L~_eps, beside Psi_base/best."""
    from femeta import reproduce

    check_jobs(jobs)
    if max_iterations is not None and max_iterations < 1:
        raise UsageError(f"--max-iterations must be >= 1, got {max_iterations}")
    budget = reproduce.epochs_budget("table2", quick, epochs)
    labels = row_labels(rows)
    grid = reproduce.table2_grid(labels)
    progress = table_progress(as_json)
    with progress:
        bar = progress.add_task("table 2", total=len(grid))
        results = reproduce.run_table2(
            budget,
            seed,
            jobs,
            max_iterations,
            lambda: progress.advance(bar),
            labels,
            smooth,
            engine,
            ic_pattern,
        )
    report_table(results, reproduce.table2_rich, out, as_json)


@reproduce_app.command("table1")
@friendly
def table1_command(
    quick: Annotated[
        bool,
        typer.Option("--quick", help="3 epochs on 400 parameter sets, batch 1024 (minutes)."),
    ] = False,
    epochs: RunEpochs = None,
    sets: Annotated[
        int | None, typer.Option(help="Parameter sets. [default: 10000; --quick 400]")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate of every run. [default: 2e-5]")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Tasks per step of every run. [default: 16384; --quick 1024]"),
    ] = None,
    rows: Annotated[
        str | None,
        typer.Option(help="Only these rows, comma-separated, e.g. base,both/eps=1e-09."),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Rows computed in parallel (processes).")] = 1,
    seed: TableSeed = 0,
    out: Annotated[Path | None, typer.Option(help="Directory for results.json.")] = None,
    as_json: TableJson = False,
) -> None:
    """Table 1: Newton-SOR on Robertson steps, L_m against L~_eps, and which head to learn."""
    from femeta import reproduce

    check_jobs(jobs)
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr must be positive, got {lr}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    sets = (400 if quick else 10_000) if sets is None else sets
    batch_size = 1024 if quick and batch_size is None else batch_size
    budget = reproduce.epochs_budget("table1", quick, epochs)
    labels = row_labels(rows)
    grid = reproduce.table1_grid(labels)
    reproduce.check_table1(sets)  # before any worker starts
    progress = table_progress(as_json)
    with progress:
        bar = progress.add_task("table 1", total=len(grid))
        results = reproduce.run_table1(
            budget, seed, jobs, sets, lr, batch_size, lambda: progress.advance(bar), labels
        )
    report_table(results, reproduce.table1_rich, out, as_json)


@app.command("plot")
@friendly
def plot_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `femeta train`.")],
    tol: Annotated[
        float | None,
        typer.Option(help="Test tolerance of the histograms. [default: 1e-6; robertson 1e-9]"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the test tasks.")] = 0,
) -> None:
    """Write training.png (loss and learning rate) and iterations.png into RUN_DIR."""
    from femeta import plots
    from femeta.runs import read_history, run_problem

    if tol is not None and not (tol > 0 and tol < 1):
        raise UsageError(f"tolerance must lie in (0, 1), got {tol}")
    problem = run_problem(run_dir)
    experiment, metasolver = load_metasolver(run_dir, problem)
    tol = experiment.default_tol if tol is None else tol
    baseline = baseline_metasolver(experiment, "base", seed)
    iterations = {
        "Psi_base": evaluate_metasolver(experiment, baseline, tol, seed).iterations,
        f"Psi_nn ({run_dir.name})": evaluate_metasolver(
            experiment, metasolver, tol, seed
        ).iterations,
    }
    plots.plot_training(read_history(run_dir), run_dir / "training.png")
    plots.plot_iterations(iterations, tol, run_dir / "iterations.png")
    typer.echo(f"wrote {run_dir / 'training.png'} and {run_dir / 'iterations.png'}")


@app.command("info")
@friendly
def info_command() -> None:
    """Versions of femeta and its stack, the MPI size and the compute device."""
    import platform

    import torch

    import femeta
    from femeta._fenics import import_dolfinx

    lines = {
        "femeta": femeta.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        dolfinx = import_dolfinx()
        from mpi4py import MPI
        from petsc4py import PETSc

        lines["dolfinx"] = dolfinx.__version__
        lines["petsc"] = ".".join(str(part) for part in PETSc.Sys.getVersion())
        lines["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
        lines["mpi size"] = str(MPI.COMM_WORLD.size)
    except MissingFenicsError as err:
        lines["dolfinx"] = f"not available ({err})"
    for key, value in lines.items():
        typer.echo(f"{key:9s} {value}")


def problem_parameters(evaluate: bool) -> list[inspect.Parameter]:
    """A ``--flag`` per option that a registered experiment declares (``evaluate``: those
    that change a saved model's test tasks), its help saying which problems take it."""
    declared: dict[str, tuple[Option, list[str]]] = {}
    for experiment in EXPERIMENTS.values():
        for option in experiment.options:
            if not evaluate or option.evaluate is not None:
                declared.setdefault(option.name, (option, []))[1].append(experiment.name)
    parameters = []
    for name, (option, problems) in declared.items():
        if evaluate:
            text = f"{option.evaluate} [default: the model's, else {option.default_text}]"
        else:
            text = f"{option.help} [default: {option.default_text}]"
        help_text = f"{' and '.join(problems)} only: {text}"
        kind_of = option.type if option.count is None else tuple[(option.type,) * option.count]
        annotation = Annotated[kind_of | None, typer.Option(help=help_text)]
        kind = inspect.Parameter.KEYWORD_ONLY
        parameters.append(inspect.Parameter(name, kind, default=None, annotation=annotation))
    return parameters


def declare_problem_options() -> None:
    """Give ``train`` and ``evaluate`` the options of the experiments registered now."""
    for command, evaluate in ((train_command, False), (evaluate_command, True)):
        own = inspect.signature(command.__wrapped__, eval_str=True).parameters.values()
        fixed = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = inspect.Signature(fixed + problem_parameters(evaluate))


def main(argv: list[str] | None = None) -> None:
    """The ``femeta`` command, with the options of every experiment registered by now."""
    rank, size = launcher_place()
    if rank > 0:
        # Results are printed once, by rank 0; errors still reach every rank's stderr.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if size > 1:
        share_cores(size)
    declare_problem_options()
    app(args=argv)


declare_problem_options()
