"""A family of problems defined outside femeta: a user's DOLFINx forms and distributions.

A *family file* is a Python file (``path/to/family.py:make``) or an importable
module (``package.module:make``) that declares

- ``PARAMETERS``: a dict ``name -> (kind, low, high)`` with ``kind``
  ``"uniform"`` or ``"loguniform"`` (``0 < low``), one entry per parameter;
- optionally ``SPLITS``: a dict of the ``train``, ``validation`` and ``test``
  task counts (default :data:`DEFAULT_SPLITS`);
- optionally ``STATISTICS``: a dict ``name -> function(A) -> float`` of further
  statistics of the assembled ``petsc4py`` matrix ``A`` that Psi_nn reads as they
  come (return a log for one that spans decades); each is collective on ``A``'s
  communicator, so that every process of a script gets the same value;
- the named function, called once with an MPI communicator, which returns a dict
  with ``"a"`` (a symmetric positive definite bilinear UFL form), ``"L"`` (a
  linear form), ``"bcs"`` (a list of Dirichlet conditions) and ``"parameters"``
  (``name -> fem.Constant`` whose value a task sets, or a callable that applies a
  task's value, e.g. by interpolating a field or moving the mesh).

``PARAMETERS`` and ``SPLITS`` may come from a TOML file instead
(:func:`read_distributions`): its ``[parameters]`` table (``kappa = ["loguniform",
1.0, 1e4]``) and optional ``[splits]`` table replace the file's.

The forms are compiled once; each task sets the parameters and is assembled
serially (``MPI.COMM_SELF``) on DOLFINx's stored pattern, symmetrised, with
Dirichlet rows and columns replaced by identity and the conditions lifted into
``b``. Datasets are cached on disk, keyed by the file's contents and function and
the distributions. Example: ``examples/heterogeneous_poisson.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from femeta._fenics import import_dolfinx
from femeta._io import write_atomic
from femeta.family_file import (
    FamilyCode,
    FamilyError,
    failure,
    import_family,
    statistic_values,
)
from femeta.parallel import collective, merged, on_root, world
from femeta.problems.base import (
    TaskSet,
    assemble_shared,
    default_cache_dir,
    petsc_system,
    split_size_and_seed,
    stored_pattern,
)
from femeta.solvers.sparse import SparseBatch

__all__ = [
    "DEFAULT_SPLITS",
    "MATRIX_FEATURES",
    "Assembler",
    "Distribution",
    "Distributions",
    "FamilyError",
    "FamilySource",
    "UserFamily",
    "family_system",
    "load_family",
    "read_distributions",
]

#: Task counts of the splits when a family file declares no ``SPLITS``.
DEFAULT_SPLITS = {"train": 500, "validation": 100, "test": 100}
#: Statistics of each assembled ``A`` that Psi_nn may read beside the parameters (logs):
#: the range of the diagonal over the rows coupled to others (Dirichlet rows, which assembly
#: makes identity rows, are not), and two norms. A script computes them from its matrix alone.
MATRIX_FEATURES = ("log_diag_min", "log_diag_max", "log_norm_inf", "log_norm_fro")
KINDS = ("uniform", "loguniform")
# Format 3: CSR pattern once, the values, b, params and features (the file's STATISTICS
# included) of every task.
_CACHE_FORMAT = 3


@dataclass(frozen=True)
class Distribution:
    """The distribution of one parameter: uniform or log-uniform on ``[low, high]``."""

    kind: str
    low: float
    high: float

    @classmethod
    def parse(cls, name: str, value: Any, where: str) -> Distribution:
        """``(kind, low, high)`` as a family file or a distributions file declares it, checked."""
        usage = "give its kind, low and high, e.g. ['loguniform', 1.0, 1e4] or ['uniform', 0, 1]"
        if not (isinstance(value, tuple | list) and len(value) == 3):
            raise FamilyError(f"{where}: parameter {name!r} is {value!r}; {usage}")
        kind, low, high = value
        if kind not in KINDS:
            raise FamilyError(
                f"{where}: parameter {name!r} has kind {kind!r}; expected one of {list(KINDS)}"
            )
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise FamilyError(
                f"{where}: parameter {name!r} needs finite bounds low < high, got {(low, high)}"
            )
        if kind == "loguniform" and low <= 0:
            raise FamilyError(
                f"{where}: parameter {name!r} is log-uniform and needs 0 < low, got {low!r}"
            )
        return cls(kind, float(low), float(high))

    def draw(self, uniform: Tensor) -> Tensor:
        """Samples, from samples ``uniform`` of the uniform distribution on ``[0, 1)``."""
        bounds = torch.tensor([self.low, self.high], dtype=torch.float64)
        low, high = self.transform(bounds)
        return self.inverse(low + uniform * (high - low))

    def transform(self, values: Tensor) -> Tensor:
        """Values on the scale the distribution is uniform on: ``log`` for log-uniform."""
        return values.log() if self.kind == "loguniform" else values

    def inverse(self, values: Tensor) -> Tensor:
        """The inverse of :meth:`transform`."""
        return values.exp() if self.kind == "loguniform" else values


@dataclass(frozen=True)
class Distributions:
    """Distributions of the parameters, and optionally the splits, declared outside a family
    file (e.g. in a TOML file, :func:`read_distributions`); they replace the file's.

    Attributes:
        parameters: Each parameter's distribution, in the order declared.
        splits: The task counts of ``train``, ``validation`` and ``test`` (``None``: the
            family file's).
        origin: Where the parameters were declared, as errors name it.
    """

    parameters: dict[str, Distribution]
    splits: dict[str, int] | None
    origin: str

    @classmethod
    def parse(cls, tables: Any, where: str) -> Distributions:
        """The tables of a distributions file, ``{"parameters": {name: [kind, low, high]},
        "splits": {...}}`` (splits optional), checked; errors begin with ``where``."""
        if not isinstance(tables, Mapping):
            raise FamilyError(f"{where}: expected tables [parameters] and [splits], got {tables!r}")
        unknown = sorted(set(tables) - {"parameters", "splits"})
        if unknown:
            raise FamilyError(
                f"{where}: unknown entries {unknown}; a distributions file holds the table "
                "[parameters] and optionally [splits]"
            )
        declared = tables.get("parameters")
        if not isinstance(declared, Mapping) or not declared:
            raise FamilyError(
                f"{where} declares no [parameters] table: give each parameter as "
                'name = [kind, low, high], e.g. kappa = ["loguniform", 1.0, 1e4]'
            )
        parameters = _parameters(declared, where)
        splits = _splits(tables["splits"], f"{where}: [splits]") if "splits" in tables else None
        return cls(parameters, splits, f"[parameters] of {where}")

    def tables(self) -> dict[str, Any]:
        """The tables as a distributions file holds them (plain lists and numbers, for JSON)."""
        tables: dict[str, Any] = {
            "parameters": {name: [d.kind, d.low, d.high] for name, d in self.parameters.items()}
        }
        if self.splits is not None:
            tables["splits"] = dict(self.splits)
        return tables


def read_distributions(path: str | Path) -> Distributions:
    """The ``[parameters]`` and optional ``[splits]`` tables of the TOML file ``path``,
    checked: ``kappa = ["loguniform", 1.0, 1e4]`` under ``[parameters]`` for each
    parameter, ``train = 200``, ``validation = 50`` and ``test = 100`` under ``[splits]``."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FamilyError(f"distributions file {path} does not exist")
    try:
        with path.open("rb") as stream:
            tables = tomllib.load(stream)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FamilyError(f"{path} is not valid TOML: {err}") from None
    return Distributions.parse(tables, str(path))


@dataclass(frozen=True)
class FamilySource(FamilyCode):
    """A loaded family file (its code, :class:`FamilyCode`) with what it declares.

    Attributes:
        parameters: Each parameter's distribution, in the order declared.
        splits: The task counts of ``train``, ``validation`` and ``test``.
        digest: SHA-256 of the file's contents and the function's name.
        declared: Where the parameters were declared, as errors name it (e.g.
            ``PARAMETERS in FILE.py``).
    """

    parameters: dict[str, Distribution]
    splits: dict[str, int]
    digest: str
    declared: str

    def fail(self, doing: str, err: BaseException) -> FamilyError:
        """A :class:`FamilyError` for ``err``, raised while ``doing``, naming the file's line."""
        return failure(err, self.path, doing, self.label)


def load_family(spec: str, distributions: Distributions | None = None) -> FamilySource:
    """Load the family ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION`` and check its declarations.

    ``distributions`` replace the file's ``PARAMETERS`` (which it may then leave out) and,
    where they give splits, its ``SPLITS``.
    """
    code = import_family(spec)
    path = code.path
    splits = None
    if distributions is not None:
        parameters, declared = distributions.parameters, distributions.origin
        splits = distributions.splits
    else:
        table = getattr(code.module, "PARAMETERS", None)
        if not isinstance(table, Mapping) or not table:
            raise FamilyError(
                f"{path} declares no PARAMETERS: give a dict name -> (kind, low, high), e.g. "
                'PARAMETERS = {"kappa": ("loguniform", 1.0, 1e4)}, or give them in a TOML file '
                "(femeta train family --distributions FILE.toml)"
            )
        parameters, declared = _parameters(table, str(path)), f"PARAMETERS in {path}"
    if splits is None:
        splits = _splits(getattr(code.module, "SPLITS", DEFAULT_SPLITS), f"{path}: SPLITS")
    for name in code.statistics:
        if name in parameters:
            raise FamilyError(
                f"{path}: statistic {name!r} has the name of a parameter in {declared}; "
                "rename one of them"
            )
    function = code.spec.rsplit(":", 1)[1]
    digest = hashlib.sha256(path.read_bytes() + f":{function}".encode()).hexdigest()
    imported = {field.name: getattr(code, field.name) for field in fields(code)}
    return FamilySource(**imported, parameters=parameters, splits=splits, digest=digest,
                        declared=declared)  # fmt: skip


def _parameters(declared: Mapping[Any, Any], where: str) -> dict[str, Distribution]:
    parameters = {}
    for name, value in declared.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise FamilyError(f"{where}: parameter names must be identifiers, got {name!r}")
        parameters[name] = Distribution.parse(name, value, where)
    return parameters


def _splits(value: Any, where: str) -> dict[str, int]:
    if (
        not isinstance(value, Mapping)
        or set(value) != set(DEFAULT_SPLITS)
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()
        )
    ):
        raise FamilyError(
            f"{where} must give integers >= 1 for exactly {list(DEFAULT_SPLITS)}, got {value!r}"
        )
    return {name: int(value[name]) for name in DEFAULT_SPLITS}


