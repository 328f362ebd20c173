import random

import pytest
from conftest import JSON_FILES, STDLIB

import cspkit
from cspkit.paths import TOKENIZER_PATH
from cspkit.tokenizer import (
    EOT,
    EOT_ID,
    REQUIRED_TOKENS,
    encoding_from_ranks,
    is_single_token,
    load_ranks,
    pretokenize,
    save_ranks,
    tokenizer_id,
    train_bpe,
)


@pytest.fixture(scope="module")
def enc():
    return cspkit.get_encoding()


def json_texts() -> list[str]:
    return [(STDLIB / "json" / n).read_text(encoding="utf-8") for n in JSON_FILES]


def test_shipped_encoding(enc):
    assert enc.n_vocab == 2048
    assert enc.eot_token == 2047 == EOT_ID
    assert enc.encode(EOT, allowed_special={EOT}) == [2047]
    ranks = load_ranks(TOKENIZER_PATH)
    assert sorted(ranks.values()) == list(range(2047))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert enc.name == tokenizer_id(TOKENIZER_PATH)
    assert cspkit.get_encoding() is enc


@pytest.mark.parametrize("s", REQUIRED_TOKENS)
def test_required_tokens_are_single(enc, s):
    assert len(enc.encode_ordinary(s)) == 1
    assert is_single_token(enc, s)


def test_pretokenizer_keeps_punctuation_with_newline():
    chunks = pretokenize('def f(x):\n    return x[0]]\n    print("a")\n')
    assert "):\n" in chunks
    assert "]]\n" in chunks
    assert '")\n' in chunks
    assert "".join(chunks) == 'def f(x):\n    return x[0]]\n    print("a")\n'


@pytest.mark.parametrize("package", ["json", "email"])
def test_round_trip_stdlib_package(enc, package):
    files = sorted((STDLIB / package).rglob("*.py"))
    assert len(files) >= 5
    for f in files:
        data = f.read_bytes()
        text = data.decode("utf-8")
        ids = enc.encode_ordinary(text)
        assert enc.decode_bytes(ids) == data, f
        assert len(ids) < len(data) or not data, "BPE should compress Python source"


def test_round_trip_awkward_text(enc):
    s = "naïve = 'Grüße, 世界 🐍'\r\n\tif x:\r\n\t\treturn x\u00a0\u2028 <|endoftext|>\n\n\n   \t"
    assert enc.decode_bytes(enc.encode_ordinary(s)) == s.encode("utf-8")


def test_train_bpe_deterministic_and_sized():
    texts = json_texts()
    a = train_bpe(texts, vocab_size=400, required=())
    b = train_bpe(list(texts), vocab_size=400, required=())
    assert a == b
    assert list(a.items()) == list(b.items())
    assert len(a) == 399  # 256 bytes + 143 merges; the end-of-text token makes 400
    assert sorted(a.values()) == list(range(399))
    enc = encoding_from_ranks(a)
    assert enc.n_vocab == 400
    assert enc.eot_token == 399
    for t in texts:
        assert enc.decode(enc.encode_ordinary(t)) == t


def test_train_bpe_builds_required_tokens():
    ranks = train_bpe(json_texts(), vocab_size=600)
    enc = encoding_from_ranks(ranks)
    missing = [s for s in REQUIRED_TOKENS if not is_single_token(enc, s)]
    assert not missing


def test_train_bpe_stops_when_data_runs_out():
    ranks = train_bpe(["ab ab ab"], vocab_size=2048, required=())
    assert 256 < len(ranks) < 2047
    assert sorted(ranks.values()) == list(range(len(ranks)))


def test_train_bpe_empty_corpus():
    with pytest.raises(ValueError, match="empty"):
        train_bpe([], vocab_size=300)


def test_save_load_round_trip(tmp_path):
    ranks = train_bpe(json_texts()[:2], vocab_size=320, required=())
    path = tmp_path / "sub" / "tok.tiktoken"
    save_ranks(ranks, path)
    assert load_ranks(path) == ranks
    # same content, same id; the shipped file has another
    save_ranks(ranks, tmp_path / "again.tiktoken")
    assert tokenizer_id(path) == tokenizer_id(tmp_path / "again.tiktoken") != tokenizer_id(TOKENIZER_PATH)
    enc = cspkit.get_encoding(path)
    assert enc.n_vocab == 320
    s = json_texts()[3]
    assert enc.decode(enc.encode_ordinary(s)) == s


@pytest.mark.parametrize("bad", ["garbage", "QUJD notanumber", "QUJD 1 2", "!!!! 5"])
def test_malformed_file_names_the_line(tmp_path, bad):
    lines = ["QQ== 0", "Qg== 1", bad, "Qw== 2"]
    path = tmp_path / "bad.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:3:"):
        load_ranks(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        load_ranks(tmp_path / "nope.tiktoken")


def test_random_bytes_like_text_round_trip(enc):
    rng = random.Random(0)
    alphabet = "abcXYZ019 _\t\n\r()[]{}:;,.'\"#=+-*/\\<>|&^%$@!?~`é漢字\u200b"
    s = "".join(rng.choice(alphabet) for _ in range(5000))
    assert enc.decode_bytes(enc.encode_ordinary(s)) == s.encode("utf-8")
