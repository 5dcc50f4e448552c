"""Row formats: every accepted shape parses to the same Example, every defect gets its own reason code."""

from __future__ import annotations

import json

import pytest

from loraplex.formats import Example, RowError, normalize_text, parse_example, parse_line


def test_prompt_completion_row_becomes_one_user_turn():
    example = parse_line(json.dumps({"prompt": "What is 2+2?", "completion": "4"}))
    assert example == Example(prompt=({"role": "user", "content": "What is 2+2?"},), completion="4")
    assert example.group is None


def test_messages_row_keeps_system_and_user_turns_and_takes_the_last_assistant_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    example = parse_example({"messages": messages})
    assert list(example.prompt) == messages[:-1]
    assert example.completion == "Madrid."


def test_normalisation_trims_trailing_space_crlf_and_blank_runs_but_keeps_indentation():
    assert normalize_text("  def f():\r\n      return 1   \r\n\n\n\nend  ") == "def f():\n      return 1\n\nend"
    a = parse_line(json.dumps({"prompt": "Hi  \r\nthere ", "completion": " yes\n"}))
    b = parse_line(json.dumps({"prompt": "Hi\nthere", "completion": "yes"}))
    assert a == b and a.key() == b.key()


def test_trl_row_reads_back_to_the_same_example_group_included():
    example = parse_example({"prompt": "Summarise x.", "completion": "X.", "group": "json"})
    assert example.group == "json"
    row = example.to_trl()
    assert row == {"prompt": [{"role": "user", "content": "Summarise x."}],
                   "completion": [{"role": "assistant", "content": "X."}], "group": "json"}
    assert parse_line(json.dumps(row)) == example
    assert "group" not in parse_example({"prompt": "a", "completion": "b"}).to_trl()


def test_group_does_not_count_in_duplicate_identity():
    a = parse_example({"prompt": "a", "completion": "b", "group": "x"})
    b = parse_example({"prompt": "a", "completion": "b", "group": "y"})
    assert a.key() == b.key()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"prompt": "unterminated', "invalid_json"),
        ("[1, 2, 3]", "not_an_object"),
        ('"just a string"', "not_an_object"),
        ('{"question": "q", "answer": "a"}', "unknown_schema"),
        ('{"prompt": "q", "completion": 3}', "unknown_schema"),
        ('{"prompt": "  \\n ", "completion": "a"}', "empty_prompt"),
        ('{"prompt": "q", "completion": " \\t"}', "empty_completion"),
        ('{"messages": [{"role": "user", "content": "hello"}]}', "no_assistant_turn"),
        ('{"messages": [{"role": "assistant", "content": "hello"}]}', "empty_prompt"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
         "empty_completion"),
        ('{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "bad_messages"),
        ('{"messages": []}', "bad_messages"),
        ('{"prompt": "q", "completion": "a", "group": ""}', "bad_group"),
        ('{"prompt": "q", "completion": "a", "group": 7}', "bad_group"),
    ],
)
def test_each_defect_has_its_reason(line, reason):
    with pytest.raises(RowError) as caught:
        parse_line(line)
    assert caught.value.reason == reason
    assert str(caught.value)  # a message the user can act on


def test_unknown_schema_message_names_the_keys_found():
    with pytest.raises(RowError, match="question"):
        parse_line('{"question": "q", "answer": "a"}')


def test_bytes_lines_are_decoded_and_broken_utf8_is_a_row_error():
    assert parse_line('{"prompt": "café", "completion": "oui"}'.encode()).prompt[0]["content"] == "café"
    with pytest.raises(RowError) as caught:
        parse_line(b'{"prompt": "caf\xe9", "completion": "x"}')
    assert caught.value.reason == "invalid_utf8"
    assert "0xe9" in str(caught.value)
