"""The router merges the pods' messages that wait for a slow client into one SSE chunk per
choice (``serving._coalesce``): same text, tokens, logprobs and finish, fewer chunks."""

from __future__ import annotations

from splitserve.proto import splitserve_pb2 as pb
from splitserve.services.router.serving import _coalesce


def _m(index: int, tokens: list[int], text: str, **kw) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id="r", index=index, token_ids=tokens, text=text,
        logprobs=[pb.TokenLogprobs(token_id=t, logprob=-0.5) for t in tokens], **kw,
    )  # fmt: skip


def test_messages_of_one_choice_merge_and_keep_their_finish_and_usage():
    usage = pb.Usage(prompt_tokens=3, completion_tokens=4)
    batch = [
        (0, _m(0, [1], "a")),
        (0, _m(1, [9], "z")),
        (1, _m(0, [5], "p")),  # another prompt: its own choice
        (0, _m(0, [2, 3], "bc")),
        (0, _m(0, [4], "d", finish_reason=pb.FINISH_REASON_LENGTH, usage=usage)),
    ]
    out = _coalesce(batch)
    assert [(p, m.index, list(m.token_ids), m.text) for p, m in out] == [
        (0, 0, [1, 2, 3, 4], "abcd"),
        (0, 1, [9], "z"),
        (1, 0, [5], "p"),
    ]
    merged = out[0][1]
    assert [lp.token_id for lp in merged.logprobs] == [1, 2, 3, 4]
    assert merged.finish_reason == pb.FINISH_REASON_LENGTH
    assert merged.usage.completion_tokens == 4
    assert batch[0][1].text == "a"  # the pods' messages are not modified


def test_nothing_merges_across_an_end_or_an_error():
    err = RuntimeError("pod gone")
    batch = [(0, _m(0, [1], "a")), (0, None), (1, _m(0, [2], "b")), (1, err), (1, _m(0, [3], "c"))]
    out = _coalesce(batch)
    assert [item if not isinstance(item, pb.GenerateResponse) else item.text
            for _, item in out] == ["a", None, "b", err, "c"]  # fmt: skip
    one = [(0, _m(0, [1], "a"))]
    assert _coalesce(one) is one
