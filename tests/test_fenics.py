"""femeta without DOLFINx: the torch parts work, DOLFINx parts say how to install it."""

import subprocess
import sys

WITHOUT_DOLFINX = """
import sys
sys.modules["dolfinx"] = None  # makes `import dolfinx` fail as if it were not installed
sys.modules["dolfinx_solver"] = None
from femeta._fenics import MissingFenicsError, has_dolfinx, import_dolfinx
from femeta.problems.elasticity import ElasticBeam
from femeta.workflow import TrainOptions, evaluate_metasolver, train_metasolver
assert not has_dolfinx()
try:
    import_dolfinx()
except MissingFenicsError as err:
    assert "pip install 'femeta[fenics]'" in str(err), err
else:
    raise AssertionError("import_dolfinx should fail")
try:
    ElasticBeam(cache=False).sample(2, seed=0)
except MissingFenicsError:
    pass
else:
    raise AssertionError("assembling a beam needs DOLFINx")
experiment, psi, _ = train_metasolver(TrainOptions(loss="m", m=1, epochs=1))
stats = evaluate_metasolver(experiment, psi, 1e-2)
assert stats.summary()["n_tasks"] == 1000
print("ok")
"""


def test_torch_parts_work_without_dolfinx():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_DOLFINX], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
