"""Reproduce the paper's tables: Table 3 and Figures 1-2 (Jacobi initial guesses on 1D
Poisson), Table 2 (the ICCG shift on clamped beams) and Table 1 (Newton-SOR on Robertson)."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from femeta._io import write_atomic
from femeta.plots import save_figure

__all__ = [
    "SETUPS",
    "epochs_budget",
    "run_table1",
    "run_table2",
    "run_table3",
    "save_table3",
    "table1_grid",
    "table1_rich",
    "table2_grid",
    "table2_rich",
    "table3_grid",
    "table3_rich",
]

TEST_TOLERANCES = (1e-2, 1e-4, 1e-6, 1e-8)
MIXTURES = (0.0, 0.01)
#: Epochs per training run: the full set-up's, and the --quick budget.
BUDGETS = {
    "table1": (200, 3),
    "table2": (200, 5),
    "table3": (700, 50),
    "table3-paper": (2500, 150),
}
#: Table 3's training set-ups: poisson1d's recommended one, and the paper's literal one.
SETUPS = ("recommended", "paper")

#: Table 3 of the paper: mean iterations at test eps = 1e-2, 1e-4, 1e-6, 1e-8.
PAPER_TABLE3: dict[tuple[float, str], tuple[float, ...]] = {
    (0.0, "base"): (28.17, 92.54, 158.41, 224.28),
    (0.0, "m=0"): (0.00, 17.52, 168.80, 436.95),
    (0.0, "m=1"): (0.00, 20.07, 148.26, 403.22),
    (0.0, "m=5"): (1.00, 13.82, 135.43, 397.97),
    (0.0, "m=25"): (6.26, 16.31, 37.71, 172.02),
    (0.0, "m=125"): (23.42, 83.28, 148.73, 214.59),
    (0.0, "eps=1e-02"): (0.01, 40.31, 223.15, 491.30),
    (0.0, "eps=1e-04"): (3.93, 9.76, 48.61, 178.15),
    (0.0, "eps=1e-06"): (6.20, 15.79, 32.00, 83.43),
    (0.0, "eps=1e-08"): (11.12, 32.05, 57.62, 86.70),
    (0.01, "base"): (30.15, 96.52, 164.41, 232.30),
    (0.01, "m=0"): (2.11, 183.28, 451.24, 719.40),
    (0.01, "m=1"): (1.90, 178.61, 446.51, 714.67),
    (0.01, "m=5"): (1.18, 34.47, 286.43, 554.55),
    (0.01, "m=25"): (7.11, 20.22, 121.24, 379.51),
    (0.01, "m=125"): (20.96, 80.44, 151.39, 353.35),
    (0.01, "eps=1e-02"): (0.25, 185.93, 453.84, 721.99),
    (0.01, "eps=1e-04"): (5.34, 13.69, 176.77, 444.71),
    (0.01, "eps=1e-06"): (7.94, 19.79, 36.11, 166.30),
    (0.01, "eps=1e-08"): (13.39, 37.44, 66.16, 97.97),
}


def _run_rows(
    worker: Callable[..., dict],
    grid: list[dict[str, Any]],
    order: Sequence[int],
    jobs: int,
    advance: Callable[[], None] | None,
    *args: Any,
) -> list[dict[str, Any]]:
    """``worker(row, *args)`` for every row of ``grid``, ``jobs`` processes at a time,
    submitted in ``order``; the results in the grid's order."""
    context = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = [{}] * len(grid)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(worker, grid[i], *args): i for i in order}
        for future in concurrent.futures.as_completed(futures):
            rows[futures[future]] = future.result()
            if advance is not None:
                advance()
    return rows


def _select_rows(
    rows: list[dict[str, Any]], labels: Sequence[str] | None, table: str
) -> list[dict[str, Any]]:
    """The rows whose label is in ``labels`` (all when ``None``); unknown labels are an error."""
    if labels is None:
        return rows
    known = [row["label"] for row in rows]
    unknown = sorted(set(labels) - set(known))
    if unknown or not labels:
        raise ValueError(f"unknown {table} rows {unknown}; choose from {known}")
    return [row for row in rows if row["label"] in labels]


