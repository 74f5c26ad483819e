"""The local cluster's node agent: kubelet plus a container runtime, emulated with processes.

It registers one Node, keeps its Lease, and runs each pod bound to it as processes from the image
venv (see splitserve.cluster.image), each pod in its own network namespace with its own IP, each
container in its own mount, UTS and PID namespaces with the pod's volumes at the pod's paths.
See README.md beside this file for what is emulated and what is not.

Run it as `python -P -m splitserve.cluster.nodeagent --kubeconfig ... --node-name ...`.
"""
