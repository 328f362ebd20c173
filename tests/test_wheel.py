"""The wheel installs anywhere: built from the checkout, installed (not editable) into a fresh
virtual environment and used from a directory outside the checkout, it tokenizes with its own
tokenizer, trains, evaluates and prunes, and its command line runs. Shipped models are then
found only through CSPKIT_MODELS (or an explicit path), and the error says so."""
import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    import cspkit
    from cspkit.config import PruneConfig

    out = {"cspkit": cspkit.__file__}
    enc = cspkit.get_encoding()
    out["tokens"] = enc.encode("def f(x):\\n    return x\\n")
    package = str(pathlib.Path(cspkit.__file__).parent)   # a small corpus: the installed package's source
    mcfg, tcfg = cspkit.config_for("tiny", max_steps=6, eval_interval=3, eval_batches=1, corpus=[package])
    model = cspkit.train(mcfg, tcfg, "run", progress=False)
    out["eval"] = cspkit.evaluate(model, "single_double_quote", n=8)["accuracy"]
    model = cspkit.load("run")
    circuit = cspkit.prune(model, "single_double_quote", target=10.0, config=PruneConfig(steps=2, batch_pairs=4,
                           heldout_pairs=16, calib_pairs=8), progress=False)
    circuit.save("circuit.json")
    out["circuit"] = circuit.n_nodes
    try:
        cspkit.load("small-sparse")
    except FileNotFoundError as e:
        out["no_models"] = str(e)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh virtual environment with the wheel installed. Its dependencies come from the
    test's own environment through a path entry (installing torch and jupyterlab again would
    take minutes and the network); cspkit itself comes only from the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, cwd=root)
    (wheel,) = (root / "dist").glob("cspkit-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "outer_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def run_outside(env_dir: Path, args: list, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CSPKIT_MODELS", "PYTHONPATH")}
    clean.update(CSPKIT_CACHE=str(tmp_path / "cache"), **env)
    return subprocess.run(args, cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=600)


def test_the_installed_wheel_works_outside_the_checkout(wheel_env, tmp_path):
    import json
    res = run_outside(wheel_env, [wheel_env / "bin" / "python", "-c", SCRIPT], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["cspkit"].startswith(str(wheel_env)), "cspkit was imported from somewhere else than the wheel"
    assert len(out["tokens"]) > 3 and 0 <= out["eval"] <= 1 and (tmp_path / "circuit.json").is_file()
    for way in ("CSPKIT_MODELS", "explicitly", "checkout"):
        assert way in out["no_models"], out["no_models"]


def test_the_installed_command_line_runs_and_finds_models_through_the_environment(wheel_env, tmp_path):
    cli = wheel_env / "bin" / "cspkit"
    res = run_outside(wheel_env, [cli, "--help"], tmp_path)
    assert res.returncode == 0 and "prune" in res.stdout, res.stderr
    res = run_outside(wheel_env, [cli, "info", "small-hour", "--json"], tmp_path,
                      CSPKIT_MODELS=str(REPO / "data" / "models"))
    assert res.returncode == 0, res.stderr
    assert '"params"' in res.stdout