def table3_grid(setups: Sequence[str] = ("recommended",)) -> list[dict[str, Any]]:
    """Every row of Table 3, for both mixtures: Psi_base, then for each training set-up
    (:data:`SETUPS`) L_m for five m and L~_eps for four eps."""
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown or not setups:
        raise ValueError(f"unknown Table 3 set-ups {unknown}; choose from {list(SETUPS)}")
    rows = []
    for p in MIXTURES:
        rows.append({"p": p, "label": "base", "loss": None, "setup": None})
        for setup in setups:
            rows += [{"p": p, "label": f"m={m}", "loss": "m", "m": m, "setup": setup}
                     for m in (0, 1, 5, 25, 125)]  # fmt: skip
            rows += [
                {"p": p, "label": f"eps={tol:.0e}", "loss": "surrogate", "tol": tol,
                 "setup": setup}
                for tol in TEST_TOLERANCES
            ]  # fmt: skip
    return rows


def epochs_budget(table: str, quick: bool, epochs: int | None) -> int:
    """Epochs per training run of ``table``: the paper's, the quick budget, or an override."""
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {epochs}")
        return epochs
    full, reduced = BUDGETS[table]
    return reduced if quick else full


def _run_row(row: dict[str, Any], epochs: dict[str, int], seed: int) -> dict[str, Any]:
    """Train (unless Psi_base) and evaluate one row; runs in a worker process."""
    import time

    import torch

    from femeta.experiments import get_experiment
    from femeta.workflow import TrainOptions, evaluate_metasolver, train_metasolver

    torch.set_num_threads(1)
    start = time.perf_counter()
    if row["loss"] is None:
        experiment = get_experiment("poisson1d", p=row["p"])
        metasolver = experiment.metasolver("base")
    else:
        options = TrainOptions(
            loss=row["loss"], m=row.get("m"), tol=row.get("tol", 1e-6), p=row["p"],
            epochs=epochs[row["setup"]], seed=seed, paper=row["setup"] == "paper",
        )  # fmt: skip
        experiment, metasolver, _ = train_metasolver(options)
    stats = [evaluate_metasolver(experiment, metasolver, tol, seed) for tol in TEST_TOLERANCES]
    return row | {
        "mean": [s.mean_iterations for s in stats],
        "std": [s.std_iterations for s in stats],
        "convergence_ratio": [s.convergence_ratio for s in stats],
        "iterations_at_1e-6": stats[2].iterations.tolist(),
        "paper": list(PAPER_TABLE3[(row["p"], row["label"])]),
        "seconds": time.perf_counter() - start,
    }


