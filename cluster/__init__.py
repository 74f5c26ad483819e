"""The local test cluster: real Kubernetes control-plane programs plus an emulated node agent.

Development and CI tooling only (the image does not carry it); see docs/testing.md.
"""
