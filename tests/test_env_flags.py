"""On/off environment variables (SCATTERBROKER_RESPONSE_CACHE, _ENTRY_CACHE, _GC_FREEZE,
_DIRECT_CHUNKS) all read the same words, and a word they do not know is an error naming it."""

from __future__ import annotations

import pytest

from scatterbroker.environment import env_flag
from scatterbroker.server.write_log import enabled_by_default


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("OFF", False),
])
def test_the_same_words_everywhere(text, expected):
    for default in (True, False):
        assert env_flag("SCATTERBROKER_X", default, {"SCATTERBROKER_X": text}) is expected


def test_unset_or_blank_is_the_default():
    assert env_flag("SCATTERBROKER_X", True, {}) is True
    assert env_flag("SCATTERBROKER_X", False, {"SCATTERBROKER_X": "  "}) is False


def test_an_unknown_word_is_refused_by_name(monkeypatch):
    with pytest.raises(ValueError, match="SCATTERBROKER_X='maybe'"):
        env_flag("SCATTERBROKER_X", True, {"SCATTERBROKER_X": "maybe"})
    monkeypatch.setenv("SCATTERBROKER_ENTRY_CACHE", "enabled")
    with pytest.raises(ValueError, match="SCATTERBROKER_ENTRY_CACHE"):
        enabled_by_default(True, "SCATTERBROKER_ENTRY_CACHE")
    monkeypatch.setenv("SCATTERBROKER_ENTRY_CACHE", "off")
    assert enabled_by_default(True, "SCATTERBROKER_ENTRY_CACHE") is False
