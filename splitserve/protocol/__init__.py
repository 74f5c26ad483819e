"""The contracts between splitserve's processes, in one torch-free package.

Everything that crosses a process boundary lives here, and every side (router, engine servers,
KV-transfer library, operator) imports it from here, so no two copies can drift:

- ``sampling``: ``SamplingParams`` / ``StructuredOutput`` and their validation;
- ``logprobs``: logprob results;
- ``block_hash``: THE chained prefix-block hash (engine cache and router index);
- ``kv_compat``: the KV compatibility facts and their hash (which pods may exchange blocks);
- ``wire``: the one conversion between these types and the ``splitserve.v1`` proto messages;
- ``constants``: protocol version, gRPC channel/server options, default ports, service names;
- ``labels``: Kubernetes label keys the operator writes and the router reads.

Importing it never imports torch (a test holds it to that).
"""
