"""Evaluation of trained SAEs (`python -m sae eval`): held-out metrics, the spliced downstream loss, dark matter,
figures and a feature browser.

It reads SAEs only from disk (`sae.checkpoint`, `sae.pretrained`) and activations only through `harvest`, and
computes with `kernels.reference`; nothing here imports the training side (model, trainer, configs). Modules:

    report        EvalConfig, `evaluate` (several SAEs on the same held-out tokens), report.md / report.json
    metrics       streaming reconstruction (FVU) and sparsity accumulators
    dark_matter   the linear part of an SAE's error, fitted on one split and scored on another
    splice        the LM's next-token loss with the reconstruction spliced in (delta CE, loss recovered, KL)
    plots         the report's PNG figures
    browser       a static HTML feature browser

Importing this package imports none of them.
"""
