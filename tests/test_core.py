"""The run core (lean/core.py) fed pieces directly: what goes out, what is kept, how a run
ended. No sockets: the core does no I/O."""

from __future__ import annotations

import pytest

from lean.core import Ending, RunCore
from lean.errors import Cancelled, Internal, LeanError, ShuttingDown, SlowClient, UpstreamError
from lean.providers.base import (
    Finish,
    Piece,
    Reasoning,
    Refusal,
    Signature,
    Text,
    ToolCall,
    Usage,
)


class Recorder:
    """An `Out` that records every delta; behind after `behind_after` deltas."""

    def __init__(self, behind_after: int | None = None) -> None:
        self.seen: list[tuple[str, str, bool]] = []
        self.behind_after = behind_after

    def _took(self, part: str, text: str, behind: bool) -> bool:
        self.seen.append((part, text, behind))
        return behind or (self.behind_after is not None and len(self.seen) >= self.behind_after)

    def text(self, text: str, behind: bool) -> bool:
        return self._took("content", text, behind)

    def reasoning(self, text: str, behind: bool) -> bool:
        return self._took("thinking", text, behind)

    def refusal(self, text: str, behind: bool) -> bool:
        return self._took("refusal", text, behind)


def test_visible_deltas_go_out_in_order_and_the_answer_is_kept() -> None:
    core, out = RunCore(), Recorder()
    batch: list[Piece] = [
        Reasoning("hm"),
        Text("Hel"),
        Signature("sig"),
        Text("lo"),
        Finish("stop"),
    ]
    assert core.push(batch, out, False) is False
    assert out.seen == [
        ("thinking", "hm", False),
        ("content", "Hel", False),
        ("content", "lo", False),
    ]
    assert core.text.text() == "Hello" and core.reasoning.text() == "hm"
    assert core.finish == "stop" and core.first_token is not None


def test_once_the_client_is_behind_every_later_delta_is_told_so() -> None:
    core, out = RunCore(), Recorder(behind_after=1)
    assert core.push([Text("a"), Text("b"), Reasoning("c")], out, False) is True
    assert [behind for _, _, behind in out.seen] == [False, True, True]
    assert core.push([Text("d")], out, True) is True  # still behind, from the batch before
    assert out.seen[-1] == ("content", "d", True)


def test_a_batch_without_deltas_keeps_the_behind_it_was_given() -> None:
    core, out = RunCore(), Recorder()
    assert core.push([Usage(1, 2), Finish("length")], out, True) is True
    assert core.push([Usage(1, 2)], out, False) is False
    assert out.seen == [] and core.first_token is None


def test_tool_call_fragments_make_whole_calls_per_model_call() -> None:
    core, out = RunCore(), Recorder()
    core.next_call()
    core.push([Text("Let me check. ")], out, False)
    core.push(
        [
            ToolCall(0, "", "c1", "clock"),
            ToolCall(1, '{"a":', "c2", "add"),
            ToolCall(1, ' 1, "b": 2}'),
            ToolCall(0, "{}"),
        ],
        out,
        False,
    )
    calls = core.round_calls()
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("c1", "clock", "{}"),
        ("c2", "add", '{"a": 1, "b": 2}'),
    ]
    calls[0].result, calls[1].result = "noon", "3"
    turn = core.tool_turn(calls)
    assert turn[0]["content"] == "Let me check. "
    assert [c["function"]["name"] for c in turn[0]["tool_calls"]] == ["clock", "add"]
    assert turn[1:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
        {"role": "tool", "tool_call_id": "c2", "content": "3"},
    ]
    core.next_call()  # the model's answer to the results
    assert core.round == {}
    core.push([Text("It is noon.")], out, False)
    assert core.tool_turn([])[0]["content"] == "It is noon."  # this call's text only
    assert [c.id for c in core.calls] == ["c1", "c2"]  # every call's, for the saved answer
    assert core.text.text() == "Let me check. It is noon."


def test_usage_sums_every_model_call_and_counts_each_calls_last() -> None:
    core, out = RunCore(), Recorder()
    core.next_call()
    core.push([Usage(10, 1), Usage(10, 4)], out, False)  # a running total within a call
    assert core.usage == Usage(10, 4)
    core.next_call()
    assert core.usage == Usage(10, 4)  # the new call said nothing yet
    core.push([Usage(25, 7)], out, False)
    core.next_call()
    core.push([Usage(40, 2)], out, False)
    assert core.usage == Usage(75, 13)


@pytest.mark.parametrize(
    ("error", "text", "ending"),
    [
        (Cancelled("x"), "", Ending.CANCELLED),
        (Cancelled("x"), "some", Ending.CANCELLED),
        (ShuttingDown("x"), "", Ending.INCOMPLETE),
        (UpstreamError("x"), "some", Ending.INCOMPLETE),
        (SlowClient("x"), "some", Ending.INCOMPLETE),
        (UpstreamError("x"), "", Ending.ERROR),
        (Internal("x"), "", Ending.ERROR),
    ],
)
def test_how_a_failed_run_ended(error: LeanError, text: str, ending: Ending) -> None:
    core = RunCore()
    if text:
        core.push([Text(text)], Recorder(), False)
    assert core.ending is Ending.RUNNING
    core.failed(error)
    assert core.ending is ending and core.saved_status is ending
    assert core.error is error and error.__traceback__ is None


def test_a_run_ends_once() -> None:
    core = RunCore()
    core.complete()
    assert core.ending is Ending.COMPLETE and core.ending == "complete"
    with pytest.raises(RuntimeError, match="ended twice"):
        core.failed(UpstreamError("late"))
    with pytest.raises(RuntimeError):
        core.cancelled()


def test_a_run_that_never_ended_is_saved_incomplete() -> None:
    core = RunCore()
    assert core.saved_status is Ending.INCOMPLETE
    core.cancelled()
    assert core.saved_status is Ending.CANCELLED


def test_a_refusal_joins_the_text_and_a_stop_after_it_is_a_refusal() -> None:
    core, out = RunCore(), Recorder()
    core.push([Refusal("No, "), Refusal("sorry."), Finish("stop")], out, False)
    assert out.seen == [("refusal", "No, ", False), ("refusal", "sorry.", False)]
    assert core.text.text() == "No, sorry." and core.finish == "refusal"
    core.next_call()  # the next model call did not refuse: its stop is a stop
    core.push([Text("ok"), Finish("stop")], out, False)
    assert core.finish == "stop"


def test_usage_details_sum_over_calls_and_stay_unknown_when_never_given() -> None:
    core, out = RunCore(), Recorder()
    core.push([Usage(10, 2)], out, False)
    assert core.usage.cached_tokens is None and core.usage.reasoning_tokens is None
    core.next_call()
    core.push([Usage(20, 4, cached_tokens=16, reasoning_tokens=3, total_tokens=99)], out, False)
    core.next_call()
    core.push([Usage(30, 1, cached_tokens=24)], out, False)
    assert core.usage == Usage(60, 7, cached_tokens=40, reasoning_tokens=3)