class UserFamily:
    """The task space of a family file: sampled, assembled with DOLFINx and cached.

    Args:
        source: The loaded family file (:func:`load_family`).
        cache_dir: Where datasets are kept; :func:`default_cache_dir` when omitted.
        cache: Whether to keep and reuse them on disk.
        splits: Task counts of ``train``, ``validation`` and ``test`` in place of the file's.
    """

    name = "family"

    def __init__(
        self,
        source: FamilySource,
        cache_dir: str | Path | None = None,
        cache: bool = True,
        splits: Mapping[str, int] | None = None,
    ):
        self.source = source
        #: The task counts of the splits: ``splits``, else what the file declares.
        self.splits = dict(source.splits if splits is None else splits)
        self.param_names = tuple(source.parameters)
        self.feature_names = (*self.param_names, *MATRIX_FEATURES, *source.statistics)
        if not cache:
            self.cache_dir = None
        else:
            self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
        self._assembler: Assembler | None = None

    @property
    def n(self) -> int:
        """The unknowns of every task (compiles the forms on first use)."""
        return self._forms().n

    def _forms(self) -> Assembler:
        if self._assembler is None:
            self._assembler = Assembler(self.source)
        return self._assembler

    def draw(self, count: int, seed: int) -> Tensor:
        """The parameters ``(count, P)`` of :meth:`sample`, in :attr:`param_names` order."""
        generator = torch.Generator().manual_seed(int(seed))
        uniform = torch.rand(count, len(self.param_names), generator=generator,
                             dtype=torch.float64)  # fmt: skip
        columns = [d.draw(uniform[:, i]) for i, d in enumerate(self.source.parameters.values())]
        return torch.stack(columns, dim=1)

    def sample(self, count: int, seed: int) -> TaskSet:
        """Draw and assemble ``count`` tasks, deterministically from ``seed``.

        Fields: ``A`` (a :class:`SparseBatch`), ``b`` ``(count, N)``, ``params``
        ``(count, P)`` and ``features`` ``(count, P + 4 + S)`` in the order of
        :attr:`feature_names`: the parameters on the scale their distribution is
        uniform on (log for log-uniform ones), :data:`MATRIX_FEATURES`, then the S
        statistics of the file's ``STATISTICS``, as they come.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        comm = world()
        path = self._cache_path(count, int(seed))
        if comm.bcast(path is not None and path.exists(), root=0):
            return self._load(path)
        params = self.draw(count, seed)
        A, b = assemble_shared(self._forms(), params, comm)
        tasks = TaskSet({"A": A, "b": b, "params": params, "features": self._features(params, A)})
        if path is not None:
            on_root(comm, lambda: self._store(path, tasks))
        return tasks

    def split(self, name: str, seed: int) -> TaskSet:
        """The ``train``, ``validation`` or ``test`` split, of the sizes of :attr:`splits`."""
        return self.sample(*split_size_and_seed(name, seed, self.splits))

    def _features(self, params: Tensor, A: SparseBatch) -> Tensor:
        scaled = [d.transform(params[:, i]) for i, d in enumerate(self.source.parameters.values())]
        low, high = diagonal_range(A)
        norms = A.norms()
        stats = [low, high, norms[:, 1], norms[:, 2]]
        logs = [s.abs().clamp_min(1e-300).log() for s in stats]
        return torch.cat([torch.stack([*scaled, *logs], dim=1), self._statistics(A)], dim=1)

    def _statistics(self, A: SparseBatch) -> Tensor:
        """The file's ``STATISTICS`` of each matrix, ``(count, S)``: those of task ``k``
        computed on rank ``k mod size`` (as a serial PETSc matrix), then sent to all ranks."""
        source, comm = self.source, world()
        if not source.statistics:
            return torch.zeros(len(A), 0, dtype=torch.float64)

        def mine() -> dict[int, list[float]]:
            rows = {}
            for task in range(comm.rank, len(A), comm.size):
                matrix = _petsc_matrix(A, task)
                try:
                    values = statistic_values(matrix, source.statistics, source.path)
                finally:
                    matrix.destroy()
                rows[task] = list(values.values())
            return rows

        rows = merged(comm, collective(comm, mine))
        return torch.tensor([rows[task] for task in range(len(A))], dtype=torch.float64)

    def _cache_path(self, count: int, seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        key = {
            "format": _CACHE_FORMAT,
            "family": self.source.digest,
            "parameters": {name: [d.kind, d.low, d.high]
                           for name, d in self.source.parameters.items()},
            "count": count,
            "seed": seed,
        }  # fmt: skip
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        stem = self.source.path.stem
        return self.cache_dir / f"family-{stem}-{digest}.safetensors"

    def _store(self, path: Path, tasks: TaskSet) -> None:
        from safetensors.torch import save

        A = tasks["A"]
        fields = {"indptr": A.indptr, "indices": A.indices, "values": A.values}
        fields |= {name: tasks[name] for name in ("b", "params", "features")}
        write_atomic(path, save(fields))

    def _load(self, path: Path) -> TaskSet:
        from safetensors.torch import load_file

        fields = load_file(path)
        A = SparseBatch(fields.pop("indptr"), fields.pop("indices"), fields.pop("values"))
        return TaskSet({"A": A, **fields})


class Assembler:
    """The family's forms, compiled once on a serial mesh, and its stored pattern."""

    def __init__(self, source: FamilySource):
        import_dolfinx()
        from dolfinx import fem, la
        from mpi4py import MPI

        self.fem = fem
        self.source = source
        try:
            built = source.make(MPI.COMM_SELF)
        except Exception as err:
            raise source.fail("building the forms", err) from err
        self.setters = parameter_setters(source, built)
        try:
            self.bilinear = built["a"] if isinstance(built["a"], fem.Form) else fem.form(built["a"])
            self.linear = built["L"] if isinstance(built["L"], fem.Form) else fem.form(built["L"])
        except Exception as err:
            raise source.fail("compiling the forms", err) from err
        self.bcs = list(built["bcs"])
        if not all(isinstance(bc, fem.DirichletBC) for bc in self.bcs):
            raise FamilyError(f"{source.label}: 'bcs' must be a list of dolfinx.fem.DirichletBC")
        if self.bilinear.rank != 2 or self.linear.rank != 1:
            raise FamilyError(
                f"{source.label}: 'a' must be a bilinear and 'L' a linear form, got forms of "
                f"rank {self.bilinear.rank} and {self.linear.rank}"
            )
        space = self.bilinear.function_spaces[0]
        self.matrix = fem.create_matrix(self.bilinear, block_mode=la.BlockMode.expanded)
        self.n = space.dofmap.index_map.size_local * space.dofmap.index_map_bs
        self.pattern, self.order = stored_pattern(self.matrix, self.n)
        self.nnz = len(self.order)
        try:
            self.transposition = self.pattern.transposition()
        except ValueError:
            raise FamilyError(
                f"{source.label}: the matrix's pattern is not symmetric; ICCG needs a symmetric "
                "bilinear form with the same trial and test space"
            ) from None

    def __call__(self, params: Tensor) -> tuple[SparseBatch, Tensor]:
        """The matrices and right-hand sides of tasks ``params``."""
        fem, source = self.fem, self.source
        count = params.shape[0]
        values = torch.zeros(count, self.nnz, dtype=torch.float64)
        b = torch.zeros(count, self.n, dtype=torch.float64)
        vector = np.zeros(self.n)
        for task, row in enumerate(params.tolist()):
            for name, value in zip(self.setters, row, strict=True):
                try:
                    self.setters[name](value)
                except Exception as err:
                    raise source.fail(f"setting {name} = {value:g}", err) from err
            try:
                self.matrix.data[:] = 0.0
                fem.assemble_matrix(self.matrix, self.bilinear, bcs=self.bcs, diag=1.0)
                vector[:] = 0.0
                fem.assemble_vector(vector, self.linear)
                fem.apply_lifting(vector, [self.bilinear], bcs=[self.bcs])
                for bc in self.bcs:
                    bc.set(vector)
            except Exception as err:
                raise source.fail("assembling a task", err) from err
            assembled = torch.from_numpy(self.matrix.data[: self.nnz])[self.order]
            # Quadrature leaves A symmetric only up to rounding; IC(0) and CG expect it exact.
            values[task] = 0.5 * (assembled + assembled[self.transposition])
            b[task] = torch.from_numpy(vector[: self.n])
            if not bool(b[task].any()):
                shown = ", ".join(f"{k} = {v:g}" for k, v in zip(self.setters, row, strict=True))
                raise FamilyError(
                    f"{source.label}: the right-hand side is zero at {shown}; CG's relative "
                    "residual needs b != 0"
                )
        return self.pattern.with_values(values), b