def run_table3(
    epochs: Mapping[str, int],
    seed: int = 0,
    jobs: int = 2,
    advance: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate the whole grid for each set-up in ``epochs`` (set-up -> epochs per
    run: ``"recommended"``, poisson1d's default training, and/or ``"paper"``, the paper's
    literal one), ``jobs`` runs at a time."""
    grid = table3_grid(tuple(epochs))
    # Longest runs first (the paper's, then surrogate with the smallest eps): the pool stays busy.
    order = sorted(
        range(len(grid)),
        key=lambda i: (
            grid[i]["setup"] != "paper",
            grid[i]["loss"] != "surrogate",
            grid[i].get("tol", 0.0),
        ),
    )
    rows = _run_rows(_run_row, grid, order, jobs, advance, dict(epochs), seed)
    return {"epochs": dict(epochs), "seed": seed, "test_tolerances": list(TEST_TOLERANCES),
            "rows": rows}  # fmt: skip


def table3_rich(results: dict[str, Any]) -> Table:
    """The measured table beside the paper's numbers: one cell per set-up run."""
    setups = [setup for setup in SETUPS if setup in results["epochs"]]
    budget = ", ".join(f"{setup} {results['epochs'][setup]}" for setup in setups)
    table = Table(title=f"Table 3: mean Jacobi iterations on test tasks (epochs: {budget})")
    table.add_column("p")
    table.add_column("Psi / training")
    shown = " / ".join("default" if setup == "recommended" else "--paper" for setup in setups)
    for tol in results["test_tolerances"]:
        table.add_column(f"eps={tol:.0e}\n{shown} (paper's)", justify="right")
    cells: dict[tuple[float, str], dict[str, list[float]]] = {}
    papers: dict[tuple[float, str], list[float]] = {}
    for row in results["rows"]:
        key = (row["p"], row["label"])
        cells.setdefault(key, {})[row.get("setup") or "base"] = row["mean"]
        papers[key] = row["paper"]
    for (p, label), means in cells.items():
        runs = [means["base"]] if "base" in means else [means[s] for s in setups if s in means]
        columns = [
            " / ".join(f"{run[i]:.2f}" for run in runs) + f" ({paper:.2f})"
            for i, paper in enumerate(papers[(p, label)])
        ]
        table.add_row(str(p), label, *columns)
    return table


def save_table3(results: dict[str, Any], out: Path) -> None:
    """Write ``results.json``, ``figure1.png`` (Figure 1) and ``figure2.png`` (Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    # The figures show the first set-up run (the recommended one, when it was).
    setup = next(s for s in SETUPS if s in results["epochs"])
    rows = [row for row in results["rows"] if row.get("setup") in (None, setup)]
    column = results["test_tolerances"].index(1e-6)

    figure, axes = plt.subplots(figsize=(9, 4))
    labels = [row["label"] for row in rows if row["p"] == MIXTURES[0] and row["loss"]]
    for offset, p in zip((-0.2, 0.2), MIXTURES, strict=True):
        trained = [row for row in rows if row["p"] == p and row["loss"]]
        base = next(row for row in rows if row["p"] == p and not row["loss"])
        position = np.arange(len(trained)) + offset
        bars = axes.bar(
            position,
            [row["mean"][column] for row in trained],
            0.4,
            yerr=[row["std"][column] for row in trained],
            label=f"p = {p}",
            capsize=2,
        )
        axes.axhline(base["mean"][column], linestyle=":", color=bars.patches[0].get_facecolor())
    axes.set_xticks(np.arange(len(labels)), labels)
    axes.set_ylabel("iterations to eps = 1e-6")
    axes.set_title(f"Psi_nn trained ({setup} set-up) with L_m (m) and with the surrogate (eps); "
                   "dotted: Psi_base", fontsize=9)  # fmt: skip
    axes.legend()
    figure.tight_layout()
    save_figure(figure, out / "figure1.png")

    figure, grid = plt.subplots(2, 3, figsize=(11, 6), sharex=True)
    for axes_row, p in zip(grid, MIXTURES, strict=True):
        for axes, label in zip(axes_row, ("base", "m=25", "eps=1e-06"), strict=True):
            row = next(r for r in rows if r["p"] == p and r["label"] == label)
            axes.hist(row["iterations_at_1e-6"], bins=40)
            axes.set_title(f"p = {p}, {label}: mean {row['mean'][column]:.1f}")
    for axes in grid[-1]:
        axes.set_xlabel("iterations to eps = 1e-6")
    figure.tight_layout()
    save_figure(figure, out / "figure2.png")


#: What Table 2's networks read: the paper's seven features, not femeta's default.
TABLE2_INPUTS = "paper"
#: Table 2 of the paper: mean ICCG iterations to eps = 1e-6 (cap N = 243) and convergence ratio.
PAPER_TABLE2: dict[str, tuple[float, float]] = {
    "base": (115.26, 0.864),
    "best": (44.53, 1.00),
    "m=1": (204.93, 0.394),
    "m=5": (183.90, 0.626),
    "m=25": (193.80, 0.410),
    "m=125": (77.08, 1.00),
    "m=243": (201.65, 0.420),
    "eps=1e-06": (52.02, 0.999),
}


def table2_grid(labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of Table 2: Psi_base, Psi_best, L_m for five m and L~_eps (eps = 1e-6).

    ``labels`` selects rows by label (``base``, ``best``, ``m=1``, ..., ``eps=1e-06``).
    """
    rows: list[dict[str, Any]] = [
        {"label": "base", "loss": None, "kind": "base"},
        {"label": "best", "loss": None, "kind": "best"},
    ]
    rows += [{"label": f"m={m}", "loss": "m", "m": m} for m in (1, 5, 25, 125, 243)]
    rows.append({"label": "eps=1e-06", "loss": "surrogate", "tol": 1e-6})
    return _select_rows(rows, labels, "Table 2")


def _run_table2_row(
    row: dict[str, Any],
    epochs: int,
    seed: int,
    cap: int | None,
    smooth: float | None,
    engine: str,
    ic_pattern: str,
) -> dict:
    """Fit or train one row, then evaluate it at eps = 1e-6 with the cap; in a worker."""
    import time

    import torch

    from femeta.experiments import get_experiment
    from femeta.workflow import (
        TrainOptions,
        baseline_metasolver,
        evaluate_metasolver,
        train_metasolver,
    )

    torch.set_num_threads(1)
    start = time.perf_counter()
    if row["loss"] is None:
        experiment = get_experiment("elasticity", ic_pattern=ic_pattern)
        metasolver = baseline_metasolver(experiment, row["kind"], seed)
    else:
        m = row.get("m", cap)  # the surrogate trains with the cap it is tested with
        # Every setting explicit: the paper's unless asked otherwise, not femeta's defaults.
        options = TrainOptions(problem="elasticity", loss=row["loss"], m=m, tol=1e-6,
                               epochs=epochs, seed=seed,
                               smooth=0.0 if smooth is None else smooth, engine=engine,
                               ic_pattern=ic_pattern,
                               inputs=TABLE2_INPUTS)  # fmt: skip
        experiment, metasolver, _ = train_metasolver(options)
    stats = evaluate_metasolver(experiment, metasolver, 1e-6, seed, cap)
    alpha = None
    if row.get("kind") != "best":
        alpha = metasolver(experiment.tasks("test", seed)["features"]).detach().cpu()
    return row | {
        "mean": stats.mean_iterations,
        "std": stats.std_iterations,
        "convergence_ratio": stats.convergence_ratio,
        "max_iterations": stats.max_iterations,
        "median_alpha": None if alpha is None else float(alpha.median()),
        "paper": list(PAPER_TABLE2[row["label"]]),
        "seconds": time.perf_counter() - start,
    }


def run_table2(
    epochs: int,
    seed: int = 0,
    jobs: int = 2,
    max_iterations: int | None = None,
    advance: Callable[[], None] | None = None,
    labels: Sequence[str] | None = None,
    smooth: float | None = None,
    engine: str = "torch",
    ic_pattern: str | None = None,
) -> dict[str, Any]:
    """Fit, train and evaluate the rows of Table 2 (all, or ``labels``), ``jobs`` at a time.

    ``max_iterations`` is the cap of the test solves and of the surrogate's
    training solves (``None``: the paper's ``N``); the paper's numbers are for ``N``.
    ``smooth`` and ``engine`` apply to every trained row, L_m and L~_eps alike
    (see :meth:`~femeta.experiments.ElasticityIccg.objective`); ``None`` and
    ``"torch"`` are the paper's exact derivative. ``ic_pattern`` is IC(0)'s
    sparsity pattern in every row (``None``: :class:`~femeta.experiments.ElasticityIccg`'s).
    Every trained row's network reads the paper's seven features (:data:`TABLE2_INPUTS`).
    """
    from femeta.experiments import get_experiment

    # Bad values fail here, before any row starts.
    given = {} if ic_pattern is None else {"ic_pattern": ic_pattern}
    experiment = get_experiment("elasticity", **given)
    experiment.objective("m", 1, None, smooth=smooth, engine=engine)
    ic_pattern = experiment.ic_pattern
    grid = table2_grid(labels)
    # The expensive rows first (the grid search, then the long solves), so the pool stays busy.
    cost = {"best": 0, "eps=1e-06": 1, "m=243": 2, "m=125": 3}
    order = sorted(range(len(grid)), key=lambda i: cost.get(grid[i]["label"], 9))
    settings = (epochs, seed, max_iterations, smooth, engine, ic_pattern)
    rows = _run_rows(_run_table2_row, grid, order, jobs, advance, *settings)
    return {"epochs": epochs, "seed": seed, "tol": 1e-6, "smooth": smooth, "engine": engine,
            "ic_pattern": ic_pattern, "inputs": TABLE2_INPUTS, "rows": rows}  # fmt: skip


def table2_rich(results: dict[str, Any]) -> Table:
    """The measured table beside the paper's numbers (the paper's are for the cap N)."""
    cap = results["rows"][0]["max_iterations"]
    derivative = "exact derivative"
    if results.get("smooth") is not None:
        derivative = f"--smooth {results['smooth']:g}, --engine {results['engine']}"
    table = Table(
        title=f"Table 2: ICCG iterations to eps = 1e-6 on the test tasks, cap {cap} "
        f"({results['epochs']} epochs, {derivative}, IC(0) on the "
        f"{results.get('ic_pattern', 'values')} pattern)"
    )
    for name in ("Psi / training", "iterations", "convergence", "median alpha", "paper"):
        table.add_column(name, justify="left" if name == "Psi / training" else "right")
    for row in results["rows"]:
        alpha = "-" if row["median_alpha"] is None else f"{row['median_alpha']:.3g}"
        paper = f"{row['paper'][0]:.2f} / {row['paper'][1]:.3f}"
        table.add_row(
            row["label"],
            f"{row['mean']:.2f} ± {row['std']:.2f}",
            f"{row['convergence_ratio']:.3f}",
            alpha,
            paper,
        )
    return table


#: Table 1 of the paper: mean Newton-SOR iterations to eps = 1e-9 on the test tasks (cap 10^4).
PAPER_TABLE1: dict[str, float] = {
    "base": 70.51,
    "both/m=1": 199.20,
    "both/m=5": 105.71,
    "both/m=25": 114.43,
    "both/m=125": 109.24,
    "both/m=625": 190.56,
    "both/eps=1e-09": 9.51,
    "ini/eps=1e-09": 55.82,
    "relax/eps=1e-09": 14.38,
}


def table1_grid(labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of Table 1: Psi_base; Psi_both with L_m (five m) and L~_eps (1a);
    Psi_ini and Psi_relax with L~_eps (1b). ``labels`` selects rows by label."""
    rows: list[dict[str, Any]] = [{"label": "base", "loss": None}]
    rows += [
        {"label": f"both/m={m}", "head": "both", "loss": "m", "m": m} for m in (1, 5, 25, 125, 625)
    ]
    rows += [
        {"label": f"{head}/eps=1e-09", "head": head, "loss": "surrogate", "m": 2000}
        for head in ("both", "ini", "relax")
    ]
    return _select_rows(rows, labels, "Table 1")


def check_table1(sets: int) -> None:
    """Fail on a bad number of parameter sets, before any row starts."""
    from femeta.experiments import get_experiment

    get_experiment("robertson", sets=sets)


def _run_table1_row(
    row: dict[str, Any],
    epochs: int,
    seed: int,
    sets: int,
    lr: float | None,
    batch_size: int | None,
    threads: int,
) -> dict:
    """Fit or train one row, then evaluate it at eps = 1e-9 with the cap 10^4; in a worker."""
    import time

    import torch

    from femeta.experiments import get_experiment
    from femeta.workflow import TrainOptions, baseline_metasolver, train_metasolver

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if row["loss"] is None:
        experiment = get_experiment("robertson", sets=sets)
        metasolver = baseline_metasolver(experiment, "base", seed)
    else:
        options = TrainOptions(
            problem="robertson", head=row["head"], loss=row["loss"], m=row["m"], tol=1e-9,
            epochs=epochs, seed=seed, sets=sets, lr=lr, batch_size=batch_size, paper=True,
        )  # fmt: skip
        experiment, metasolver, _ = train_metasolver(options)
    test = experiment.tasks("test", seed)
    stats = experiment.stats(metasolver, test, 1e-9, experiment.evaluation_cap)
    with torch.no_grad():
        _, relaxation = metasolver(test["features"])
    return row | {
        "mean": stats.mean_iterations,
        "std": stats.std_iterations,
        "convergence_ratio": stats.convergence_ratio,
        "max_iterations": stats.max_iterations,
        "median_relaxation": float(relaxation.median()),
        "paper": PAPER_TABLE1[row["label"]],
        "seconds": time.perf_counter() - start,
    }


def run_table1(
    epochs: int,
    seed: int = 0,
    jobs: int = 1,
    sets: int = 10_000,
    lr: float | None = None,
    batch_size: int | None = None,
    advance: Callable[[], None] | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fit, train and evaluate the rows of Table 1 (all, or ``labels``), ``jobs`` at a time.

    ``sets`` parameter sets (the paper: 10,000), ``lr`` and ``batch_size``
    (``None``: the paper's 2e-5 and 16384) apply to every trained row.
    """
    grid = table1_grid(labels)
    threads = max(1, (multiprocessing.cpu_count() or 1) // jobs)
    rows = _run_rows(_run_table1_row, grid, range(len(grid)), jobs, advance,
                     epochs, seed, sets, lr, batch_size, threads)  # fmt: skip
    return {"epochs": epochs, "seed": seed, "sets": sets, "lr": lr, "batch_size": batch_size,
            "tol": 1e-9, "rows": rows}  # fmt: skip


def table1_rich(results: dict[str, Any]) -> Table:
    """The measured table beside the paper's numbers (the paper's: 200 epochs, 10,000 sets)."""
    lr = "lr 2e-5" if results["lr"] is None else f"lr {results['lr']:g}"
    batch = 16384 if results["batch_size"] is None else results["batch_size"]
    table = Table(
        title=f"Table 1: Newton-SOR iterations to eps = 1e-9 on the test tasks, cap 10^4 "
        f"({results['epochs']} epochs, {results['sets']} parameter sets, batch {batch}, {lr})"
    )
    for name in ("Psi / training", "iterations", "convergence", "median r", "paper"):
        table.add_column(name, justify="left" if name == "Psi / training" else "right")
    for row in results["rows"]:
        table.add_row(
            row["label"],
            f"{row['mean']:.2f} ± {row['std']:.2f}",
            f"{row['convergence_ratio']:.4f}",
            f"{row['median_relaxation']:.3f}",
            f"{row['paper']:.2f}",
        )
    return table
