"""How many CG iterations an initial guess in a reference eigenbasis saves on heterogeneous Poisson.

Run from the repository root, with femeta importable (installed, or ``PYTHONPATH=.``)::

    .venv/bin/python benchmarks/studies/family_eigen_guess.py [--k 8 16 32 64] [--json out.json]

The tasks are those of ``examples/heterogeneous_poisson.py`` (Q1, 10,201 unknowns, kappa
constant on each quadrant and log-uniform on [1, 1e4]): its ``train`` and ``test`` splits.
The reference operator is ``A`` at one constant kappa (``--reference-kappa``); SLEPc
(shift-and-invert about 0) gives the ``k`` lowest eigenvectors of its block on the
unconstrained rows, so the basis ``V`` is zero on the Dirichlet rows and the eigenvalue 1
that DOLFINx puts there never enters it. Every constant kappa gives the same eigenvectors;
the script checks this against kappa = 1 (largest principal angle).

For each ``k`` and each initial guess it counts the iterations of CG to
``||b - A x_k|| <= tol ||b||`` on the test tasks, with PETSc's KSP (the norm
unpreconditioned, as femeta counts) and three preconditioners: none, Jacobi, and ICC(0)
with PETSc's default shift. The guesses:

- ``zero``;
- ``galerkin``: ``V (V^T A V)^-1 V^T b``, the best guess in span(V) in the A-norm
  (``k`` matvecs per task, no learning);
- ``projection``: ``V V^T x*``, the true solution projected onto span(V);
- ``learned``: ``x0 = s V c`` with ``c`` from an MLP of the standardised log kappas and
  wave and ``s = 1 / min kappa``; first fitted to the Galerkin coefficients (relative
  A-norm error of the guess), then trained on the surrogate L~_eps of the iteration
  count (``femeta.losses.iteration_surrogate``) through a differentiable Jacobi-PCG in
  torch (the stopping decisions are not differentiated);
- ``instance-modes`` and ``instance-jacobi-modes`` (on the first ``--ceiling-tasks``
  test tasks): the exact solution's part in the ``k`` lowest eigenvectors of the task's
  own ``A`` (resp. of ``A v = lambda diag(A) v``), i.e. the ceiling for a guess that gets
  ``k`` modes exactly right.

Beside the iterations it prints, for each guess, the mean log10 of the initial relative
residual ``||b - A x0|| / ||b||`` and of the relative A-norm error ``||x0 - x*||_A /
||x*||_A``: how much of the solve a guess does before CG starts; and how much of the span
of each task's own ``k`` modes span(V) holds (mean squared cosine of the principal
angles). Wall times of each part are printed and saved with the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from femeta._fenics import import_dolfinx
from femeta.losses import iteration_surrogate
from femeta.metasolvers import MLP
from femeta.problems.family import UserFamily, load_family
from femeta.solvers.base import SolverResult
from femeta.solvers.sparse import SparseBatch

FAMILY = "examples/heterogeneous_poisson.py:make"
PRECONDITIONERS = ("none", "jacobi", "icc")
INPUTS = 5  # the four log kappas and the wave amplitude


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64], help="basis sizes")
    parser.add_argument("--tol", type=float, default=1e-6, help="relative residual to reach")
    parser.add_argument("--seed", type=int, default=0, help="seed of the family's splits")
    parser.add_argument("--train", type=int, default=200, help="training tasks used")
    parser.add_argument("--test", type=int, default=100, help="test tasks used")
    parser.add_argument(
        "--reference-kappa",
        type=float,
        default=100.0,
        help="the constant kappa of the reference operator",
    )
    parser.add_argument(
        "--ceiling-tasks",
        type=int,
        help="test tasks whose own eigenvectors give the ceiling (default: all)",
    )
    parser.add_argument(
        "--fit-steps", type=int, default=3000, help="Adam steps fitting the Galerkin coefficients"
    )
    parser.add_argument(
        "--surrogate-epochs",
        type=int,
        default=2,
        help="epochs on the surrogate L~_eps through Jacobi-PCG (0: none)",
    )
    parser.add_argument("--batch", type=int, default=10, help="tasks per surrogate step")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="MLP widths")
    parser.add_argument(
        "--plain-cg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also count unpreconditioned CG (about 2000 iterations a task)",
    )
    parser.add_argument("--json", type=Path, help="where to save the numbers")
    return parser.parse_args()


class Reference:
    """The family's forms assembled by DOLFINx at chosen parameters, as PETSc matrices."""

    def __init__(self, family: UserFamily):
        import_dolfinx()
        from dolfinx import fem
        from mpi4py import MPI

        built = family.source.make(MPI.COMM_SELF)
        self.fem = fem
        self.form = fem.form(built["a"])
        self.bcs = built["bcs"]
        self.constants = built["parameters"]
        constrained = np.concatenate([bc.dof_indices()[0] for bc in self.bcs])
        n = self.form.function_spaces[0].dofmap.index_map.size_local
        self.free = np.setdiff1d(np.arange(n), constrained).astype(np.int32)

    def matrix(self, values: dict[str, float]):
        from dolfinx.fem.petsc import assemble_matrix

        for name, value in values.items():
            self.constants[name].value = value
        matrix = assemble_matrix(self.form, bcs=self.bcs, diag=1.0)
        matrix.assemble()
        return matrix