def parameter_setters(source: FamilySource, built: Any) -> dict[str, Callable[[float], None]]:
    """How each parameter's value reaches the forms ``built`` (what the family's function
    returned), checked against the distributions."""
    from dolfinx import fem

    keys = ("a", "L", "bcs", "parameters")
    if not isinstance(built, Mapping) or set(keys) - set(built):
        got = sorted(built) if isinstance(built, Mapping) else type(built).__name__
        raise FamilyError(f"{source.label} must return a dict with keys {list(keys)}, got {got}")
    given = built["parameters"]
    if not isinstance(given, Mapping):
        raise FamilyError(f"{source.label}: 'parameters' must be a dict name -> fem.Constant")
    for name in given:
        if name not in source.parameters:
            raise FamilyError(
                f"{source.label} uses parameter {name!r}, which {source.declared} does not "
                "declare; add it there with its kind, low and high"
            )
    for name in source.parameters:
        if name not in given:
            raise FamilyError(
                f"{source.declared} declares {name!r}, but {source.label} returns no such "
                "entry in 'parameters'"
            )
    setters = {}
    for name, target in given.items():
        if isinstance(target, fem.Constant):
            setters[name] = _constant_setter(target)
        elif callable(target):
            setters[name] = target
        else:
            raise FamilyError(
                f"{source.label}: parameter {name!r} must be a fem.Constant or a callable "
                f"taking the value, got {type(target).__name__}"
            )
    return setters


