"""The splitserve Kubernetes operator: InferenceService CRD -> prefill, decode and router pools.

Layout (one job per module; kopf is imported only by `handlers` and `cli run`):

- `crd.yaml` / `crd`: the CRD (single source of truth), schema validation and defaulting.
- `spec`: the typed, frozen spec parsed from a custom resource.
- `labels`: names, labels, selectors, owner references and hashes shared by every builder.
- `builders`: pure functions from the typed spec to the desired child objects.
- `status`: pure computation of status and conditions from the children's statuses.
- `kube`: a small async Kubernetes client (server-side apply, list, delete).
- `reconcile`: one level-based pass: build, apply, prune, read back, compute status.
- `handlers`: the thin kopf registration that wires events and timers to `reconcile`.
- `cli`: `splitserve operator run | render -f FILE | crd`.
"""
