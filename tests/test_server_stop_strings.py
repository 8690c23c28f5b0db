"""Stop strings: the one-regex matcher finds exactly what a search for each
stop over the whole text finds (leftmost match, ties to the first stop in the
list), while each step searches only the new text plus the longest stop's
overlap; the server caps their number and length."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from paged_attention.engine.request_state import RequestState, StopStrings
from paged_attention.sampling_params import SamplingParams
from tests.profiles import examples


def _state(stops: list[str], include: bool = False) -> RequestState:
    # Only the text and the params matter to the stop rule.
    params = SamplingParams(stop=stops, include_stop_str_in_output=include, max_tokens=10_000)
    return RequestState(None, None, params, None, stop_ids=frozenset(), max_total_tokens=10**9)  # type: ignore[arg-type]


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, str] | None:
    """(cut text, stop) by searching the whole text for every stop."""
    found = [(text.find(s), i, s) for i, s in enumerate(stops) if s in text]
    if not found:
        return None
    idx, _, stop = min(found)
    return (text[: idx + len(stop)] if include else text[:idx]), stop


def _stream(state: RequestState, chunks: list[str]) -> tuple[str, str] | None:
    """Append chunks as decoding does, searching after each; (text, stop) once cut."""
    for chunk in chunks:
        state.text += chunk
        if state._cut_at_stop_string():
            assert state.finish_reason == "stop"
            return state.text, str(state.stop_reason)
    return None


@settings(max_examples=examples(300))
@given(
    stops=st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=5),
    chunks=st.lists(st.text("ab\nc", max_size=5), max_size=12),
    include=st.booleans(),
)
def test_incremental_matching_equals_a_whole_text_search(stops, chunks, include):
    got = _stream(_state(stops, include), chunks)
    # The reference sees the text up to the first chunk after which a stop exists.
    text, want = "", None
    for chunk in chunks:
        text += chunk
        want = _reference(text, stops, include)
        if want is not None:
            break
    assert got == want


def test_ties_and_overlaps_keep_the_list_order():
    assert _stream(_state(["a", "ab"]), ["xab"]) == ("x", "a")
    assert _stream(_state(["ab", "a"]), ["xab"]) == ("x", "ab")
    assert _stream(_state(["b", "ab"]), ["xab"]) == ("x", "ab")  # leftmost wins over list order
    assert _stream(_state(["a.b"], include=True), ["a", "xb a.", "b!"]) == ("axb a.b", "a.b")
    # Regex metacharacters are literal.
    assert _stream(_state([".*", "(("]), ["abc", "d((e"]) == ("abcd", "((")


class _Spy:
    """A pattern that records where each search starts."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        self.starts: list[int] = []

    def search(self, text: str, pos: int) -> re.Match[str] | None:
        self.starts.append(pos)
        return self._pattern.search(text, pos)


def test_each_step_searches_only_the_new_text_and_the_overlap():
    """10,000 steps with 16 stops of up to 40 characters: every search starts
    at most 39 characters before that step's new text (O(new text) per step,
    not O(stops x text)), and a stop split over many steps is still found."""
    stops = [f"{i:02d}" + "z" * 38 for i in range(15)] + ["END"]
    state = _state(stops)
    spy = _Spy(StopStrings.of(stops).pattern)
    state._stops = StopStrings(spy, 40)  # type: ignore[arg-type]
    lengths = []
    for step in range(10_000):
        lengths.append(len(state.text))
        state.text += "tok "
        assert not state._cut_at_stop_string(), step
    assert [n - start for n, start in zip(lengths, spy.starts)] == [min(39, n) for n in lengths]
    for piece in ("E", "N", "D"):
        state.text += piece
        found = state._cut_at_stop_string()
    assert found and state.stop_reason == "END" and state.text == "tok " * 10_000