def family_system(
    source: FamilySource, comm: Any, values: Mapping[str, float]
) -> tuple[Any, Any, Any]:
    """One task of the family as a script assembles it, distributed over ``comm``.

    ``values`` gives every parameter. Returns ``A`` (PETSc AIJ, Dirichlet rows made
    identity rows), ``b`` (the conditions lifted) and what the family's function
    returned; keep that while using ``A`` and ``b``, which live on its mesh's
    communicator.
    """
    import_dolfinx()
    from dolfinx import fem

    missing = [name for name in source.parameters if name not in values]
    unknown = [name for name in values if name not in source.parameters]
    if missing or unknown:
        wrong = f"no value for {missing}" if missing else f"unknown parameters {unknown}"
        raise FamilyError(
            f"{source.label}: {wrong}; give each of {list(source.parameters)} a value"
        )
    try:
        built = source.make(comm)
    except Exception as err:
        raise source.fail("building the forms", err) from err
    setters = parameter_setters(source, built)
    for name, value in values.items():
        try:
            setters[name](value)
        except Exception as err:
            raise source.fail(f"setting {name} = {value:g}", err) from err
    try:
        bilinear, linear = (
            form if isinstance(form, fem.Form) else fem.form(form)
            for form in (built["a"], built["L"])
        )
        A, b = petsc_system(bilinear, linear, list(built["bcs"]))
    except Exception as err:
        raise source.fail("assembling the task", err) from err
    return A, b, built


def diagonal_range(A: SparseBatch) -> tuple[Tensor, Tensor]:
    """The least and largest ``|A_ii|`` of each matrix over its rows coupled to others.

    Rows without a nonzero off the diagonal (Dirichlet rows) are left out, unless no row
    of a matrix is coupled.
    """
    diagonal, coupled = A.diagonal().abs(), A.coupled()
    coupled |= ~coupled.any(dim=1, keepdim=True)
    low = torch.where(coupled, diagonal, torch.inf).amin(dim=1)
    return low, torch.where(coupled, diagonal, 0.0).amax(dim=1)


def _petsc_matrix(A: SparseBatch, task: int) -> Any:
    """Matrix ``task`` of ``A`` as a serial PETSc AIJ matrix that stores A's pattern, zeros
    included, as a script's matrix stores them."""
    from mpi4py import MPI
    from petsc4py import PETSc

    indptr, indices = A.csr
    csr = (indptr, indices, A.values[task].cpu().numpy())
    return PETSc.Mat().createAIJ(A.shape[1:], csr=csr, comm=MPI.COMM_SELF)


def _constant_setter(constant: Any) -> Callable[[float], None]:
    def set_value(value: float) -> None:
        constant.value = value

    return set_value