def lowest_eigenpairs(matrix, free: np.ndarray, count: int, diagonal_weight: bool = False):
    """The ``count`` lowest eigenpairs of ``matrix`` on the rows and columns ``free``.

    With ``diagonal_weight`` the problem is ``A v = lambda diag(A) v``. The vectors are
    returned at full size, zero on the other rows, orthonormal (``diag(A)``-orthonormal
    with ``diagonal_weight``).
    """
    from petsc4py import PETSc
    from slepc4py import SLEPc

    rows = PETSc.IS().createGeneral(free, comm=PETSc.COMM_SELF)
    block = matrix.createSubMatrix(rows, rows)
    eps = SLEPc.EPS().create(PETSc.COMM_SELF)
    eps.setOptionsPrefix("eigen_guess_")
    if diagonal_weight:
        weight = block.getDiagonal()
        diagonal = PETSc.Mat().createAIJ(block.getSize(), nnz=1, comm=PETSc.COMM_SELF)
        diagonal.setDiagonal(weight)
        diagonal.assemble()
        eps.setOperators(block, diagonal)
        eps.setProblemType(SLEPc.EPS.ProblemType.GHEP)
    else:
        eps.setOperators(block)
        eps.setProblemType(SLEPc.EPS.ProblemType.HEP)
    eps.setDimensions(count)
    eps.setTarget(0.0)
    eps.setWhichEigenpairs(SLEPc.EPS.Which.TARGET_MAGNITUDE)
    transform = eps.getST()
    transform.setType(SLEPc.ST.Type.SINVERT)
    transform.getKSP().setType("preonly")
    transform.getKSP().getPC().setType("cholesky")
    eps.setTolerances(1e-10, 500)
    eps.solve()
    if eps.getConverged() < count:
        raise RuntimeError(f"SLEPc found {eps.getConverged()} of {count} eigenpairs")
    values, vectors = [], np.zeros((matrix.getSize()[0], count))
    vector = block.createVecRight()
    for index in range(count):
        values.append(eps.getEigenpair(index, vector).real)
        vectors[free, index] = vector.getArray()
    order = np.argsort(values)
    return np.asarray(values)[order], vectors[:, order]


def krylov_iterations(A: SparseBatch, b: torch.Tensor, x0: torch.Tensor, pc: str, tol: float):
    """CG iterations of PETSc's KSP for each task from ``x0``, to ``||r|| <= tol ||b||``."""
    from petsc4py import PETSc

    indptr, indices = A.csr
    n = A.shape[1]
    counts = []
    for task in range(A.shape[0]):
        matrix = PETSc.Mat().createAIJ(
            size=(n, n), csr=(indptr, indices, A.values[task].numpy()), comm=PETSc.COMM_SELF
        )
        ksp = PETSc.KSP().create(PETSc.COMM_SELF)
        ksp.setOptionsPrefix(f"eigen_guess_{pc}_")
        ksp.setOperators(matrix)
        ksp.setType("cg")
        ksp.getPC().setType(pc)
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        ksp.setTolerances(rtol=tol, atol=0.0, max_it=100_000)
        ksp.setInitialGuessNonzero(True)
        x = PETSc.Vec().createWithArray(x0[task].detach().numpy().copy(), comm=PETSc.COMM_SELF)
        rhs = PETSc.Vec().createWithArray(b[task].numpy().copy(), comm=PETSc.COMM_SELF)
        ksp.solve(rhs, x)
        if ksp.getConvergedReason() <= 0:
            raise RuntimeError(f"CG ({pc}) did not converge on task {task}")
        counts.append(ksp.getIterationNumber())
        for item in (ksp, matrix, x, rhs):
            item.destroy()
    return np.asarray(counts)


