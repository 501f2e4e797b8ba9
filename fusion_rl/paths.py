"""Where fusion_rl's own files are: the one place that locates them from ``__file__``.

fusion_rl runs in two layouts, and every data path must resolve in both:

- **a clone** (``pip install -e .``, or ``PYTHONPATH`` pointing at it): the env specs and
  shipped policies are the repository's ``envs/`` and ``policies/``;
- **an installed wheel**: the same files ship as package data, ``fusion_rl/envs/`` and
  ``fusion_rl/policies/default/`` (``pyproject.toml`` maps the repository folders there).

This module imports nothing of fusion_rl, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

#: The ``fusion_rl`` package folder.
PACKAGE_DIR = Path(__file__).resolve().parent
#: The folder that holds the ``fusion_rl`` package: what a child process needs on ``PYTHONPATH``
#: to import this same copy (the clone, or ``site-packages``).
IMPORT_ROOT = PACKAGE_DIR.parent


def _find_repo_root() -> Path | None:
    # A clone has the project file beside the package; site-packages does not.
    root = IMPORT_ROOT
    if (root / "pyproject.toml").is_file() and (root / "envs").is_dir():
        return root
    return None


#: The repository this package runs from, or None when it is installed from a wheel.
REPO_ROOT: Path | None = _find_repo_root()


def _data_dir(name: str) -> Path:
    if REPO_ROOT is not None:
        return REPO_ROOT / name
    return PACKAGE_DIR / name


#: Named env specs (``spec="tiny"`` is ``ENVS_DIR / "tiny.yaml"``).
ENVS_DIR: Path = _data_dir("envs")
#: Shipped policy folders (``POLICIES_DIR / "default"``).
POLICIES_DIR: Path = _data_dir("policies")
#: The policy that ``make demo`` and the README use.
DEFAULT_POLICY: Path = POLICIES_DIR / "default"


def relative_to_repo(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it, else unchanged.

    Parameters
    ----------
    path
        Any path; recorded in artifacts (policy cards) so they carry no machine's folders.

    Returns
    -------
    str
        The repository-relative path, or ``str(path)`` outside a clone or outside the repository.
    """
    if REPO_ROOT is None:
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
