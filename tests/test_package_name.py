"""saekit's top-level `kernels` against Hugging Face's `kernels` distribution (`pip install kernels`), which has the
same name: a foreign `kernels` is refused at import with a message that names it, and transformers does not take
ours for Hugging Face's (sae/__init__.py `check_kernels_package`)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels
from sae import check_kernels_package

ROOT = Path(__file__).resolve().parents[1]


def test_a_foreign_kernels_first_on_sys_path_fails_importing_sae_with_a_message_that_says_so(tmp_path):
    """A stand-in for Hugging Face's package ahead of the checkout on sys.path, as a site-packages install of it
    would be ahead of saekit's editable install; run from elsewhere so the checkout is not sys.path[0]."""
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text('__version__ = "0.18.2"\n\ndef get_kernel(repo_id):\n    pass\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", "import sae"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode != 0
    assert "ImportError: the top-level package `kernels` imported from" in run.stderr, run.stderr
    assert str(foreign / "__init__.py") in run.stderr and "Hugging Face" in run.stderr
    # The same interpreter without the stand-in imports sae: the failure above is the stand-in's.
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-c", "import sae"], cwd=tmp_path, env=env, timeout=120, check=True)


def test_hugging_faces_distribution_installed_beside_ours_is_refused(monkeypatch):
    """Ours first on sys.path, theirs installed: transformers would pair our module with their version."""
    real = importlib.metadata.version

    def version(name):
        return "0.18.2" if name == "kernels" else real(name)

    check_kernels_package()  # this environment has no such distribution
    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ImportError, match=r"distribution named `kernels` \(version 0\.18\.2.*pip uninstall kernels"):
        check_kernels_package()


def test_transformers_does_not_take_ours_for_hugging_faces():
    """transformers finds a module `kernels` (ours) but no usable version: from the saekit distribution when it is
    installed, else from the package, which has no `__version__` on purpose."""
    from transformers.utils.import_utils import (
        _is_package_available,
        is_kernels_available,
    )

    assert kernels.SAEKIT_KERNELS is True and not hasattr(kernels, "__version__")
    assert Path(kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert _is_package_available("kernels")[0], "transformers does not see our kernels: nothing is tested"
    assert not is_kernels_available()
