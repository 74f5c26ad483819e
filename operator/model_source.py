"""Where an InferenceService's weights come from, and where its pods find them.

- ``pvc://CLAIM/PATH``: the claim, read-only at ``/models/CLAIM``; ``--model /models/CLAIM/PATH``
- ``file:///PATH``: already in the image (or a volume the pool mounts); ``--model /PATH``
- ``oci://REF``: an image volume at ``/models/image``, KServe's ModelCar layout (the files under
  ``/models`` in the image); ``--model /models/image/models``
- ``hf://ORG/NAME``: the download step, into the cache; ``--model /models/cache/hf/ORG/NAME/REV``
- ``s3://BUCKET/PREFIX``: the same; ``--model /models/cache/s3/BUCKET/PREFIX``

The download step is an init container (`splitserve pull-model`): the engine starts only once
the weights are complete, and a failed download is the init container's failure, which status
reports. The cache is an emptyDir per pod unless the spec names a shared claim (every pod, and
every restart, reuses one download) or a node folder (once per node).
"""

from __future__ import annotations

from dataclasses import dataclass

CACHE_MOUNT = "/models/cache"
IMAGE_MOUNT = "/models/image"
IMAGE_MODEL_DIR = "models"  # KServe's ModelCar convention: the image holds the model at /models
DOWNLOAD_SCHEMES = ("hf", "s3")


@dataclass(frozen=True)
class ModelCache:
    """Where downloaded weights live: a claim shared by every pod, a node folder, or neither
    (an emptyDir per pod, downloaded again whenever a pod starts)."""

    claim_name: str = ""
    host_path: str = ""

    @property
    def shared(self) -> bool:
        return bool(self.claim_name or self.host_path)


@dataclass(frozen=True)
class ModelSource:
    """The weights (URI and revision), the names clients use, and how to fetch them."""

    uri: str
    revision: str
    served_name: str
    aliases: tuple[str, ...] = ()  # further names clients may send (the router accepts them)
    credentials_secret: str = ""  # a Secret whose keys become the download step's environment
    endpoint: str = ""  # a hub mirror (HF_ENDPOINT) or an S3-compatible endpoint
    cache: ModelCache = ModelCache()

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def location(self) -> str:
        """The URI without its scheme."""
        return self.uri.split("://", 1)[1]

    @property
    def pvc_claim(self) -> str | None:
        """The PVC to mount read-only at /models/<claim>, for pvc:// models."""
        return self.location.split("/", 1)[0] if self.scheme == "pvc" else None

    @property
    def oci_reference(self) -> str | None:
        """The image reference of an oci:// model."""
        return self.location if self.scheme == "oci" else None

    @property
    def needs_download(self) -> bool:
        return self.scheme in DOWNLOAD_SCHEMES

    @property
    def cache_dir(self) -> str:
        """The folder the download step fills and the engines load (hf:// and s3:// only).

        Keyed by revision for the hub, so two revisions never share (or overwrite) a folder
        in a shared cache.
        """
        if self.scheme == "hf":
            return f"{CACHE_MOUNT}/hf/{self.location}/{self.revision or 'main'}"
        return f"{CACHE_MOUNT}/s3/{self.location.rstrip('/')}"

    @property
    def engine_argument(self) -> str:
        """The value of ``--model``: always a local path in the pod."""
        if self.scheme == "pvc":
            claim, path = self.location.split("/", 1)
            return f"/models/{claim}/{path}"
        if self.scheme == "oci":
            return f"{IMAGE_MOUNT}/{IMAGE_MODEL_DIR}"
        if self.needs_download:
            return self.cache_dir
        return self.location  # file:///models/x -> /models/x

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the router accepts: the served name first (what responses report)."""
        return (self.served_name, *(a for a in self.aliases if a != self.served_name))


def default_names(uri: str) -> tuple[str, tuple[str, ...]]:
    """The served name and aliases when the spec gives no servedName.

    A hub model is served as its hub id (``org/name``: what tokenizer hubs and tools such as
    guidellm resolve), with its short name as an alias; any other source by its last path part.
    """
    scheme, rest = uri.split("://", 1)
    if scheme == "hf":
        return rest, (rest.rsplit("/", 1)[-1],)
    if scheme == "oci":
        repo = rest.split("@", 1)[0]
        last = repo.rsplit("/", 1)[-1]
        return last.split(":", 1)[0], ()
    return rest.rstrip("/").rsplit("/", 1)[-1], ()
