"""The package structure: the library never imports `weights_conversion` (the dependency goes
one way), and one error hierarchy gives every command its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import codi_eqx
from cli._common import CodiError, CodiUsageError, reported_errors
from codi_eqx.data import DataError
from codi_eqx.errors import UsageError
from codi_eqx.toy import BuiltinMissingError
from codi_eqx.train import CheckpointError, TrainConfigError, TrainingError
from codi_eqx.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]


def test_library_never_imports_weights_conversion():
    code = (
        "import sys\n"
        "import codi_eqx, codi_eqx.weights, codi_eqx.train, codi_eqx.sampling, codi_eqx.toy\n"
        "import codi_eqx.data, codi_eqx.distill\n"
        "codi_eqx.load_pipeline, codi_eqx.load_adapter, codi_eqx.Pipeline\n"
        "assert 'weights_conversion' not in sys.modules, 'codi_eqx imported weights_conversion'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr


def test_errors_package_costs_no_jax_import():
    code = "import sys, codi_eqx.errors; assert 'jax' not in sys.modules, 'jax imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_cli_error_classes_are_the_library_ones():
    assert CodiError is codi_eqx.CodiError
    assert CodiUsageError is UsageError is codi_eqx.UsageError


@pytest.mark.parametrize("error,builtin,code", [
    (WeightsError, ValueError, 1),
    (DataError, ValueError, 1),
    (TrainingError, RuntimeError, 1),
    (TrainConfigError, ValueError, 2),
    (CheckpointError, ValueError, 2),
    (BuiltinMissingError, FileNotFoundError, 2),
    (UsageError, Exception, 2),
    (CodiError, Exception, 1),
])
def test_exit_code_of_each_error(error, builtin, code):
    # Each keeps its builtin base, so that `except ValueError` code still catches it.
    assert issubclass(error, builtin) and issubclass(error, codi_eqx.CodiError)
    app = typer.Typer()

    @app.command()
    def fails() -> None:
        with reported_errors():
            raise error("what went wrong")

    result = CliRunner().invoke(app, [])
    assert result.exit_code == code, result.output
    assert "error: what went wrong" in result.output
    assert "Traceback" not in result.output
