"""Text encoders: umT5 interface, zeroing past length, tokenizer rules, determinism, file formats."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from diagvid.model.text import EOS_ID, UNK_ID, ToyTextConfig, ToyTextEncoder, UMT5TextEncoder

WORDS = ["a", "and", "red", "blue", "square", "circle", "moves", "up-left", "up", "left", "fast", "slowly"]
CFG = ToyTextConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32, text_len=8)


@pytest.fixture(scope="module")
def enc() -> ToyTextEncoder:
    return ToyTextEncoder(WORDS, CFG)


def raw_hidden(model: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder's own output, without our zeroing."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def test_shapes_mask_and_zeroing(enc):
    prompts = ["a red square moves up-left fast", "blue circle"]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (2, 8, 16) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [7, 3]  # words + end-of-sequence
    ids, _ = enc.tokenize(prompts)
    raw = raw_hidden(enc.model, ids, mask)
    assert raw[~mask].abs().min() > 0  # the encoder does write into padding: zeroing is our doing
    torch.testing.assert_close(emb[mask], raw[mask], atol=0, rtol=0)
    assert (emb[~mask] == 0).all()


def test_tokenizer_rules():
    enc = ToyTextEncoder(WORDS, CFG)
    ids = enc.token_ids("A Red square, moves UP-LEFT fast!")
    assert ids == enc.token_ids("a red square moves up-left fast") == [3, 5, 7, 9, 10, 13, EOS_ID]
    # a hyphenated word outside the vocabulary splits into known parts
    no_diagonal = ToyTextEncoder([w for w in WORDS if w != "up-left"], CFG)
    assert no_diagonal.token_ids("up-left") == [no_diagonal.token_ids(w)[0] for w in ("up", "left")] + [
        EOS_ID
    ]


def test_unknown_word_and_long_prompt(enc):
    with pytest.raises(ValueError, match=r"unknown word 'purple'.*knows 12 words.*unknown='unk'"):
        enc.encode(["a purple square"])
    lenient = ToyTextEncoder(WORDS, ToyTextConfig(**{**CFG.__dict__, "unknown": "unk"}))
    assert lenient.token_ids("a purple square") == [3, UNK_ID, 7, EOS_ID]
    with pytest.raises(ValueError, match="has 8 words; text_len=8 fits 7"):
        enc.encode(["a red square and a blue circle moves"])
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode("a red square")


def test_empty_prompt_is_the_null_embedding(enc):
    null, mask = enc.encode_null(2)
    assert mask.sum(1).tolist() == [1, 1]  # end-of-sequence only
    assert null[:, 0].abs().sum() > 0 and (null[:, 1:] == 0).all()
    torch.testing.assert_close(enc.encode(["", "  \t"])[0], null, atol=0, rtol=0)


def test_weights_are_a_function_of_the_seed():
    prompts = ["a red square moves fast"]
    before = torch.random.get_rng_state()
    a = ToyTextEncoder(WORDS, CFG).encode(prompts)[0]
    assert torch.equal(torch.random.get_rng_state(), before)  # building it leaves the caller's RNG alone
    torch.manual_seed(123)  # and the global seed plays no part
    b = ToyTextEncoder(WORDS, CFG).encode(prompts)[0]
    c = ToyTextEncoder(WORDS, ToyTextConfig(**{**CFG.__dict__, "seed": 1})).encode(prompts)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-2


def test_vocabulary_validation():
    with pytest.raises(ValueError, match="repeats"):
        ToyTextEncoder(["a", "a"], CFG)
    with pytest.raises(ValueError, match="single lower-case words"):
        ToyTextEncoder(["Red", "two words"], CFG)


def test_save_load_round_trip_and_bad_weights(enc, tmp_path):
    folder = enc.save(tmp_path / "t")
    loaded = ToyTextEncoder.load(folder)
    assert loaded.words == enc.words and loaded.cfg == enc.cfg
    prompts = ["a blue circle moves up-left slowly", ""]
    torch.testing.assert_close(loaded.encode(prompts)[0], enc.encode(prompts)[0], atol=0, rtol=0)

    path = folder / "text.safetensors"
    state = load_file(path)
    state["shared.weight"] = state["shared.weight"][:-1]  # one word fewer than the vocabulary
    save_file(state, path)
    with pytest.raises(
        ValueError, match=r"12 vocabulary words.*shared.weight: file \[14, 16\] vs model \[15, 16\]"
    ):
        ToyTextEncoder.load(folder)


def build_umt5_folders(root, words: list[str]) -> tuple[UMT5EncoderModel, str, str]:
    """A tiny random umT5 encoder and a word-level fast tokenizer saved like a transformers download."""
    cfg = UMT5Config(
        vocab_size=len(words) + 3,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).eval()
    model.save_pretrained(root / "text_encoder")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # like umT5's tokenizer: every sequence ends with </s>
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(root / "tokenizer")
    return model, root / "text_encoder", root / "tokenizer"


def test_umt5_adapter_offline(tmp_path):
    model, enc_dir, tok_dir = build_umt5_folders(tmp_path, WORDS)
    enc = UMT5TextEncoder(enc_dir, tok_dir, text_len=10)
    assert enc.dim == 16
    prompts = ["a  red square\tmoves fast", ""]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (2, 10, 16)
    assert mask.sum(1).tolist() == [6, 1]  # 5 words + </s>; "" is </s> alone
    assert enc.token_ids(prompts[0]) == enc.token_ids("a red square moves fast") == [3, 5, 7, 9, 13, EOS_ID]
    ids, _ = enc.tokenize(prompts)
    raw = raw_hidden(model, ids, mask)
    torch.testing.assert_close(emb[mask], raw[mask])
    assert (emb[~mask] == 0).all() and raw[~mask].abs().min() > 0
    with pytest.raises(ValueError, match="is 12 tokens; text_len=10"):
        enc.encode([" ".join(["red"] * 11)])
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        UMT5TextEncoder(enc_dir, tmp_path / "missing")
