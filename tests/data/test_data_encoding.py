"""Templates, demonstrations, left truncation and token batches."""

import pytest
import torch

from abmll_pyro.data.encoding import encode_options, encode_tokens
from abmll_pyro.data.scoring import token_log_probs
from abmll_pyro.data.tasks import Example
from abmll_pyro.data.templates import ChatTemplate, DirectTemplate, make_template
from abmll_pyro.lms import tiny_model

DEMOS = [Example("1+1", ("2", "3"), 0), Example("2+2", ("5", "4"), 1)]
QUERY = Example("3+3", ("6", "7"), 0)


def test_direct_template_puts_demonstrations_first():
    t = DirectTemplate()
    assert t.prompt(QUERY.input, DEMOS) == "1+1 2\n\n2+2 4\n\n3+3"
    assert t.continuation("6") == " 6"


def test_chat_template_uses_turns():
    _, tok = tiny_model("llama")
    text = ChatTemplate(tok).prompt(QUERY.input, DEMOS[:1])
    assert text == "<user>1+1</user>\n<assistant>2</assistant>\n<user>3+3</user>\n<assistant>"
    assert make_template("chat", tok).continuation("6") == "6"
    with pytest.raises(ValueError, match="unknown template"):
        make_template("fancy")


def test_prompt_tokens_are_the_template_text():
    _, tok = tiny_model("llama")
    batch = encode_options(tok, [QUERY], demonstrations=DEMOS)
    row = batch.input_ids[0][batch.attention_mask[0].bool()]
    prompt_and_option = tok.decode(row)
    assert prompt_and_option == "1+1 2\n\n2+2 4\n\n3+3 6"
    assert tok.decode(batch.input_ids[0][batch.target_mask[0]]) == " 6"


def test_left_truncation_keeps_the_end_and_warns_with_count():
    _, tok = tiny_model("llama")
    examples = [Example("a" * 50 + "END", ("x", "yy"), 0), Example("short", ("x", "y"), 1)]
    with pytest.warns(UserWarning, match="1 of 2 examples truncated from the left to fit max_length=20"):
        batch = encode_options(tok, examples, max_length=20)
    assert batch.input_ids.shape[1] <= 20
    first = tok.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert first.endswith("END x") and len(first) == 20 - 1  # prompt cut to 20 - len(" yy")
    with pytest.raises(ValueError, match="no room"):
        encode_options(tok, examples, max_length=3)


def test_token_batch_targets_are_the_answer_tokens():
    model, tok = tiny_model("gpt2")
    gen = Example("Say hi:", ("hi", "bye"), 0, target="hello there")
    batch = encode_tokens(tok, [gen, QUERY])
    assert tok.decode(batch.input_ids[0][batch.target_mask[0]]) == " hello there"
    assert tok.decode(batch.input_ids[1][batch.target_mask[1]]) == " 6"
    logits, targets, mask = token_log_probs(model, batch)
    assert logits.shape[:2] == targets.shape == mask.shape
    assert int(mask.sum()) == len(" hello there") + len(" 6")


def test_no_examples_is_an_error():
    _, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="support: no examples"):
        encode_options(tok, [], name="support")


def test_huge_inputs_are_cut_before_tokenization_with_the_same_tokens():
    import time

    from abmll_pyro.data.encoding import clip_text, encode_prompt

    _, tok = tiny_model("llama")
    words = " ".join(f"w{i % 97}x" for i in range(4000))  # ~24k characters
    assert words.endswith(clip_text(tok, words, 64)) and len(clip_text(tok, words, 64)) < len(words)
    batch = encode_options(tok, [Example(words, ("yes", "no"), 0)], max_length=64)
    # the oracle: tokenize the whole prompt, then cut from the left
    template = make_template("direct", tok)
    full = encode_prompt(tok, template.prompt(words, ()), "oracle")
    longest = max(len(tok(template.continuation(o), add_special_tokens=False).input_ids) for o in ("yes", "no"))
    expected = full[-(64 - longest):]
    got = batch.input_ids[0][batch.attention_mask[0].bool() & ~batch.target_mask[0]].tolist()
    assert got == expected
    huge = Example("z" * 20_000_000 + " tail", ("yes", "no"), 0)
    t0 = time.perf_counter()
    encode_options(tok, [huge], max_length=64)
    assert time.perf_counter() - t0 < 5.0  # the whole string: minutes and gigabytes
