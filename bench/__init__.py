"""`python -m bench`: equivalence-checked throughput of the SAE kernels, training step and harvester, against
the device's measured roofline (bench/__main__.py; cases in bench/cases_*.py, counts in bench/counts.py)."""