class SymmetricProduct(torch.autograd.Function):
    """``A x`` for symmetric ``A``, whose backward is again ``A v``: torch's own backward of a
    sparse CSR product transposes the matrix at every call, which dominates training."""

    @staticmethod
    def forward(ctx, x, A):
        ctx.A = A
        return A.matvec(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.A.matvec(grad), None


def jacobi_pcg(A: SparseBatch, b: torch.Tensor, x0: torch.Tensor, tol: float, cap: int):
    """Jacobi-preconditioned CG in torch, differentiable in ``x0``; history ``||r_k|| / ||b||``."""
    inverse_diagonal = 1 / A.diagonal()
    norm_b = b.norm(dim=1)
    x = x0
    r = b - SymmetricProduct.apply(x, A)
    z = inverse_diagonal * r
    p, rz = z, (r * z).sum(1)
    error = r.norm(dim=1) / norm_b
    active = error > tol
    history, iterations = [error], torch.zeros(b.shape[0], dtype=torch.int64)
    while bool(active.any()) and int(iterations.max()) < cap:
        Ap = SymmetricProduct.apply(p, A)
        step = torch.where(active, rz / (p * Ap).sum(1), 0.0)
        x = x + step[:, None] * p
        r = r - step[:, None] * Ap
        iterations = iterations + active.long()
        error = r.norm(dim=1) / norm_b
        history.append(torch.where(active, error, 0.0))
        active = active & (error > tol)
        z = inverse_diagonal * r
        rz_next = (r * z).sum(1)
        p = z + (rz_next / rz)[:, None] * p
        rz = rz_next
    return SolverResult(x, iterations, torch.stack(history, dim=1), ~active)


def galerkin(V: torch.Tensor, A: SparseBatch, b: torch.Tensor):
    """The Galerkin coefficients ``(V^T A V)^-1 V^T b`` and ``V^T A V`` of each task."""
    AV = A.matvec(V.expand(b.shape[0], *V.shape).contiguous())
    gram = V.T @ AV
    gram = 0.5 * (gram + gram.transpose(1, 2))
    return torch.linalg.solve(gram, b @ V), gram


def guess_quality(A: SparseBatch, b: torch.Tensor, solution: torch.Tensor, x0: torch.Tensor):
    """Mean log10 of the initial relative residual and of the relative A-norm error."""
    residual = (b - A.matvec(x0)).norm(dim=1) / b.norm(dim=1)
    error = x0 - solution
    energy = (error * A.matvec(error)).sum(1) / (solution * A.matvec(solution)).sum(1)
    return float(residual.log10().mean()), float(0.5 * energy.log10().mean())


class FeatureBasisGuess(torch.nn.Module):
    """Like ``EigenbasisGuess``, but the MLP reads the task's parameters, not its ``f``."""

    def __init__(self, basis: torch.Tensor, hidden: list[int]):
        super().__init__()
        self.register_buffer("basis", basis)
        self.network = MLP(INPUTS, hidden, basis.shape[1])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs) @ self.basis.T


