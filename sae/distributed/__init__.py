"""Training beyond one process with torch.distributed (launched by torchrun): latent-sharded SAEs.

`layout` says which slice of the latents each rank owns; the other modules build on it. Nothing here runs at
import time, and a single process is the world-size-1 case of the same code.
"""
