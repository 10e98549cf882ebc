"""Automated interpretation of SAE latents: an explainer LM describes a latent from its contexts, a scorer LM
predicts from that description alone which held-out contexts activate it.

`clients` talks to the LM (an OpenAI-compatible HTTP endpoint, or a local transformers model), `cache` keeps every
answer so an interrupted run asks nothing twice, `score` turns the scorer's answers into detection metrics.
`contexts` picks each latent's explanation windows (top and quantile) and its row-disjoint, balanced held-out set,
`prompts` writes the explainer's and the scorer's prompts, `explain` asks for one explanation, and `pipeline`
(`run_autointerp`, `autointerp_sae`) explains, scores, and scores a random-explanation floor beside it.
"""
