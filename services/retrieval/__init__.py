"""The retrieval application on Ray Serve.

- ``deployments``: ``Prefilter`` (FAISS store following the indexed topic) and ``Rerank`` (the
  VLM; its ``user_config`` names the model, so a rollout is a config change);
- ``ingress``: the FastAPI HTTP API (``/v1/query``, ``/v1/crops/{id}``, ``/healthz``, OpenAPI
  at ``/docs``) and the Prometheus metrics it records;
- ``app``: the ``.bind()`` composition and the declarative deploy config built from settings;
- ``rollout``: follows VLM checkpoint events and rolls each verified one replica by replica.
"""
