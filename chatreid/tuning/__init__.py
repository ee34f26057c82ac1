"""Training ChatReID's models: the VLM's HPT stages (torchreid's "engine") and the prefilter
embedder's metric learning. Sits above evaluation (the embedder's training scores itself with
the evaluation engine) and rerank (the identity head trains per query kind).

- ``stages``: the three HPT stage rules and the model each stage starts from;
- ``collate``: instruction samples → model inputs, loss on response tokens only;
- ``hpt``: the per-worker training loop Ray Train runs (DDP on CPU, DeepSpeed on GPU);
- ``evaluate``: best-choice rank-1 and response confidences;
- ``embedder_training``: the prefilter embedder's metric learning on Ray Train;
- ``presets``: the named training recipes (plain data, light).

How a prompt is encoded and a best-choice answer read is the model's own
(``chatreid.model.prompting``), shared with the reranker.

The package itself imports nothing: importing ``presets`` must not load torch or Ray.
"""
