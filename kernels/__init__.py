"""JumpReLU SAE ops: `reference` (plain PyTorch, the oracle) and, on CUDA, the Triton kernels."""
