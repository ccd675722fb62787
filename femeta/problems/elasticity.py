"""Clamped elastic beam under its own weight (paper §4.2, equations (15)-(17), Appendix C.3).

``-div sigma(u) = f`` on the box ``[0, L] x [0, W] x [0, W]`` with ``L = 1``,
``sigma(u) = lambda tr(eps(u)) I + 2 mu eps(u)``, ``eps(u) = sym(grad u)``, clamped
(``u = 0``) at ``x = 0`` and traction-free elsewhere. The body force is gravity,
``f = (0, 0, -rho g)``; the paper leaves ``g`` open, and as in the FEniCS beam
tutorial we take ``g = 0.4 (W / L)^2``, which keeps the deflection small for every
width.

A task is ``tau = (W, lambda, mu, rho)`` with ``W ~ LogUniform(0.003, 0.3)`` and
``lambda, mu, rho ~ LogUniform(0.1, 10)``. P1 vector Lagrange elements on a
hexahedral box mesh of 8 x 2 x 2 cells give ``N = 243`` unknowns. Dirichlet rows
are kept as identity rows with zeroed columns (as legacy FEniCS
``assemble_system`` gives), so ``A`` stays symmetric positive definite. The
matrices are kept sparse, on the entries DOLFINx's matrix stores
(:class:`~femeta.solvers.sparse.SparseBatch`), so any mesh size fits in memory.

The forms are the family file :mod:`femeta.problems.beam_family`, assembled by
the family assembler (:class:`~femeta.problems.family.Assembler`) as any user's
family is; what this module adds is the paper's sampling, inputs and cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from femeta._io import write_atomic
from femeta.parallel import on_root, world
from femeta.problems.base import TaskSet, assemble_shared, default_cache_dir, split_size_and_seed
from femeta.problems.family import Assembler, FamilySource, family_system, load_family
from femeta.solvers.sparse import SparseBatch

__all__ = ["ElasticBeam", "beam_source", "beam_system"]

SPLITS = ("train", "validation", "test")
PARAM_NAMES = ("W", "lambda", "mu", "rho")
FEATURE_NAMES = (*PARAM_NAMES, "norm_1", "norm_inf", "norm_fro")
# Format 2 stores the CSR pattern once and every task's values on it; format 1 files
# (dense entries on the union of nonzeros) are not read, and the datasets reassembled.
_CACHE_FORMAT = 2


class ElasticBeam:
    """The task space of clamped beams, assembled with DOLFINx.

    The forms are compiled once, on the first assembly; the material parameters
    are ``fem.Constant``s and the width is applied by rescaling the mesh
    geometry in place, so no task triggers a recompilation. DOLFINx is needed
    only to assemble: a dataset or stored pattern already in the cache loads
    without it (e.g. on a GPU machine without DOLFINx).

    Args:
        cells: Hexahedra along the length and the two sides of the cross-section.
        width_range: Bounds of the log-uniform distribution of ``W``.
        material_range: Bounds of the log-uniform distributions of ``lambda``,
            ``mu`` and ``rho``.
        cache_dir: Where generated datasets and the stored pattern are kept;
            :func:`default_cache_dir` when omitted.
        cache: Whether to keep and reuse them on disk.
        splits: Tasks in the training, validation and test splits (the paper's 1000).

    Under ``mpiexec`` the ranks share the assembly of a dataset and all hold it;
    rank 0 writes the cache.
    """

    name = "elasticity"
    length = 1.0
    param_names = PARAM_NAMES
    feature_names = FEATURE_NAMES

    def __init__(
        self,
        cells: tuple[int, int, int] = (8, 2, 2),
        width_range: tuple[float, float] = (0.003, 0.3),
        material_range: tuple[float, float] = (0.1, 10.0),
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
        splits: tuple[int, int, int] = (1000, 1000, 1000),
    ):
        if len(cells) != 3 or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cells
        ):
            raise ValueError(f"cells must be three positive integers, got {cells!r}")
        for label, (low, high) in (
            ("width_range", width_range),
            ("material_range", material_range),
        ):
            if not (0 < low <= high < math.inf):
                raise ValueError(f"{label} must satisfy 0 < low <= high < inf, got {(low, high)}")
        if len(splits) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in splits
        ):
            raise ValueError(f"splits must be three positive integers, got {splits!r}")
        self.cells = tuple(cells)
        self.splits = dict(zip(SPLITS, splits, strict=True))
        self.width_range = (float(width_range[0]), float(width_range[1]))
        self.material_range = (float(material_range[0]), float(material_range[1]))
        if not cache:
            self.cache_dir = None
        else:
            self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
        self.n = 3 * math.prod(c + 1 for c in self.cells)
        self._assembler: Assembler | None = None
        self._vertices: np.ndarray | None = None

    def assemble(self, params: Tensor) -> tuple[SparseBatch, Tensor]:
        """Assemble the systems of the tasks ``params``, rows ``(W, lambda, mu, rho)``.

        Returns:
            ``A``, a :class:`SparseBatch` of ``B`` matrices ``N x N`` on the entries
            DOLFINx's matrix stores (explicit zeros included), and ``b`` of shape
            ``(B, N)``, float64.
        """
        return self._forms()(_check_params(params))

    def dof_layout(self, width: float) -> tuple[Tensor, Tensor]:
        """Where the unknowns live for a beam of this ``width``.

        Returns:
            The coordinates of each unknown's vertex, ``(N, 3)``, and which
            displacement component (0, 1, 2 for x, y, z) it is, ``(N,)``.
        """
        _check_params(torch.tensor([[width, 1.0, 1.0, 1.0]]))
        self._forms()
        coordinates = torch.from_numpy(self._vertices.copy())
        coordinates[:, 1:] *= width
        return coordinates.repeat_interleave(3, dim=0), torch.arange(self.n) % 3

    def stored_pattern(self) -> Tensor:
        """The entries that DOLFINx's assembled matrix stores, boolean ``(N, N)``.

        The same for every task: each pair of unknowns that share a cell. Some of
        these entries cancel to zero or to rounding noise in a task's ``A``, so the
        nonzeros of ``A`` change from task to task with rounding; PETSc's ICC(0) on
        the assembled matrix keeps them all, explicit zeros included. The datasets'
        ``A`` (a :class:`SparseBatch`) stores exactly these entries; this dense mask
        is ``O(N^2)``, for small meshes.
        """
        path = self._cache_path("pattern")
        if path is not None and path.exists():
            from safetensors.torch import load_file

            return load_file(path)["pattern"]
        stored = self._forms().pattern
        pattern = torch.zeros(self.n, self.n, dtype=torch.bool)
        pattern[stored.rows(), stored.indices] = True
        if path is not None:
            from safetensors.torch import save

            write_atomic(path, save({"pattern": pattern}))
        return pattern

    def _forms(self) -> Assembler:
        """The assembler of :mod:`femeta.problems.beam_family`'s forms, compiled on first use."""
        if self._assembler is None:
            self._assembler = Assembler(beam_source(self.cells))
            # Before any task scales the mesh: the vertices of the unit-width beam, snapped
            # to the lattice (tabulated coordinates carry rounding, e.g. -3e-18 for 0).
            space = self._assembler.bilinear.function_spaces[0]
            lattice = np.array(self.cells) / np.array([self.length, 1.0, 1.0])
            vertices = space.tabulate_dof_coordinates()[: self.n // 3]
            self._vertices = np.rint(vertices * lattice) / lattice
        return self._assembler

    def sample(self, count: int, seed: int) -> TaskSet:
        """Draw and assemble ``count`` tasks, deterministically from ``seed``.

        Fields: ``A`` (a :class:`SparseBatch` of ``count`` matrices ``N x N``, on the
        stored pattern), ``b`` ``(count, N)``, ``params``
        ``(count, 4)`` in the order of :attr:`param_names`, and ``features``
        ``(count, 7)`` in the order of :attr:`feature_names` (the parameters and
        the 1-, infinity- and Frobenius norms of ``A``, not normalised).
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        comm = world()
        path = self._cache_path("tasks", count=count, seed=int(seed))
        if comm.bcast(path is not None and path.exists(), root=0):
            return self._load(path)
        params = self.draw(count, seed)
        A, b = assemble_shared(self.assemble, params, comm)
        tasks = TaskSet({"A": A, "b": b, "params": params, "features": _features(params, A)})
        if path is not None:
            on_root(comm, lambda: self._store(path, tasks))
        return tasks

    def draw(self, count: int, seed: int) -> Tensor:
        """The parameters ``(count, 4)`` that :meth:`sample` assembles, without assembling."""
        generator = torch.Generator().manual_seed(int(seed))
        uniform = torch.rand(count, 4, generator=generator, dtype=torch.float64)
        low = torch.tensor([self.width_range[0], *[self.material_range[0]] * 3]).log()
        high = torch.tensor([self.width_range[1], *[self.material_range[1]] * 3]).log()
        return (low + uniform * (high - low)).exp()

    def split(self, name: str, seed: int) -> TaskSet:
        """The ``train``, ``validation`` or ``test`` split (of :attr:`splits` tasks)."""
        return self.sample(*split_size_and_seed(name, seed, self.splits))

    def _cache_path(self, kind: str, **key: int) -> Path | None:
        """Where a dataset (``kind="tasks"``) or the stored pattern is cached, or ``None``."""
        if self.cache_dir is None:
            return None
        key |= {"problem": self.name, "cells": self.cells, "length": self.length}
        if kind == "tasks":
            key |= {
                "format": _CACHE_FORMAT,
                "width_range": self.width_range,
                "material_range": self.material_range,
            }
            prefix = self.name
        else:
            prefix = f"{self.name}-{kind}"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.cache_dir / f"{prefix}-{digest}.safetensors"

    def _store(self, path: Path, tasks: TaskSet) -> None:
        from safetensors.torch import save

        A = tasks["A"]
        fields = {
            "indptr": A.indptr,
            "indices": A.indices,
            "values": A.values,
            "b": tasks["b"],
            "params": tasks["params"],
        }
        write_atomic(path, save(fields))

    def _load(self, path: Path) -> TaskSet:
        from safetensors.torch import load_file

        fields = load_file(path)
        A = SparseBatch(fields["indptr"], fields["indices"], fields["values"])
        params = fields["params"]
        return TaskSet(
            {"A": A, "b": fields["b"], "params": params, "features": _features(params, A)}
        )


def _check_params(params: Tensor) -> Tensor:
    if not isinstance(params, Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    if params.dim() != 2 or params.shape[1] != 4:
        raise ValueError(
            f"params must have shape (batch, 4) with columns {PARAM_NAMES}, "
            f"got {tuple(params.shape)}"
        )
    params = params.detach().to(dtype=torch.float64, device="cpu")
    bad = ~(torch.isfinite(params) & (params > 0))
    if bool(bad.any()):
        task, column = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"task {task} has {PARAM_NAMES[column]} = {float(params[task, column])!r}; "
            f"W, lambda, mu and rho must be positive finite numbers"
        )
    return params


def _features(params: Tensor, A: SparseBatch) -> Tensor:
    return torch.cat([params, A.norms()], dim=1)


def beam_source(cells: tuple[int, int, int]) -> FamilySource:
    """The family file :mod:`femeta.problems.beam_family` on a mesh of ``cells`` hexahedra;
    needs DOLFINx."""
    source = _beam_file()
    return replace(source, make=partial(source.make, cells=tuple(cells)))


@cache
def _beam_file() -> FamilySource:
    """The beam's family file, imported and hashed once per process."""
    return load_family("femeta.problems.beam_family:make")


def beam_system(
    comm: Any, cells: tuple[int, int, int], width: float, lam: float, mu: float, rho: float
) -> tuple[Any, Any, Any]:
    """One beam of the family as a FEniCS script assembles it, distributed over ``comm``.

    The forms of :mod:`femeta.problems.beam_family` on a mesh of ``cells`` hexahedra,
    assembled by :func:`~femeta.problems.family.family_system`: the Dirichlet rows are
    identity rows with zeroed columns, and the right-hand side is lifted. Unlike the
    datasets, ``A`` is not symmetrised.

    Returns:
        ``A`` (PETSc AIJ), ``b`` (PETSc vector) and the function space. Keep the
        space while using ``A`` and ``b``: they live on its mesh's communicator.
    """
    _check_params(torch.tensor([[width, lam, mu, rho]], dtype=torch.float64))
    values = dict(zip(PARAM_NAMES, (width, lam, mu, rho), strict=True))
    A, b, built = family_system(beam_source(cells), comm, values)
    return A, b, built["a"].arguments()[0].ufl_function_space()
