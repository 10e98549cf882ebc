"""JumpReLU SAE ops: `reference` (plain PyTorch, the oracle) and, on CUDA, the Triton kernels.

The top-level name `kernels` is also Hugging Face's `kernels` distribution (`pip install kernels`), a different
package. `SAEKIT_KERNELS` marks this one as saekit's; `sae.check_kernels_package` (run when `sae` or `bench` is
imported) reads it. There is deliberately no `__version__`: transformers' `is_kernels_available` takes the version
of whatever `kernels` it finds from the package itself when no installed distribution gives one (saekit from a
checkout), and must not find one in Hugging Face's range here.
"""

SAEKIT_KERNELS = True
