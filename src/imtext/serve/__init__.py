"""The search service: a FAISS index over a gallery embedded by a registered model's ONNX encoders,
a search API, the Open Inference Protocol v2 routes and a search page (README "Serving").

ONNX Runtime only: nothing here imports torch, ``imtext.train`` or kfp (a test checks it).

* :mod:`.gallery`: the images and captions served (Karpathy format), and their content hash;
* :mod:`.model`: where the model comes from (``models:/NAME@ALIAS`` or an export directory);
* :mod:`.index`: exact / IVF / HNSW FAISS indexes and their on-disk cache;
* :mod:`.state`: one version's encoders and indexes, immutable;
* :mod:`.service`: the current state, loaded in the background and swapped when the alias moves;
* :mod:`.app`: the HTTP routes (FastAPI); :mod:`.server`: uvicorn.

FastAPI rather than KServe's ``kserve.Model`` + ``ModelServer``: the KServe SDK cannot be installed
with this project's pinned dependencies (README "Serving"). :func:`.app.create_app` takes the
service and returns a plain application, so a KServe custom predictor can wrap the same
:class:`.service.Service` later.
"""
