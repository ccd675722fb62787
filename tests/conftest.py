"""Shared test helpers."""

import pytest
from typer.testing import CliRunner

from femeta.cli import app


@pytest.fixture(scope="session")
def invoke():
    """Run the femeta CLI in-process; arguments may be paths or numbers."""
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])
