"""SFT data: records, chat templates (against transformers), assistant-token masks, batching and packing."""

import json

import numpy as np
import pytest
from sft_helpers import arithmetic, make_tokenizer, write_jsonl

from seekformer.tokenizer import DEEPSEEK_ASSISTANT_TOKEN, DEEPSEEK_USER_TOKEN, EOS_TOKEN, load_tokenizer
from seekformer.training.chat_data import (
    IGNORE,
    ChatBatches,
    ChatDataError,
    ChatRecord,
    collate,
    parse_record,
    read_chat_jsonl,
    tokenize_chat,
    tokenize_records,
)

FULL_WIDTH = (DEEPSEEK_USER_TOKEN, DEEPSEEK_ASSISTANT_TOKEN)
# a DeepSeek-style template with transformers' {% generation %} markers around what the assistant writes
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}"
    "{% if think is defined and think %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
# like DeepSeek-R1's: the reasoning of earlier assistant turns is dropped from the history
DROPS_REASONING = MARKED_TEMPLATE.replace(
    "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}",
    "{{ (m['content'] if loop.last else m['content'].split('</think>')[-1]) + eos_token }}")
CONVERSATION = [
    {"role": "system", "content": "Add."},
    {"role": "user", "content": "12+30="},
    {"role": "assistant", "content": "<think>\n2+0=2</think>42"},
    {"role": "user", "content": "the answer is 1+1="},
    {"role": "assistant", "content": "2"},
]


def saved_tokenizer(tmp_path, template):
    tok = make_tokenizer(FULL_WIDTH)
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if template is None:
        config.pop("chat_template")
    else:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return load_tokenizer(tmp_path)


def test_own_template_renders_and_masks_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = saved_tokenizer(tmp_path, MARKED_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.own_template
    for kwargs in ({"add_generation_prompt": False}, {"add_generation_prompt": True},
                   {"add_generation_prompt": True, "think": True}):
        assert tok.apply_chat_template(CONVERSATION, **kwargs) == hf.apply_chat_template(
            CONVERSATION, tokenize=False, **kwargs)
    want = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (example,) = tokenize_chat(tok, ChatRecord(CONVERSATION, "test:1", {}))
    assert example.ids.tolist() == list(want["input_ids"])
    assert example.mask.astype(int).tolist() == list(want["assistant_masks"])
    assert sum(want["assistant_masks"]) > 4  # both turns, their end-of-turn included


def test_template_that_rewrites_history_trains_each_turn_in_its_own_context(tmp_path):
    tok = saved_tokenizer(tmp_path, DROPS_REASONING)
    first, second = tokenize_chat(tok, ChatRecord(CONVERSATION, "test:1", {}))
    assert tok.decode(first.ids[first.mask]) == "<think>\n2+0=2</think>42" + EOS_TOKEN
    assert tok.decode(second.ids[second.mask]) == "2" + EOS_TOKEN
    assert "2+0=2" not in tok.decode(second.ids)  # the history as the template shows it at that turn


def test_without_a_template_deepseek_markers_are_used_and_transformers_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = saved_tokenizer(tmp_path, None)
    assert not tok.own_template and tok.user_token == DEEPSEEK_USER_TOKEN
    text = tok.apply_chat_template(CONVERSATION[:2])
    assert text.endswith(DEEPSEEK_USER_TOKEN + "12+30=" + DEEPSEEK_ASSISTANT_TOKEN)
    tok.save(tmp_path / "saved")  # the saved template is seekformer's, with the same markers
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True) == text
    (tmp_path / "jinja").mkdir()
    tok.save(tmp_path / "jinja")
    (tmp_path / "jinja" / "chat_template.jinja").write_text(MARKED_TEMPLATE)  # transformers 5's own file wins
    assert load_tokenizer(tmp_path / "jinja").own_template


def test_targets_are_the_completion_and_end_of_turn_only():
    tok = make_tokenizer()
    record = parse_record({"prompt": "12+30=", "completion": "42"}, "test:1")
    (example,) = tokenize_chat(tok, record)
    prompt_ids = tok.encode(tok.apply_chat_template(record.messages[:1], add_generation_prompt=True))
    assert example.ids[: len(prompt_ids)].tolist() == prompt_ids  # an independent view of what is prompt
    assert not example.mask[: len(prompt_ids)].any() and example.mask[len(prompt_ids):].all()
    assert example.ids[-1] == tok.eos_id
    targets = example.targets
    assert (targets[: len(prompt_ids) - 1] == IGNORE).all()
    assert targets[len(prompt_ids) - 1:].tolist() == example.ids[len(prompt_ids):].tolist()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "1+1="', r"data.jsonl:3: not valid JSON"),
    ('{"prompt": "1+1="}', r"data.jsonl:3: a record with 'prompt' needs a 'completion'"),
    ('{"prompt": 5, "completion": "x"}', r"data.jsonl:3: 'prompt' must be a string"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', r"data.jsonl:3: messages\[0\]: unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"data.jsonl:3: .*no assistant turn"),
    ('{"messages": "hi"}', r"data.jsonl:3: messages must be a list"),
    ('{"text": "hi"}', r"data.jsonl:3: expected a 'messages' list or 'prompt' and 'completion'"),
    ('[1, 2]', r"data.jsonl:3: expected a JSON object"),
])
def test_malformed_records_name_their_line(tmp_path, line, message):
    good = json.dumps({"prompt": "1+1=", "completion": "2"})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ChatDataError, match=message):
        read_chat_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_chat_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChatDataError, match="no records"):
        read_chat_jsonl(tmp_path / "empty.jsonl")