def train_guess(k, V, train, scale, gram, target, args):
    """A :class:`FeatureBasisGuess` fitted to the Galerkin coefficients, then trained on L~_eps."""
    torch.manual_seed(k)
    model = FeatureBasisGuess(V, args.hidden)
    features = train["inputs"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaled = target / scale[:, None]
    norm = torch.einsum("ti,tij,tj->t", scaled, gram, scaled)
    for _ in range(args.fit_steps):
        optimizer.zero_grad()
        miss = model.network(features) - scaled
        loss = (torch.einsum("ti,tij,tj->t", miss, gram, miss) / norm).mean()
        loss.backward()
        optimizer.step()
    fit_loss = float(loss.detach())
    surrogate = []
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(k)
    count = features.shape[0]
    for _ in range(args.surrogate_epochs):
        total = 0.0
        for batch in torch.randperm(count, generator=generator).split(args.batch):
            A = train["A"][batch]
            x0 = scale[batch, None] * model(features[batch])
            result = jacobi_pcg(A, train["b"][batch], x0, args.tol, 2000)
            loss = iteration_surrogate(result, args.tol).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        surrogate.append(total / count)
    return model, fit_loss, surrogate


def main() -> None:
    args = arguments()
    torch.set_num_threads(1)
    import_dolfinx()
    from petsc4py import PETSc

    times: dict[str, float] = {}
    clock = time.perf_counter()

    family = UserFamily(load_family(FAMILY))
    train, test = (family.split(name, args.seed) for name in ("train", "test"))
    train = {name: train[name][: args.train] for name in ("A", "b", "features")}
    test = {name: test[name][: args.test] for name in ("A", "b", "features")}
    mean, std = train["features"][:, :INPUTS].mean(0), train["features"][:, :INPUTS].std(0)
    for split in (train, test):
        split["inputs"] = (split["features"][:, :INPUTS] - mean) / std
        split["scale"] = split["features"][:, :4].amin(1).neg().exp()  # 1 / min kappa
    times["sample"] = time.perf_counter() - clock

    clock = time.perf_counter()
    reference = Reference(family)
    names = list(family.param_names)
    first = dict(zip(names, family.draw(1, args.seed)[0].tolist(), strict=True))
    A0 = SparseBatch.from_csr(*reference.matrix(first).getValuesCSR())
    A0 = A0.with_values(0.5 * (A0.values + A0.values[:, A0.transposition()]))
    probe = torch.randn(1, A0.shape[1], dtype=torch.float64)
    drawn = family.sample(1, args.seed)["A"]
    if not torch.allclose(A0.matvec(probe), drawn.matvec(probe), rtol=1e-10, atol=1e-8):
        raise RuntimeError("the reference assembly does not order the unknowns as the tasks do")
    kmax = max(args.k)
    constant = {name: args.reference_kappa for name in names if name.startswith("kappa")}
    matrix = reference.matrix({**constant, "wave": 0.0})
    eigenvalues, vectors = lowest_eigenpairs(matrix, reference.free, kmax)
    times["reference_eigenpairs"] = time.perf_counter() - clock
    unit = {name: 1.0 for name in constant}
    unit_values, unit_vectors = lowest_eigenpairs(
        reference.matrix({**unit, "wave": 0.0}), reference.free, kmax
    )
    V = torch.from_numpy(vectors)
    # Eigenvalues repeat on the square, so a cut at k may split a cluster; compare spans
    # against the whole kappa = 1 basis instead.
    unit_span = torch.from_numpy(unit_vectors)
    angles = {}
    for k in args.k:
        cosines = torch.linalg.svdvals(V[:, :k].T @ unit_span)
        angles[k] = math.degrees(math.acos(min(1.0, float(cosines.min()))))
    print(
        f"reference kappa {args.reference_kappa:g}: lowest eigenvalues "
        f"{eigenvalues[0]:.4g} .. {eigenvalues[-1]:.4g} ({times['reference_eigenpairs']:.1f} s "
        f"with assembly); ratio to kappa = 1: {np.ptp(eigenvalues / unit_values):.2g} spread; "
        f"largest angle to the span of the kappa = 1 basis per k (degrees): "
        f"{ {k: round(a, 6) for k, a in angles.items()} }"
    )

    clock = time.perf_counter()
    test["solution"] = jacobi_pcg(
        test["A"], test["b"], torch.zeros_like(test["b"]), 1e-13, 20_000
    ).x
    times["test_solutions"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ceiling = args.test if args.ceiling_tasks is None else min(args.ceiling_tasks, args.test)
    instance_modes = {True: [], False: []}
    ceiling_A = test["A"][torch.arange(ceiling)]
    indptr, indices = ceiling_A.csr
    n = ceiling_A.shape[1]
    for task in range(ceiling):
        task_matrix = PETSc.Mat().createAIJ(
            size=(n, n),
            csr=(indptr, indices, ceiling_A.values[task].numpy()),
            comm=PETSc.COMM_SELF,
        )
        for weighted in (False, True):
            instance_modes[weighted].append(
                lowest_eigenpairs(task_matrix, reference.free, kmax, diagonal_weight=weighted)
            )
        task_matrix.destroy()
    times["instance_eigenpairs"] = time.perf_counter() - clock

    pcs = PRECONDITIONERS if args.plain_cg else PRECONDITIONERS[1:]
    rows = []

    def record(k, guess, A, b, solution, x0, tasks):
        start = time.perf_counter()
        residual, energy = guess_quality(A, b, solution, x0)
        row = {
            "k": k,
            "guess": guess,
            "tasks": tasks,
            "log10_residual0": residual,
            "log10_energy_error0": energy,
        }
        for pc in pcs:
            row[pc] = float(krylov_iterations(A, b, x0, pc, args.tol).mean())
        times[f"count_{guess}_{k}"] = time.perf_counter() - start
        rows.append(row)
        shown = "  ".join(f"{pc} {row[pc]:7.1f}" for pc in pcs)
        print(
            f"k {k:3d}  {guess:22s} tasks {tasks:3d}  {shown}  "
            f"log10 r0 {residual:6.2f}  log10 e0_A {energy:6.2f}",
            flush=True,
        )

    A, b, solution = test["A"], test["b"], test["solution"]
    zero = torch.zeros_like(b)
    record(0, "zero", A, b, solution, zero, args.test)
    head = torch.arange(ceiling)
    if ceiling < args.test:
        record(0, "zero", A[head], b[head], solution[head], zero[head], ceiling)
    training, overlaps = {}, {}
    for k in args.k:
        basis = V[:, :k]
        coefficients, _ = galerkin(basis, A, b)
        record(k, "galerkin", A, b, solution, coefficients @ basis.T, args.test)
        record(k, "projection", A, b, solution, (solution @ basis) @ basis.T, args.test)
        for weighted, label in ((False, "instance-modes"), (True, "instance-jacobi-modes")):
            # how much of the span of the task's own k modes span(V) holds: mean squared cosine
            overlap = np.mean(
                [
                    np.linalg.norm(vectors[:, :k].T @ np.linalg.qr(modes[:, :k])[0]) ** 2 / k
                    for _, modes in instance_modes[weighted]
                ]
            )
            overlaps[f"{label}_{k}"] = float(overlap)
            print(f"k {k:3d}  span(V) holds {overlap:.3f} of the span of the {label}")
            x0 = torch.stack(
                [
                    torch.from_numpy(
                        vectors[:, :k] @ (vectors[:, :k].T @ b[task].numpy() / values[:k])
                    )
                    for task, (values, vectors) in enumerate(instance_modes[weighted])
                ]
            )
            record(k, label, A[head], b[head], solution[head], x0, ceiling)
        clock = time.perf_counter()
        target, gram = galerkin(basis, train["A"], train["b"])
        model, fit_loss, surrogate = train_guess(
            k, basis, train, train["scale"], gram, target, args
        )
        times[f"train_{k}"] = time.perf_counter() - clock
        training[k] = {"fit_relative_energy_loss": fit_loss, "surrogate_per_epoch": surrogate}
        print(
            f"k {k:3d}  training: fit loss {fit_loss:.3g}, surrogate per epoch "
            f"{[round(s, 1) for s in surrogate]}, {times[f'train_{k}']:.0f} s"
        )
        with torch.no_grad():
            x0 = test["scale"][:, None] * model(test["inputs"])
        record(k, "learned", A, b, solution, x0, args.test)

    print(f"times (s): { {name: round(value, 1) for name, value in times.items()} }")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "command": vars(args) | {"json": str(args.json)},
                    "reference_eigenvalues": eigenvalues.tolist(),
                    "angle_to_unit_kappa_basis_degrees": angles,
                    "rows": rows,
                    "training": training,
                    "overlap_with_instance_modes": overlaps,
                    "times_s": times,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
