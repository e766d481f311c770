"""Multi-step commands: the CGM chain (`forgetless cgm`) and continual merging (`forgetless continual`).

They share one way to record and reuse a step (:mod:`.steps`): a step's output is a file or folder whose metadata
records the fingerprints of what made it — the model's weights, the data selection, the options — and the next run
reuses it when they match, else recomputes it in place. Outputs and states are written whole or not at all.
"""