def test_prompts_for_generation_end_with_a_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    (record,) = read_chat_jsonl(path, need_assistant=False)
    assert record.messages == [{"role": "user", "content": "1+1="}] and record.extra == {"answer": "2"}
    with pytest.raises(ChatDataError, match="p2.jsonl:1: a prompt must end with a user turn"):
        read_chat_jsonl(write_jsonl(tmp_path / "p2.jsonl", [{"prompt": "a", "completion": "b"}]), need_assistant=False)


def test_sequences_longer_than_the_context():
    tok = make_tokenizer()
    long_answer = parse_record({"prompt": "1+1=", "completion": "2" * 40}, "data.jsonl:7")
    with pytest.raises(ChatDataError, match=r"data.jsonl:7: \d+ tokens, longer than the context of 12"):
        tokenize_chat(tok, long_answer, max_len=12)
    (cut,) = tokenize_chat(tok, long_answer, max_len=12, truncate=True)
    assert len(cut.inputs) == 12 and cut.mask[-1]
    long_prompt = parse_record({"prompt": "1+1=" * 20, "completion": "2"}, "data.jsonl:9")
    with pytest.raises(ChatDataError, match=r"data.jsonl:9: the prompt has \d+ tokens, which fill the context"):
        tokenize_chat(tok, long_prompt, max_len=12, truncate=True)


def test_batches_are_seeded_resumable_and_packing_keeps_every_example_once():
    tok = make_tokenizer()
    examples = tokenize_records(tok, [parse_record(r, f"x:{i}") for i, r in enumerate(arithmetic(40))])
    for packing in (False, True):
        batches = ChatBatches(examples, 4, 32, tok.pad_id, packing=packing, seed=3)
        first = [next(batches) for _ in range(len(batches) + 2)]  # into the second epoch
        state = batches.state_dict()
        after = [next(batches) for _ in range(3)]
        again = ChatBatches(examples, 4, 32, tok.pad_id, packing=packing, seed=3)
        assert all((a.inputs == b.inputs).all() for a, b in zip(first, [next(again) for _ in range(len(first))]))
        resumed = ChatBatches(examples, 4, 32, tok.pad_id, packing=packing, seed=3)
        resumed.load_state_dict(state)
        assert all((a.inputs == b.inputs).all() and (a.targets == b.targets).all()
                   for a, b in zip(after, [next(resumed) for _ in range(3)]))
        epoch = first[: len(batches)]
        assert sum(b.n_targets for b in epoch) == sum(int(ex.mask[1:].sum()) for ex in examples)
        if packing:
            assert all(b.inputs.shape[1] == 32 for b in epoch) and len(batches) < 10
            docs = epoch[0].document_ids[0]
            n_first = int((docs == 0).sum())
            assert (epoch[0].targets[0, :n_first] != IGNORE).sum() > 0 and docs[n_first] == 1


def test_collate_right_pads_with_ignored_targets():
    tok = make_tokenizer()
    examples = tokenize_records(tok, [parse_record(r, f"x:{i}") for i, r in enumerate(arithmetic(3))])
    batch = collate(examples, tok.pad_id)
    for row, ex in enumerate(examples):
        n = len(ex.inputs)
        assert batch.inputs[row, :n].tolist() == ex.inputs.tolist()
        assert (batch.inputs[row, n:] == tok.pad_id).all() and (batch.targets[row, n:] == IGNORE).all()
    assert batch.n_tokens == sum(len(ex.inputs) for ex in examples)
    assert np.array_equal(batch.targets[0, : len(examples[0].inputs)].numpy(), examples[0].targets)


def test_broken_and_refusing_templates_are_named(tmp_path):
    refusing = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('a user turn first') }}{% endif %}x"
    tok = saved_tokenizer(tmp_path, refusing)
    with pytest.raises(ValueError, match="the chat template refused the messages: a user turn first"):
        tok.apply_chat_template(CONVERSATION)
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="not valid Jinja2"):
        saved_tokenizer(tmp_path / "b", "{% for m in messages %}").apply_chat_template(CONVERSATION)
