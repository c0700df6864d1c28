"""``pip install .``: the wheel installs the core, every family package and the console commands, which run from
outside the clone; a family package added to the tree is registered without any edit to the core.

The wheel is built once (no network: ``--no-build-isolation`` with the setuptools torch depends on) from a copy of
the tree plus one extra family package, and installed without dependencies into a fresh venv that sees this test
environment's packages (torch, transformers) through a ``.pth`` file, so nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, _bootstrap, reference_megatron_gpt2, tiny_gpt2

PROBE_FAMILY = '''
import dataclasses
from checkpoint_convert.model.family import register
from llama.family import LLAMA
PROBE = register(dataclasses.replace(LLAMA, name="probe", hf_model_types=("probe",)))
'''


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    tree = root / "src"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                               "__pycache__", ".pytest_cache"))
    (tree / "probe_family").mkdir()
    (tree / "probe_family" / "__init__.py").write_text("from .family import PROBE  # noqa: F401\n")
    (tree / "probe_family" / "family.py").write_text(PROBE_FAMILY)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", root / "wheels", tree], root, env)
    assert built.returncode == 0, built.stderr
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", venv], root, env).returncode == 0
    venv_site = next((venv / "lib").glob("python*/site-packages"))
    (venv_site / "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next((root / "wheels").glob("megatron_hf_convert-*.whl"))
    done = _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], root, env)
    assert done.returncode == 0, done.stderr
    work = root / "work"  # outside the clone and the copy
    reference_megatron_gpt2(tiny_gpt2(None), work / "gpt2_tp2", tp=2, pp=1, schema="legacy")
    return venv / "bin", work, env


def test_wheel_holds_the_core_every_family_and_the_commands(installed):
    bin_dir, work, env = installed
    where = _run([bin_dir / "python", "-c", "import checkpoint_convert, llama; print(checkpoint_convert.__file__)"],
                 work, env)
    assert "/venv/lib/" in where.stdout and str(REPO) not in where.stdout
    for command in ("megatron-hf-convert", "megatron-hf-inspect", "megatron-hf-verify"):
        assert (bin_dir / command).is_file()
    usage = _run([bin_dir / "megatron-hf-convert", "--help"], work, env)
    families = ", ".join(sorted((*_bootstrap.FAMILIES, "probe")))  # probe: found, not named
    assert usage.returncode == 0 and f"model family: {families} (" in " ".join(usage.stdout.split())


def test_installed_commands_convert_inspect_and_verify_from_outside_the_clone(installed):
    bin_dir, work, env = installed
    converted = _run([bin_dir / "megatron-hf-convert", "--load_path", "gpt2_tp2", "--save_path", "hf", "--to", "hf",
                      "--quiet"], work, env)
    assert converted.returncode == 0, converted.stderr
    record = json.loads((work / "hf" / "conversion.json").read_text())
    assert record["tool"] == {"name": "megatron-hf-convert", "version": "0.1.0"}
    assert record["command"][0] == "megatron-hf-convert"
    inspected = _run([bin_dir / "megatron-hf-inspect", "hf"], work, env)
    assert inspected.returncode == 0 and "made by: megatron-hf-convert 0.1.0" in inspected.stdout
    verified = _run([bin_dir / "megatron-hf-verify", "gpt2_tp2", "hf"], work, env)
    assert verified.returncode == 0 and verified.stdout.rstrip().endswith("EQUAL")
    as_module = _run([bin_dir / "python", "-m", "checkpoint_convert", "convert", "--load_path", "hf", "--save_path",
                      "m", "--to", "megatron", "--dry_run", "--json"], work, env)
    assert as_module.returncode == 0 and json.loads(as_module.stdout)["target"]["format"] == "megatron torch"
    assert not (work / "m").exists()
    bad = _run([bin_dir / "megatron-hf-inspect", "missing"], work, env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
