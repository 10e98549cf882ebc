"""saekit's SAE side: the JumpReLU SAE, its objectives, the trainer, checkpoints and the CLI.

Importing `sae` checks once that the top-level `kernels` is saekit's (`check_kernels_package`): the one thing done
at import time, because every later failure of a shadowed `kernels` would name the wrong cause.
"""

from __future__ import annotations

import importlib.metadata


def check_kernels_package() -> None:
    """Raise ImportError unless `import kernels` gives saekit's kernels/ (its marker `kernels.SAEKIT_KERNELS`)
    and transformers cannot mistake it for Hugging Face's `kernels` (`pip install kernels`), another package of
    the same top-level name.

    - Hugging Face's first on sys.path: `import kernels` gives it, saekit's kernels/ never runs, and the first
      `from kernels.reference import ...` would fail with a misleading "No module named 'kernels.reference'".
    - saekit's first while Hugging Face's is installed: transformers' `is_kernels_available()` finds the module
      (ours) and the installed distribution's version (theirs), then imports Hugging Face's names from ours
      (`from kernels import get_kernel, ...` in transformers.integrations.hub_kernels), which breaks loading any
      language model. saekit does not use Hugging Face's `kernels`; uninstalling it fixes both cases.
    """
    import kernels

    if getattr(kernels, "SAEKIT_KERNELS", False) is not True:
        where = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
        raise ImportError(
            f"the top-level package `kernels` imported from {where} is not saekit's kernels/ (it has no "
            "kernels.SAEKIT_KERNELS): another package named `kernels`, most likely Hugging Face's (pip install "
            "kernels), comes first on sys.path and shadows saekit's. Uninstall it (`pip uninstall kernels`; saekit "
            "does not use it), or run from the saekit checkout's root so that its kernels/ comes first."
        )
    try:
        other = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"a distribution named `kernels` (version {other}, most likely Hugging Face's: pip install kernels) is "
        f"installed beside saekit, whose own top-level package `kernels` ({kernels.__file__}) is the one imported: "
        "transformers would take saekit's for Hugging Face's (it pairs the module it finds with that "
        "distribution's version) and fail to import its hub-kernel names from it, breaking every model load. "
        "Uninstall it (`pip uninstall kernels`); saekit does not use it."
    )


check_kernels_package()
