"""The command line as a new user meets it: no PyTorch banner, `codi --version`, help texts
that reflow as paragraphs."""

import os
import subprocess
import sys
import textwrap

from codi_eqx import __version__


def _codi(args, tmp_path, *, block_torch=False):
    env = dict(os.environ, COLUMNS="200", TERM="dumb")
    env.pop("TRANSFORMERS_VERBOSITY", None)
    if block_torch:  # the default install has no PyTorch
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    code = "from cli.main import app; app()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_version(tmp_path):
    r = _codi(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"codi-eqx {__version__}"


def test_no_pytorch_banner_without_torch(tmp_path):
    # transformers prints "PyTorch was not found. ..." when imported with torch missing.
    r = _codi(["sample", "--help"], tmp_path, block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "PyTorch was not found" not in r.stderr + r.stdout


def test_help_paragraphs_are_not_broken_mid_sentence(tmp_path):
    r = _codi(["demo", "--help"], tmp_path)
    assert r.returncode == 0
    flat = " ".join(line.strip(" │") for line in r.stdout.splitlines())
    sentence = ("Run the whole job on the built-in default: distil the shipped shapes teacher "
                "(a small Stable Diffusion trained on synthetic coloured shapes)")
    assert sentence in " ".join(flat.split())
    # At 200 columns the sentence sits on one line: no hard break inside it.
    assert any(textwrap.shorten(sentence, 120, placeholder="") in line
               for line in r.stdout.splitlines())
