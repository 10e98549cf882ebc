"""Training beyond one process with torch.distributed (launched by torchrun): latent-sharded SAEs.

`layout` says which slice of the latents each rank owns; `mesh` is this process's place among the ranks and the
counted collectives (`Mesh.single()` for one process); `sharded` is the latent-sharded forward, gradient norm and
parameter exchange that `sae.dense_step.dense_update(..., mesh=...)` runs; `checkpoint` saves and reshards the
training state with torch.distributed.checkpoint and streams the whole SAELens export. `sae.trainer.Trainer(mesh=)`
and `sae.sweep.Sweep(mesh=, placement=)` put them together. Nothing here runs at import time, and a single
process is the world-size-1 case of the same code.
"""
