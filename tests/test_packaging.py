"""fusion_rl works from a built wheel, outside the clone, and its core needs no optional extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What the [train] and [hf] extras provide; the core must import and plan without them.
EXTRA_MODULES = ("stable_baselines3", "sb3_contrib", "wandb", "tensorboard", "transformers",
                 "xgboost", "scipy")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("TVM_NUM_THREADS", "2")
    env.update(extra)
    return env


def test_every_package_folder_is_listed_and_data_dirs_exist():
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "fusion_rl").rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    for package, folder in tool["package-dir"].items():
        for pattern in tool["package-data"][package]:
            assert list((REPO / folder).glob(pattern)), (package, folder, pattern)


def test_metadata_declares_license_extras_and_every_import():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX string, not the deprecated table
    py = f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}"
    assert py in project["classifiers"]
    extras = project["optional-dependencies"]
    core = " ".join(project["dependencies"])
    for dist in ("stable-baselines3", "sb3-contrib", "tensorboard", "wandb"):
        assert dist in " ".join(extras["train"]) and dist not in core
    assert any(d.startswith("transformers") for d in extras["hf"]) and "transformers" not in core
    declared = " ".join([core, *(" ".join(v) for v in extras.values())]).lower()
    # Third-party imports of the package (import name -> distribution name).
    for dist in ("scipy", "safetensors", "pyyaml", "psutil", "tqdm", "matplotlib", "onnxruntime",
                 "torch-geometric", "xgboost-cpu", "gymnasium", "apache-tvm-ffi"):
        assert dist in declared, dist


_BLOCKED_SNIPPET = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as if not installed
import fusion_rl.cli, fusion_rl.env, fusion_rl.export, fusion_rl.compare, fusion_rl.baselines
import fusion_rl.compiler.measure, fusion_rl.decisions, fusion_rl.fuzz
fusion_rl.cli.build_parser()
from fusion_rl.export import LearnedPlanner
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model
model = load_model("mlp_tiny")
make_plan("tvm", model.mod, model.graph)
print(LearnedPlanner("default", "host").plan(model.graph).hash)
for argv in (["train", "--config", "x.yaml"], ["plan", "hf_bert", "--rules", "tvm"]):
    code = fusion_rl.cli.main(argv)
    print("exit", code)
"""


def test_core_works_without_the_optional_extras():
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_SNIPPET.format(blocked=EXTRA_MODULES)],
        cwd=REPO, env=_clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == ["exit 2", "exit 2"], proc.stdout
    lines = proc.stderr.strip().splitlines()
    # The shipped policy trained on one host: on a machine whose measured rates differ, planning
    # with it says so in one warning line (compiler/target/normalize.py). Nothing else may appear.
    errors = [line for line in lines if not line.startswith("warning: plan: target host is outside")]
    assert len(lines) - len(errors) <= 1 and len(errors) == 2, proc.stderr
    assert errors[0].startswith("error: fusion-rl train needs stable_baselines3")
    assert "pip install 'fusion_rl[train]'" in errors[0]
    assert errors[1].startswith("error: zoo model hf_bert needs transformers")
    assert "pip install 'fusion_rl[hf]'" in errors[1]


def _source_copy(dest: Path) -> Path:
    """The files a clean clone would have (tracked and not ignored), copied to ``dest``."""
    try:
        names = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
            check=True, capture_output=True,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # an exported tree without git
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "runs", "wandb", ".cache", "*.egg-info", "__pycache__"))
        return dest
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


_WHEEL_SNIPPET = """
import json, sys
import gymnasium
import fusion_rl, fusion_rl.env
from fusion_rl import paths
from fusion_rl.export import LearnedPlanner
from fusion_rl.graph.model import load_model
env = gymnasium.make("fusion_rl/Fusion-v0", spec="default")
graph = load_model("mlp_tiny").graph
print(json.dumps({
    "package": str(paths.PACKAGE_DIR),
    "repo_root": None if paths.REPO_ROOT is None else str(paths.REPO_ROOT),
    "models": list(env.unwrapped.config.models),
    "tiny": list(fusion_rl.env.EnvSpec.resolve("tiny").models),
    "plans": [LearnedPlanner(p, "host").plan(graph).hash for p in ("default", "policies/default")],
}))
"""


@pytest.mark.slow
def test_wheel_installed_outside_the_clone_resolves_specs_and_policy(tmp_path):
    import yaml

    from fusion_rl.export import LearnedPlanner
    from fusion_rl.graph.model import load_model

    src = _source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    # No build isolation and no index: nothing is downloaded; this interpreter's setuptools builds.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(wheels), str(src)],
                   check=True, cwd=tmp_path, env=_clean_env(), capture_output=True)
    (wheel,) = wheels.glob("fusion_rl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, env=_clean_env(), capture_output=True)
    # The dependencies come from this interpreter's site-packages, after the venv's own (a .pth
    # line adds the folder without running its .pth files, so an editable fusion_rl there stays out).
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([str(python), "-c", _WHEEL_SNIPPET], cwd=work, env=_clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(venv)), got  # the wheel's copy, not the clone
    assert got["repo_root"] is None
    assert got["models"] == yaml.safe_load((REPO / "envs" / "default.yaml").read_text())["models"]
    assert got["tiny"] == yaml.safe_load((REPO / "envs" / "tiny.yaml").read_text())["models"]
    want = LearnedPlanner(REPO / "policies" / "default", "host").plan(load_model("mlp_tiny").graph).hash
    assert got["plans"] == [want, want]

    cli = venv / "bin" / "fusion-rl"
    proc = subprocess.run([str(cli), "plan", "mlp_tiny", "--policy", "default", "--json"],
                          cwd=work, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plan"]["hash"] == want
    proc = subprocess.run([str(cli), "--version"], cwd=work, env=_clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("fusion-rl "), proc
