"""BagelTokenizer against the official BAGEL run's recorded token ids, and the tiny-tokenizer writer.

Golden data: tests/fixtures/golden (tiny_ckpt's tokenizer; cases/*.json + *.safetensors).
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from testkit.paths import GOLDEN
from transformers import AutoTokenizer

from strokes.model.network.tokenizer import BAGEL_TOKENS, BagelTokenizer
from strokes.model.testing.tiny_tokenizer import write_tiny_tokenizer

TINY_CKPT = GOLDEN / "tiny_ckpt"
CASES = GOLDEN / "cases"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
ADDED_STRINGS = ("<|endoftext|>", *BAGEL_TOKENS)
BPE_VOCAB = 384
SAMPLE_PROMPT = "a red cube on top of a blue sphere"


def load_case(name: str) -> dict:
    return json.loads((CASES / f"{name}.json").read_text(encoding="utf-8"))


def case_stages(case: dict) -> list[tuple[str, dict]]:
    """(key prefix, record) per stage: the loop case prefixes its keys by stage, the others do not."""
    if "stages" in case:
        return [(f"{stage}.", record) for stage, record in case["stages"].items()]
    return [("", case)]


def prompt_calls() -> list[tuple[str, str, list[str]]]:
    """(case, safetensors key, prompts) of every recorded prepare_prompts call."""
    calls = []
    for path in sorted(CASES.glob("*.json")):
        for prefix, record in case_stages(load_case(path.stem)):
            for call in record.get("prepare_calls", []):
                if call["fn"] == "prepare_prompts":
                    key = f"{prefix}prep.{call['idx']}.prepare_prompts.packed_text_ids"
                    calls.append((path.stem, key, call["prompts"]))
    return calls


def generations() -> list[tuple[str, dict, dict]]:
    """(case, stage record, text_generation entry) of every recorded greedy decode."""
    found = []
    for path in sorted(CASES.glob("*.json")):
        for _, record in case_stages(load_case(path.stem)):
            for generation in record.get("text_generation", []):
                found.append((path.stem, record, generation))
    return found


@pytest.fixture(scope="module")
def tok() -> BagelTokenizer:
    return BagelTokenizer.from_folder(TINY_CKPT)


def stream(tokenizer: BagelTokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# --- golden ids -----------------------------------------------------------------------------------


def test_special_token_ids_match_golden_tiny_checkpoint(tok):
    assert (tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image) == (385, 386, 387, 388)
    assert len(tok) == 389
    assert tok.num_new_tokens == 0


@pytest.mark.parametrize(
    ("case", "key", "prompts"), [pytest.param(*call, id=f"{call[0]}:{call[1]}") for call in prompt_calls()]
)
def test_segment_reproduces_recorded_packed_text_ids(tok, case, key, prompts):
    recorded = load_file(CASES / f"{case}.safetensors")[key].tolist()
    assert [i for prompt in prompts for i in tok.segment(prompt)] == recorded


def test_every_case_with_prompts_is_covered():
    assert {case for case, _, _ in prompt_calls()} == {
        "loop_reuse",
        "t1_text_gen",
        "t2_understanding",
        "t3_t2i",
        "t4_edit",
        "t5_think_t2i",
        "t6_t2i_nonsquare",
    }


@pytest.mark.parametrize(
    ("case", "record", "generation"),
    [pytest.param(*found, id=f"{found[0]}:{found[2]['key']}") for found in generations()],
)
def test_decode_reproduces_recorded_generated_text(tok, case, record, generation):
    text = tok.decode(generation["new_ids"])
    assert text == record["gen_text_strings"][0]
    if "output_text" in record:
        assert text == record["output_text"]
    assert tok.decode(generation["ids_incl_bos"]) == generation["decoded_raw"]
    assert "".join(stream(tok, generation["ids_incl_bos"])) == generation["decoded_raw"]


@pytest.mark.parametrize(
    ("stage", "n_generated", "n_retokenized"), [("s2_plan", 12, 18), ("s5_reflect", 10, 16)]
)
def test_loop_generated_text_is_decoded_then_retokenized_into_more_tokens(
    tok, stage, n_generated, n_retokenized
):
    record = load_case("loop_reuse")["stages"][stage]
    generated = record["text_generation"][0]["new_ids"]
    text = tok.decode(generated)
    assert text == record["generated_text"]
    # Lone bytes decode to U+FFFD, which re-encodes as 3 byte tokens.
    assert len(generated) == n_generated
    assert len(tok.encode(text)) == n_retokenized
    assert tok.segment(text) == record["appended_text_ids_incl_bos_eos"]
    idx = record["appended_text_prepare_calls"][0]
    recorded = load_file(CASES / "loop_reuse.safetensors")[
        f"{stage}.prep.{idx}.prepare_prompts.packed_text_ids"
    ]
    assert tok.segment(text) == recorded.tolist()


# --- control tokens typed as text -----------------------------------------------------------------


@pytest.mark.parametrize("control", ADDED_STRINGS)
def test_control_token_typed_in_text_is_plain_text(tok, control):
    text = f"draw {control} a cube{control}"
    ids = tok.encode(text)
    assert all(i < BPE_VOCAB for i in ids)
    assert tok.decode(ids) == text
    # The reference tokenizer would have read it as the control token.
    control_id = tok.hf_tokenizer.convert_tokens_to_ids(control)
    assert control_id in tok.hf_tokenizer.encode(text, add_special_tokens=False)


def test_typed_im_end_is_not_the_eos_token(tok):
    ids = tok.encode("<|im_end|>")
    assert tok.eos_id not in ids
    assert len(ids) > 1
    assert tok.decode(ids) == "<|im_end|>"
    assert tok.segment("<|im_end|>")[1:-1] == ids


def test_encode_applies_nfc_and_adds_no_bos_or_eos(tok):
    decomposed = "cafe\u0301"
    assert tok.encode(decomposed) == tok.encode("caf\u00e9")
    assert tok.encode("") == []
    assert tok.segment("") == [tok.bos_id, tok.eos_id]


# Text that often comes close to the control strings without forming one.
near_miss_text = st.lists(
    st.one_of(
        st.text(max_size=12),
        st.sampled_from(
            ["<|", "|>", "im_end", "im_start", "vision", " <", "|", "\n", " the", "red", "é", "中", "🎨"]
        ),
    ),
    max_size=8,
).map("".join)


@settings(deadline=None, max_examples=300)
@given(text=near_miss_text)
def test_encode_equals_reference_encode_on_text_without_control_strings(tok, text):
    for candidate in (text, unicodedata.normalize("NFC", text)):
        assume(not any(s in candidate for s in ADDED_STRINGS))
    expected = tok.hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.encode(text) == expected
    assert tok.encode(text) == tok.hf_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


@settings(deadline=None, max_examples=200)
@given(parts=st.lists(st.one_of(st.text(max_size=8), st.sampled_from(ADDED_STRINGS)), max_size=6))
def test_encode_never_emits_added_tokens_and_round_trips(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert all(0 <= i < BPE_VOCAB for i in ids)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


# --- streaming decode -----------------------------------------------------------------------------


def byte_token(tok: BagelTokenizer, value: int) -> int:
    return next(i for i, b in tok.token_bytes.items() if b == bytes([value]))


def test_stream_decoder_holds_back_incomplete_utf8(tok):
    ids = [byte_token(tok, b) for b in "中".encode()]
    assert stream(tok, ids) == ["", "", "中", ""]


def test_stream_decoder_flushes_incomplete_utf8_before_control_tokens_and_at_the_end(tok):
    lead = byte_token(tok, 0xE4)
    assert stream(tok, [lead, tok.eos_id, lead]) == ["", "\ufffd<|im_end|>", "", "\ufffd"]
    assert tok.decode([lead, tok.eos_id, lead]) == "\ufffd<|im_end|>\ufffd"


def test_stream_decoder_skips_unknown_ids_like_decode(tok):
    ids = [*tok.encode("red"), 100_000, len(tok), *tok.encode(" cube")]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "red cube"


@settings(deadline=None, max_examples=300)
@given(
    chunks=st.lists(
        st.one_of(st.lists(st.integers(min_value=0, max_value=395), max_size=6), st.text(max_size=6))
    )
)
def test_stream_deltas_concatenate_to_decode(tok, chunks):
    ids = [i for chunk in chunks for i in (tok.encode(chunk) if isinstance(chunk, str) else chunk)]
    assert "".join(stream(tok, ids)) == tok.decode(ids)


# --- checkpoint folders ---------------------------------------------------------------------------


def copy_files(destination: Path, names: tuple[str, ...]) -> Path:
    destination.mkdir()
    for name in names:
        shutil.copy(TINY_CKPT / name, destination / name)
    return destination


@pytest.mark.parametrize(
    "names",
    [
        ("vocab.json", "merges.txt"),
        tuple(name for name in TOKENIZER_FILES if name != "tokenizer.json"),
        ("tokenizer.json",),
    ],
    ids=["vocab_and_merges_only", "without_tokenizer_json", "tokenizer_json_only"],
)
def test_folder_variants_give_the_same_ids(tok, tmp_path, names):
    other = BagelTokenizer.from_folder(copy_files(tmp_path / "tok", names))
    assert (other.bos_id, other.eos_id, other.start_of_image, other.end_of_image) == (385, 386, 387, 388)
    assert len(other) == len(tok)
    for _, _, prompts in prompt_calls():
        for prompt in prompts:
            assert other.segment(prompt) == tok.segment(prompt)
    ids = [*tok.encode(SAMPLE_PROMPT), tok.eos_id, 155, 87]
    assert other.decode(ids) == tok.decode(ids)


def test_missing_tokenizer_files_raise_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"vocab\.json, merges\.txt") as excinfo:
        BagelTokenizer.from_folder(empty)
    assert str(empty) in str(excinfo.value)

    only_vocab = copy_files(tmp_path / "only_vocab", ("vocab.json", "tokenizer_config.json"))
    with pytest.raises(FileNotFoundError, match=r"missing merges\.txt") as excinfo:
        BagelTokenizer.from_folder(only_vocab)
    assert str(only_vocab) in str(excinfo.value)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        BagelTokenizer.from_folder(tmp_path / "nowhere")


# --- tiny tokenizer writer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return folder


def test_tiny_tokenizer_writes_the_official_layout_with_golden_ids(tiny_folder):
    assert sorted(p.name for p in tiny_folder.iterdir()) == sorted(TOKENIZER_FILES)
    tiny = BagelTokenizer.from_folder(tiny_folder)
    assert (tiny.bos_id, tiny.eos_id, tiny.start_of_image, tiny.end_of_image) == (385, 386, 387, 388)
    assert len(tiny) == 389
    assert tiny.num_new_tokens == 0
    assert tiny.hf_tokenizer.convert_tokens_to_ids("<|endoftext|>") == 384
    config = json.loads((tiny_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"


def test_tiny_tokenizer_loads_with_transformers(tiny_folder):
    hf = AutoTokenizer.from_pretrained(str(tiny_folder))
    tiny = BagelTokenizer.from_folder(tiny_folder)
    assert type(hf).__name__ == "Qwen2Tokenizer"
    assert hf.encode(SAMPLE_PROMPT, add_special_tokens=False) == tiny.encode(SAMPLE_PROMPT)
    assert hf.convert_tokens_to_ids(list(BAGEL_TOKENS)) == [385, 386, 387, 388]


def test_tiny_tokenizer_uses_qwen2_normalizer_and_pre_tokenizer(tiny_folder):
    written = json.loads((tiny_folder / "tokenizer.json").read_text(encoding="utf-8"))
    golden = json.loads((TINY_CKPT / "tokenizer.json").read_text(encoding="utf-8"))
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert written[part] == golden[part], part
    assert len(written["model"]["vocab"]) == BPE_VOCAB


def test_tiny_tokenizer_is_deterministic(tiny_folder, tmp_path):
    write_tiny_tokenizer(tmp_path / "again")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tiny_folder / name).read_bytes(), name


def test_tiny_tokenizer_learns_real_subwords_and_round_trips(tiny_folder):
    tiny = BagelTokenizer.from_folder(tiny_folder)
    ids = tiny.encode(SAMPLE_PROMPT)
    assert len(ids) < len(SAMPLE_PROMPT) // 2
    for text in (SAMPLE_PROMPT, "Inspect the draft: is the cube <|im_end|> on top? Ça va, 中文 🎨\n"):
        assert tiny.decode(tiny.encode(text)) == text
    assert tiny.decode(tiny.segment("red")) == "<|im_start|>red<|im_end|>"


def test_tiny_tokenizer_without_tokenizer_json_gives_the_same_ids(tiny_folder, tmp_path):
    slim = tmp_path / "slim"
    slim.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_folder / name, slim / name)
    tiny = BagelTokenizer.from_folder(tiny_folder)
    other = BagelTokenizer.from_folder(slim)
    assert other.segment(SAMPLE_PROMPT) == tiny.segment(SAMPLE_PROMPT)
    assert other.start_of_image == tiny.start_of_image
