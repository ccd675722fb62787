# Two commands: `make demo` and `make test`. Both set up .venv first (once).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MPI_TESTS := tests/test_mpi.py tests/test_parallel.py tests/test_petsc.py tests/test_fenics_api.py

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

# A quick elasticity run with the best known settings (20 of the paper's 200 epochs), then the
# learned shift beside Psi_base, Psi_best and PETSc's ICC with its default shift, all solved as
# PETSc KSPs shared over 2 MPI ranks (Psi_best's 31 shifts per beam take minutes in torch).
DEMO_RUN := runs/demo-elasticity
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/mpiexec -n 2 $(VENV)/bin/femeta train elasticity --epochs 20 --out $(DEMO_RUN)
	@echo "CG iterations to 1e-6 on the 1000 test beams (cap N = 243), solved in PETSc:"
	@for row in "learned shift:--model $(DEMO_RUN)" "Psi_base, one shift:--baseline base" \
		"Psi_best, best of 31 shifts:--baseline best" "PETSc ICC, default shift:--baseline petsc"; do \
		printf '%-29s ' "$${row%%:*}"; \
		$(VENV)/bin/mpiexec -n 2 $(VENV)/bin/femeta evaluate elasticity $${row#*:} --engine petsc || exit 1; done

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
