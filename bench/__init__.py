"""`python -m bench`: equivalence-checked throughput of the SAE kernels, training step and harvester, against
the device's measured roofline (bench/__main__.py; cases in bench/cases_*.py, counts in bench/counts.py)."""

from sae import check_kernels_package

check_kernels_package()  # before any bench module imports `kernels` (sae/__init__.py says why)
