# Two commands: `make demo` and `make test`. Both set up .venv first (once).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MPI_TESTS := tests/test_mpi.py

.PHONY: demo demo-table3 test test-serial test-mpi lint clean

$(STAMP): pyproject.toml scripts/find-python.sh
	@if [ ! -x $(PY) ]; then \
		interpreter=$$(bash scripts/find-python.sh) || exit 1; \
		echo "creating $(VENV) with $$interpreter"; \
		$$interpreter -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[fenics,dev]'
	@touch $(STAMP)

# A quick elasticity run (20 of the paper's 200 epochs, L~_eps with our smoothed slope, PETSc
# solves on 2 processes), then Psi_nn beside Psi_base and Psi_best.
demo: $(STAMP)
	rm -rf runs/demo-elasticity
	$(VENV)/bin/femeta train elasticity --smooth 0.25 --engine petsc --workers 2 --epochs 20 \
		--out runs/demo-elasticity
	@echo "ICCG iterations to 1e-6 on the 1000 test beams (cap N = 243):"
	@for psi in "--model runs/demo-elasticity" "--baseline base" "--baseline best"; do \
		$(VENV)/bin/femeta evaluate elasticity $$psi || exit 1; done

demo-table3: $(STAMP)
	$(VENV)/bin/femeta reproduce table3 --quick --out runs/table3-quick

test: $(STAMP)
	$(MAKE) --no-print-directory test-serial test-mpi

test-serial: $(STAMP)
	$(PY) -m pytest -q

test-mpi: $(STAMP)
	$(VENV)/bin/mpiexec -n 2 bash scripts/rank0-output.sh $(PY) -m pytest -q -m mpi -p no:cacheprovider $(MPI_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
