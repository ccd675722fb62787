"""The ``femeta`` command line: train, evaluate and reproduce the paper's tables."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from femeta._fenics import MissingFenicsError
from femeta._io import write_atomic
from femeta.experiments import EXPERIMENTS, available_cores, get_experiment, resolve_device
from femeta.training import EpochRecord
from femeta.workflow import (
    TrainOptions,
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
    known = {f.name for f in fields(TrainOptions)} - {"problem"}
    options = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown keys {unknown} in {path}; allowed: {sorted(known)}")
    return options


def show_progress() -> bool:
    return sys.stdout.isatty() and stderr.is_terminal


Problem = Annotated[str, typer.Argument(help=f"The task family: one of {sorted(EXPERIMENTS)}.")]
Device = Annotated[
    str, typer.Option(help="Where to compute: auto (a CUDA GPU when there is one), cpu, cuda.")
]


@app.command("train")
@friendly
def train_command(
    problem: Problem,
    out: Annotated[
        Path | None, typer.Option("--out", help="New run directory to write the model into.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the interrupted run in this directory (other options unused, "
            "but --workers)."
        ),
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
            help="Iterations of L_m, or the cap of the surrogate's solve. "
            "[default: poisson1d 25 / 1000; elasticity 125 / N; robertson 5 / 2000]",
        ),
    ] = None,
    tol: Annotated[
        float | None,
        typer.Option(
            help="Training tolerance eps of the surrogate. [default: 1e-6; robertson 1e-9]"
        ),
    ] = None,
    p: Annotated[
        float | None,
        typer.Option(help="poisson1d only: weight of the hard distribution P1. [default: 0]"),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            help="robertson only: what the network predicts: 'ini' (initial guess), "
            "'relax' (relaxation factor) or 'both'. [default: both]"
        ),
    ] = None,
    guess_init: Annotated[
        str | None,
        typer.Option(
            help="robertson only: 'zero' starts the initial-guess head at y_n (not in the "
            "paper); 'default' keeps PyTorch's random start. [default: zero]"
        ),
    ] = None,
    sets: Annotated[
        int | None,
        typer.Option(
            help="robertson only: parameter sets (c1, c2, c3), split "
            "1/4 train, 1/4 validation, 1/2 test. [default: 10000]"
        ),
    ] = None,
    ic_pattern: Annotated[
        str | None,
        typer.Option(
            help="elasticity only: the sparsity pattern IC(0) keeps: 'stored', the entries "
            "DOLFINx's matrix stores, as PETSc's ICC keeps them in a FEniCS script; 'values', "
            "the nonzeros of each A, where the shift at which IC(0) fails depends on which "
            "stored entries cancelled to exact zeros in the assembly. [default: stored]"
        ),
    ] = None,
    inputs: Annotated[
        str | None,
        typer.Option(
            help="elasticity only: what the network sees: 'invariant', only W and "
            "lambda/mu, the two numbers ICCG(alpha) depends on (not in the paper); 'paper', "
            "its seven features, which let it learn the training beams by heart. "
            "[default: invariant; --paper: paper]"
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Training epochs. [default: poisson1d 2500, others 200]"),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the data and the weights. [default: 0]")
    ] = None,
    gain: Annotated[
        float | None, typer.Option(help="Sigmoid gain a of the surrogate (log space). [default: 1]")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Tasks per step. [default: poisson1d 256, elasticity 128, robertson 16384]"
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Adam learning rate. [default: poisson1d 0.01, elasticity 0.001, robertson 2e-5]"
        ),
    ] = None,
    clip: Annotated[
        float | None,
        typer.Option(
            help="elasticity only: clip each task's derivative of the solve loss in log(alpha) "
            "to [-CLIP, CLIP] (not in the paper). [default: no clipping]"
        ),
    ] = None,
    smooth: Annotated[
        float | None,
        typer.Option(
            help="elasticity only: replace each task's derivative of the solve loss in "
            "log(alpha) by its central difference over alpha*exp(+-SMOOTH) (not in the "
            "paper); 0 keeps the paper's exact derivative. [default: 0.25; with --clip or "
            "--paper: 0]"
        ),
    ] = None,
    gamma: Annotated[
        float | None,
        typer.Option(
            help="elasticity only: weight of the ICF penalty gamma * (-log alpha) that a "
            "failed IC(0) costs in training (§4.2). [default: 500, the paper's]"
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="elasticity with a smoothed derivative only: run the training, validation "
            "and monitor solves with 'petsc' (a KSP per task, on the CPU) instead of "
            "'torch'; evaluation stays in torch. [default: petsc when training on the CPU "
            "with --smooth above 0, else torch]"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="--engine petsc only: processes that share each batch's PETSc solves; "
            "the results do not depend on it. [default: all cores with --engine petsc, "
            "else 1]"
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
            help="Train with the paper's settings instead of the best known ones: for "
            "elasticity its exact derivative (--smooth 0), --engine torch, --workers 1 and "
            "--inputs paper. poisson1d and robertson train with the paper's settings "
            "either way: they are the best known there. An option given beside it that "
            "differs from the paper's is an error.",
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
) -> None:
    """Train a meta-solver and save it to a run directory.

    Without options it trains with the best known settings (for elasticity on the
    CPU: --smooth 0.25 --engine petsc on all cores, --inputs invariant); --paper
    gives the paper's.
    """
    check_problem(problem)
    if (out is None) == (resume is None):
        raise UsageError("give exactly one of --out NEW_RUN_DIR or --resume RUN_DIR")
    if resume is None:
        given = {
            "loss": loss, "m": m, "tol": tol, "p": p, "epochs": epochs, "seed": seed,
            "gain": gain, "batch_size": batch_size, "lr": lr, "clip": clip, "smooth": smooth,
            "head": head, "sets": sets, "guess_init": guess_init,
            "select": select, "engine": engine, "workers": workers, "gamma": gamma,
            "ic_pattern": ic_pattern, "inputs": inputs, "paper": True if paper else None,
        }  # fmt: skip
        values = read_config(config) | {k: v for k, v in given.items() if v is not None}
        try:
            options = TrainOptions(problem=problem, **values)
        except TypeError as err:
            where = f" in {config}" if config is not None else ""
            raise UsageError(f"bad option value{where}: {err}") from None
        if out.exists() and any(out.iterdir()):
            raise UsageError(
                f"{out} exists and is not empty; choose a new --out directory, "
                f"or continue an interrupted run with --resume {out}"
            )
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

        try:
            if resume is None:
                schedule = get_experiment(problem).train_config(options.epochs, None, None, 0)
                progress.update(bar, total=schedule.epochs)
                _, _, result = train_metasolver(
                    options, out, advance, checkpoint_seconds, monitor, device
                )
            else:
                out = resume
                _, _, result = resume_training(
                    resume, problem, advance, checkpoint_seconds, monitor, device, workers
                )
        except KeyboardInterrupt:
            typer.echo(
                f"interrupted; continue with `femeta train {problem} --resume {out}`", err=True
            )
            raise typer.Exit(130) from None
    kept = result.history[result.best_epoch - 1] if result.best_epoch > 0 else None
    if kept is not None and kept.validation_iterations is not None:
        iterations = f", {kept.validation_iterations:.6g} validation iterations"
    else:
        iterations = ""
    typer.echo(
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
            help="Evaluate a baseline instead of a model: 'base' (Psi_base), or for "
            "elasticity 'best' (per-task grid search over alpha, slow) or 'petsc' (CG with "
            "PETSc's ICC(0) of A and its default shift, what a FEniCS script has)."
        ),
    ] = None,
    tol: Annotated[
        float | None, typer.Option(help="Test tolerance eps. [default: 1e-6; robertson 1e-9]")
    ] = None,
    p: Annotated[
        float | None,
        typer.Option(
            help="poisson1d only: weight of P1 in the test tasks. [default: the model's, else 0]"
        ),
    ] = None,
    sets: Annotated[
        int | None,
        typer.Option(
            help="robertson only: parameter sets, as in train. [default: the model's, else 10000]"
        ),
    ] = None,
    ic_pattern: Annotated[
        str | None,
        typer.Option(
            help="elasticity only: IC(0)'s sparsity pattern, 'values' or 'stored', as in train. "
            "[default: the model's, else stored]"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the test tasks.")] = 0,
    max_iterations: Annotated[
        int | None, typer.Option(help="Iteration cap; unconverged tasks count as the cap.")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="elasticity only: solve with 'petsc' (a KSP per task, spread over --workers "
            "processes; Psi_best's 31 shifts several times faster) instead of 'torch'. The "
            "counts differ only by rounding."
        ),
    ] = "torch",
    workers: Annotated[
        int | None,
        typer.Option(help="--engine petsc only: processes. [default: all cores]"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
    device: Device = "auto",
) -> None:
    """Mean iterations to reach a tolerance on the test tasks (L_eps)."""
    check_problem(problem)
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
    if engine not in EXPERIMENTS[problem].engines:
        engines = list(EXPERIMENTS[problem].engines)
        raise UsageError(f"--engine for {problem} must be one of {engines}, got {engine!r}")
    if workers is None:
        workers = available_cores() if engine == "petsc" else 1
    given = {"p": p, "sets": sets, "ic_pattern": ic_pattern}
    overrides = {name: value for name, value in given.items() if value is not None}
    progress: dict[str, Any] = {}
    if model is not None:
        experiment, metasolver = load_metasolver(model, problem, device=device, **overrides)
    elif checkpoint is not None:
        experiment, metasolver, progress = load_checkpoint(checkpoint, problem, device, **overrides)
    else:
        experiment = get_experiment(problem, **overrides, device=resolve_device(device))
        metasolver = baseline_metasolver(experiment, baseline, seed)
    tol = experiment.default_tol if tol is None else tol
    stats = evaluate_metasolver(experiment, metasolver, tol, seed, max_iterations, engine, workers)
    task_p = getattr(experiment, "p", None)
    name = str(model or checkpoint or baseline)
    summary = {"problem": problem, "model": name, "p": task_p, "engine": engine}
    summary |= progress | stats.summary()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    where = problem if task_p is None else f"{problem} (p = {task_p})"
    if engine != "torch":
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


@app.command("solve")
@friendly
def solve_command(
    problem: Problem,
    model: Annotated[Path, typer.Option(help="Run directory written by `femeta train`.")],
    cells: Annotated[
        tuple[int, int, int],
        typer.Option(help="Hexahedra along the length and across the section (any size)."),
    ] = (8, 2, 2),
    width: Annotated[float, typer.Option("--W", help="Width and height W of the beam.")] = 0.1,
    lam: Annotated[float, typer.Option("--lam", help="Lame's first parameter lambda.")] = 1.0,
    mu: Annotated[float, typer.Option("--mu", help="Shear modulus mu.")] = 1.0,
    rho: Annotated[float, typer.Option("--rho", help="Density rho.")] = 1.0,
    tol: Annotated[float, typer.Option(help="Relative residual ||b - Ax|| / ||b||.")] = 1e-6,
    max_iterations: Annotated[
        int | None, typer.Option(help="Iteration cap of every solver. [default: 10 N]")
    ] = None,
    extrapolate: Annotated[
        bool, typer.Option(help="Apply the model outside the ranges it was trained on.")
    ] = False,
    with_gamg: Annotated[
        bool, typer.Option("--gamg/--no-gamg", help="Also solve with GAMG (rigid-body modes).")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
) -> None:
    """Assemble one beam with DOLFINx (on all MPI ranks) and solve it with the model's
    shift (guarded), Psi_base's shift, PETSc's default ICC and GAMG."""
    if problem != "elasticity":
        raise UsageError(f"femeta solve assembles beams only: use 'elasticity', not {problem!r}")
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
    params = {"W": width, "lambda_": lam, "mu": mu, "rho": rho}
    import_dolfinx()
    from mpi4py import MPI

    from femeta import comparison
    from femeta.fenics import configure
    from femeta.problems.elasticity import beam_system

    comm = MPI.COMM_WORLD
    start = time.perf_counter()
    A, b, space = beam_system(comm, cells, width, lam, mu, rho)
    assembly = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    n = A.getSize()[0]
    cap = 10 * n if max_iterations is None else max_iterations
    probe = _probe_ksp(A)
    alpha = configure(probe, loaded, extrapolate=extrapolate, **params).alpha
    probe.destroy()
    base = comm.bcast(_base_alpha(loaded) if comm.rank == 0 else None, root=0)
    outcomes = [
        comparison.shifted_icc("femeta", A, b, alpha, tol, cap),
        comparison.shifted_icc("psi_base", A, b, base, tol, cap),
        comparison.default_icc(A, b, tol, cap),
    ]
    if with_gamg:
        outcomes.append(comparison.gamg(A, b, tol, cap, comparison.rigid_body_modes(space)))
    summary = {
        "unknowns": n, "ranks": comm.size, "cells": list(cells), "tol": tol,
        "max_iterations": cap, "assembly_seconds": assembly,
        "params": {"W": width, "lambda": lam, "mu": mu, "rho": rho},
        "solvers": [outcome.as_dict() for outcome in outcomes],
    }  # fmt: skip
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"beam {' x '.join(map(str, cells))} cells, {n} unknowns on {comm.size} rank(s), "
        f"assembled in {assembly:.2f} s; CG to {tol:g} (cap {cap}):"
    )
    labels = {"femeta": "learned alpha", "psi_base": "Psi_base alpha",
              "petsc_icc": "PETSc ICC default", "gamg": "GAMG + rigid modes"}  # fmt: skip
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


def _base_alpha(model: Any) -> float:
    """Psi_base's shift: saved with the model, or found on its training beams."""
    if model.base_alpha is not None:
        return model.base_alpha
    experiment, _ = load_metasolver(model.run_dir, model.problem)
    seed = json.loads((model.run_dir / "config.json").read_text())["options"]["seed"]
    return experiment.base_shift(experiment.tasks("train", seed))


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
    epochs: RunEpochs = None,
    jobs: Jobs = 2,
    seed: TableSeed = 0,
    out: Annotated[
        Path | None, typer.Option(help="Directory for results.json and the figures.")
    ] = None,
    as_json: TableJson = False,
) -> None:
    """Table 3 / Figures 1-2: Jacobi initial guesses on 1D Poisson, L_m against L~_eps."""
    from femeta import reproduce

    check_jobs(jobs)
    budget = reproduce.epochs_budget("table3", quick, epochs)
    progress = table_progress(as_json)
    with progress:
        bar = progress.add_task("table 3", total=len(reproduce.table3_grid()))
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
    get_experiment("robertson", sets=sets)  # checks sets before any worker starts
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


def launcher_rank() -> int:
    """This process's rank when started by mpiexec (MPICH, Open MPI or PMIx), else 0."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def main() -> None:
    if launcher_rank() > 0:
        # Results are printed once, by rank 0; errors still reach every rank's stderr.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    app()
