"""The online recall service: FastAPI + FAISS + the bundle's towers + Redis user features.

Layers, lowest first; a module imports only its own layer and those below it, and `app`
imports `models` only (`models` never imports `app`; `tests/test_app_layers.py` checks all
three):

1. Foundation: `settings` (the one `Settings`), `config` (the config object each part is
   built from, every derived setting computed there), `errors` (one exception class per
   failure, each with its HTTP status), `logs` (request context, log formats), `metrics`,
   `background` (stopping a background loop).
2. `search` (the item index: `ItemIndex`, flat or FAISS, its on-disk ANN cache) and `store`
   (the online user store: Redis, Redis Cluster or in process, its feature cache); neither
   imports the other.
3. `model`: the model object (`ServingModel`: load, verify, warm up, encode), the repository
   holding the one serving reference, and the version sync between workers.
4. Services: `recall` (with `batcher`, `retrieval`, `user_vector_cache`, `feature_checks`,
   `filters`),
   `users`, `catalogue` (items added and deleted at serving time: the item change log applied
   to every serving model as its overlay), and `services`, which builds them all for one
   worker.
5. `http`: middleware, the one error-to-response mapping, schemas, OpenAPI, the routes and
   the recall fast path.
6. Process: `main` (`create_app` and the lifespan), `__main__` and `workers` (uvicorn).

A recall request crosses: `http.middleware` -> `http.fast_path` (or `http.routes.recall`) ->
`recall` -> `batcher` -> `store` -> `retrieval` -> `model` -> `search`.
"""
