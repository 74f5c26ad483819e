"""Model storage: fetching weights from a hub or object storage into a local folder.

What the operator's download step (an init container, `splitserve pull-model`) runs: `pull.py`
(the command: lock, completion marker, progress and failures as one clear line), `hub.py` (the
Hugging Face hub, any endpoint), `s3.py` (S3 and S3-compatible stores). Torch-free.
"""
