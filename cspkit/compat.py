"""OpenAI's released circuit_sparsity models and tokenizer in cspkit (docs/method.md, "OpenAI checkpoints").

A released model directory holds ``beeg_config.json`` (the fields of openai's GPTConfig) and
``final_model.pt`` (a plain state dict). ``load_openai_checkpoint`` builds the cspkit GPT that
computes the same logits; ``convert`` writes it as an ordinary cspkit checkpoint directory. The
tokenizer ships as a GPT-2 "data gym" pair, ``encoder.json`` + ``vocab.bpe``.

What the reference forward does, and how cspkit reproduces it (openai/circuit_sparsity,
circuit_sparsity/inference/gpt.py): pre-norm blocks; RMSNorm is torch's ``nn.RMSNorm`` with its
default epsilon (the dtype's machine epsilon), LayerNorm uses 1e-5; the learned positional
embedding is always added to the tokens; AbsTopK keeps ``int(afrac * width)`` entries at each
location named in ``afrac_loctypes`` (q, k and v over all heads jointly); the attention sink is a
per-head logit on a prepended key/value slot of zeros; ``residual_activation_type: relu`` applies
ReLU to the residual after each block adds its output; the logits get ``final_logits_bias`` and,
when enabled, the bigram table's row for the current token.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tiktoken
import torch

from . import checkpoint
from .config import ModelConfig, to_dict
from .files import atomic_dir, atomic_write
from .model import GPT
from .tokenizer import EOT, EOT_ID, PAT_STR, save_ranks, tokenizer_id

CONFIG_FILE, WEIGHTS_FILE = "beeg_config.json", "final_model.pt"
ENCODER_FILE, MERGES_FILE = "encoder.json", "vocab.bpe"

# The reference GPTConfig's defaults: a key missing from beeg_config.json takes these values there too.
DEFAULTS: dict[str, Any] = {
    "block_size": 1024, "vocab_size": 50304, "n_layer": 12, "n_head": 12, "d_head": None, "d_model": 768,
    "d_mlp": None, "bias": True, "ln_bias": True, "rms_norm": False, "residual_activation_type": "identity",
    "activation_type": "gelu", "afrac": None, "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out",
    "tied_unembed": True, "enable_bigram_table": False, "sink": False, "d_pos_emb": None,
    "dropout_cat_pos_emb": False, "sinusoidal_cat_pos_emb": False, "use_tied_aux_matrix": False,
}
# Keys that do not change the inference forward pass: dropout, kernel and debugging switches,
# the tokenizer's name, and settings that only matter while training.
IGNORED_KEYS = frozenset({
    "dropout", "debug_nans", "grad_checkpointing", "flash", "enable_sparse_kernels", "tokenizer_name",
    "learnable_bigram_table", "pfrac", "expansion_factor", "expansion_factor_mlp", "bigram_table_rank",
    "afrac_approx", "rtopk", "ignore_dw_grad", "sparse_matmul_impl", "debug_exact_topk",
})
RENAMED_KEYS = {"n_mlp": "d_mlp"}  # older files

# openai afrac_loctypes -> cspkit location types
AFRAC_LOCATIONS = {"attn_in": "attn.in", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
                   "attn_out": "attn.out", "mlp_in": "mlp.in", "mlp_neuron": "mlp.neuron", "mlp_out": "mlp.out"}
# openai hook names (per layer, e.g. "3.attn.act_in") -> cspkit node locations
NODE_NAMES = {"attn.act_in": "attn.in", "attn.q": "attn.q", "attn.k": "attn.k", "attn.v": "attn.v",
              "attn.resid_delta": "attn.out", "mlp.act_in": "mlp.in", "mlp.post_act": "mlp.neuron",
              "mlp.resid_delta": "mlp.out"}


def node_name(openai_name: str) -> str:
    """An openai hook name such as ``3.mlp.post_act`` as the cspkit node location ``3.mlp.neuron``."""
    layer, _, loc = openai_name.partition(".")
    if not layer.isdigit() or loc not in NODE_NAMES:
        raise KeyError(f"{openai_name!r} is not an openai node location; expected LAYER.NAME with NAME one of "
                       f"{list(NODE_NAMES)}")
    return f"{layer}.{NODE_NAMES[loc]}"


# --------------------------------------------------------------------------- config
def read_openai_config(path: str | os.PathLike) -> dict[str, Any]:
    """``beeg_config.json`` with old names mapped, inference-free keys dropped and the reference's
    defaults filled in; an unknown key is an error that names it."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found; an openai model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    raw = json.loads(f.read_text())
    cfg = {RENAMED_KEYS.get(k, k): v for k, v in raw.items() if k not in IGNORED_KEYS}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{f}: unknown key(s) {unknown}; cspkit knows {sorted(DEFAULTS)} and ignores "
                         f"{sorted(IGNORED_KEYS)}. A key that changes the forward pass needs support in cspkit.compat")
    return {**DEFAULTS, **cfg}


def model_config(cfg: dict[str, Any], pos_emb: str = "learned", logits_bias: bool = False) -> ModelConfig:
    """The cspkit ModelConfig of a (read_openai_config) config, or a ValueError that says what
    cspkit cannot reproduce. ``pos_emb`` and ``logits_bias`` come from the weights (see
    load_openai_checkpoint)."""
    if cfg["d_pos_emb"] is not None:
        raise ValueError(f"d_pos_emb={cfg['d_pos_emb']}: this model concatenates a positional embedding to the input "
                         "of every attention and MLP (the early openai models); cspkit adds positions to the residual "
                         "and cannot reproduce it")
    if cfg["use_tied_aux_matrix"]:
        raise ValueError("use_tied_aux_matrix=true: the reference loader refuses it, and so does cspkit")
    for key, ok in (("residual_activation_type", ("identity", "relu")), ("activation_type", ("gelu", "relu"))):
        if cfg[key] not in ok:
            raise ValueError(f"{key}={cfg[key]!r} is not one the reference implements ({list(ok)})")
    d_head = cfg["d_model"] // cfg["n_head"] if cfg["d_head"] is None else cfg["d_head"]
    d_mlp = 4 * cfg["d_model"] if cfg["d_mlp"] is None else cfg["d_mlp"]
    locs = [l for l in cfg["afrac_loctypes"].split(",") if l] if cfg["afrac"] is not None else []
    bad = [l for l in locs if l not in AFRAC_LOCATIONS]
    if bad:
        raise ValueError(f"afrac_loctypes has {bad}, which cspkit cannot reproduce (it supports "
                         f"{list(AFRAC_LOCATIONS)}; resid_post_attn / resid_post_mlp top-k the residual stream itself)")
    d, inner = cfg["d_model"], cfg["n_head"] * d_head
    widths = {"attn_in": d, "attn_q": inner, "attn_k": inner, "attn_v": inner, "attn_out": d, "mlp_in": d,
              "mlp_neuron": d_mlp, "mlp_out": d}
    empty = [l for l in locs if int(cfg["afrac"] * widths[l]) == 0]
    if empty:
        # the reference keeps int(afrac * width) entries, here none: the activation is all zeros
        raise ValueError(f"afrac={cfg['afrac']} keeps no entries at {empty}; such a model computes nothing there")
    return ModelConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg["block_size"], n_layer=cfg["n_layer"], d_model=cfg["d_model"],
        n_head=cfg["n_head"], d_head=d_head, d_mlp=d_mlp, pos_emb=pos_emb, sink=bool(cfg["sink"]),
        bigram_table=bool(cfg["enable_bigram_table"]), afrac=cfg["afrac"] if locs else None,
        afrac_locations=tuple(AFRAC_LOCATIONS[l] for l in locs),
        norm="rms" if cfg["rms_norm"] else "layer", norm_bias=bool(cfg["ln_bias"]) and not cfg["rms_norm"],
        # torch's nn.RMSNorm defaults to the machine epsilon of the input's dtype: float32 here
        norm_eps=torch.finfo(torch.float32).eps if cfg["rms_norm"] else None,
        activation=cfg["activation_type"], bias=bool(cfg["bias"]), tied_unembed=bool(cfg["tied_unembed"]),
        final_logits_bias=logits_bias,
        residual_activation="relu" if cfg["residual_activation_type"] == "relu" else None)


# --------------------------------------------------------------------------- weights
def read_openai_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``final_model.pt`` as a dict of dense fp32 tensors; a file that needs code to unpickle is refused."""
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found; an openai model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise ValueError(f"{f} needs code to unpickle ({culprit[1] if culprit else 'objects other than tensors'}); "
                         "cspkit loads weights only (torch.load weights_only=True) and will not run code from a "
                         "file. Save a plain state dict: torch.save(model.state_dict(), path)") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{f} is not a state dict (a flat mapping of names to tensors)")
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"{f}: tensors {bad} are not floating point; expected model weights")
    # sparse-kernel runs may store sparse tensors; the reference copies them into dense parameters
    return {k: (v.to_dense() if v.layout != torch.strided else v).float() for k, v in state.items()}


def cspkit_name(name: str) -> str:
    """An openai state-dict name as cspkit's (nanoGPT's ``transformer.`` prefix dropped)."""
    if name == "bigram_table":
        return "bigram"
    if name.startswith("transformer."):
        return name.removeprefix("transformer.").replace(".attn.attn_imp.sink_logit", ".attn.sink_logit")
    return name


def openai_name(name: str) -> str:
    """The inverse of cspkit_name, for messages that name the file's keys."""
    if name == "bigram":
        return "bigram_table"
    if name in ("lm_head.weight", "final_logits_bias"):
        return name
    return "transformer." + name.replace(".attn.sink_logit", ".attn.attn_imp.sink_logit")


def _is_causal_mask(name: str) -> bool:
    # the reference's attention without flash registers its causal mask as a buffer named "bias"
    parts = name.split(".")
    return len(parts) == 5 and parts[:2] == ["transformer", "h"] and parts[3:] == ["attn", "bias"]


def _convert_state(state: dict[str, torch.Tensor], model: GPT, source: str) -> dict[str, torch.Tensor]:
    """Rename to cspkit's names and check that the file holds exactly what ``model`` needs."""
    cfg = model.config
    state = {k: v for k, v in state.items() if not _is_causal_mask(k)}
    if cfg.tied_unembed and "lm_head.weight" in state:
        # tied, the reference shares one tensor between wte and lm_head, and lm_head loads last
        state["transformer.wte.weight"] = state.pop("lm_head.weight")
    if cfg.pos_emb == "none":
        state.pop("transformer.wpe.weight")
    if not cfg.final_logits_bias:
        state.pop("final_logits_bias", None)
    out = {cspkit_name(k): v for k, v in state.items()}
    want = model.state_dict()
    missing = [openai_name(k) for k in want if k not in out]
    unexpected = [openai_name(k) for k in out if k not in want]
    wrong = [f"{openai_name(k)}: {tuple(out[k].shape)}, expected {tuple(want[k].shape)}"
             for k in want if k in out and out[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not match its {CONFIG_FILE}: missing {missing}, not used by this config "
                         f"{unexpected}, wrong shapes {wrong}. The reference loader would leave missing weights at "
                         "their random init and ignore unused ones; cspkit refuses both")
    return out


def load_openai_checkpoint(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> GPT:
    """The cspkit GPT (CPU, fp32, eval mode) equivalent to the openai model in ``path``.

    ``tokenizer``: a directory with encoder.json + vocab.bpe; by default ``path`` itself when it
    holds them. Without one, ``model.encoding`` is None: feed token ids of the openai tokenizer.

    The released weights are not shipped (notebook 11 shows where to put them), so this example
    runs only where they are:

    >>> import cspkit
    >>> model = cspkit.load_openai_checkpoint("csp_yolo1")  # doctest: +SKIP
    >>> cspkit.evaluate(model, "single_double_quote")["accuracy"]  # doctest: +SKIP
    """
    path = Path(path)
    theirs = read_openai_config(path)
    state = read_openai_state(path)
    # Both are in the reference's state dict whatever the config; cspkit drops them when they add nothing.
    wpe = state.get("transformer.wpe.weight")
    pos_emb = "none" if wpe is not None and not wpe.any() else "learned"
    bias = state.get("final_logits_bias")
    cfg = model_config(theirs, pos_emb=pos_emb, logits_bias=bias is not None and bool(bias.any()))
    model = GPT(cfg)
    model.load_state_dict(_convert_state(state, model, str(path / WEIGHTS_FILE)))
    tok = Path(tokenizer) if tokenizer is not None else path
    if tokenizer is not None or (tok / ENCODER_FILE).is_file():
        model.encoding = load_openai_tokenizer(tok)
    model.checkpoint = {"openai": {"source": str(path), "beeg_config": json.loads((path / CONFIG_FILE).read_text())}}
    return model.eval()


def convert(src: str | os.PathLike, dst: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> GPT:
    """Write the openai model in ``src`` as a cspkit checkpoint directory ``dst`` (which must not
    exist yet; it appears complete or not at all). The tokenizer (``tokenizer`` or ``src``, as in
    load_openai_checkpoint) is stored beside the weights, so cspkit.load and the CLI use it."""
    dst = Path(dst)
    if dst.exists():  # atomic_dir checks too, but only after the (slow) load
        raise FileExistsError(f"{dst} already exists; choose a new directory or remove it")
    model = load_openai_checkpoint(src, tokenizer)
    if model.encoding is None:
        raise FileNotFoundError(f"no {ENCODER_FILE} + {MERGES_FILE} in {src}; pass the openai tokenizer directory "
                                "(--tokenizer DIR), e.g. the tinypython directory of the circuit-sparsity release")
    if model.encoding.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {model.encoding.n_vocab} tokens, the model only {model.config.vocab_size}")
    with atomic_dir(dst) as tmp:
        tok_file = tmp / checkpoint.TOKENIZER_FILE
        save_ranks(mergeable_ranks(model.encoding), tok_file)
        checkpoint.save(model, tmp, extra={"tokenizer": tokenizer_id(tok_file), **model.checkpoint})
    return model


# --------------------------------------------------------------------------- tokenizer
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte alphabet: a printable byte is its own character, the others are chr(256 + n)
    in byte order. The dict's order (printable first) is the order of the single-byte ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def mergeable_ranks(enc: tiktoken.Encoding) -> dict[bytes, int]:
    """Token bytes -> id for every token of ``enc`` but the special ones."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special}


def load_openai_tokenizer(path: str | os.PathLike) -> tiktoken.Encoding:
    """The tinypython_2k tokenizer from a data-gym pair (``encoder.json`` + ``vocab.bpe`` in ``path``):
    the 256 single bytes in GPT-2's order, then one token per merge line, ``<|endoftext|>`` = 2047.

    This reads the files the way tiktoken's data_gym_to_mergeable_bpe_ranks does, but straight from
    disk (tiktoken's reader caches by path, so a changed file at the same path would go unseen).
    """
    path = Path(path)
    enc_file, bpe_file = path / ENCODER_FILE, path / MERGES_FILE
    for f in (enc_file, bpe_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; the openai tokenizer is a directory with {ENCODER_FILE} and "
                                    f"{MERGES_FILE} (GPT-2 data-gym format)")
    to_byte = {c: b for b, c in _byte_chars().items()}

    def decode(s: str, where: str) -> bytes:
        try:
            return bytes(to_byte[c] for c in s)
        except KeyError as e:
            raise ValueError(f"{where}: {s!r} has a character outside the data-gym byte alphabet") from e

    ranks = {bytes([b]): i for i, b in enumerate(to_byte.values())}
    for n, line in enumerate(bpe_file.read_text(encoding="utf-8").split("\n"), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{bpe_file}:{n}: expected two space-separated tokens, got {line!r}")
        merged = decode(pair[0], f"{bpe_file}:{n}") + decode(pair[1], f"{bpe_file}:{n}")
        if merged in ranks:
            raise ValueError(f"{bpe_file}:{n}: merge {line!r} makes a token that already exists")
        ranks[merged] = len(ranks)
    listed = json.loads(enc_file.read_text(encoding="utf-8"))
    eot = listed.pop(EOT, EOT_ID)
    listed.pop("<|startoftext|>", None)
    if eot != EOT_ID:
        raise ValueError(f"{enc_file} gives {EOT} the id {eot}; tinypython_2k has {EOT_ID}")
    if {decode(k, str(enc_file)): v for k, v in listed.items()} != ranks:
        raise ValueError(f"{enc_file} and {bpe_file} disagree: the ids in {ENCODER_FILE} must be the single bytes in "
                         "GPT-2 order, then the merges in file order")
    if len(ranks) != EOT_ID:
        raise ValueError(f"{path} has {len(ranks)} tokens; tinypython_2k has {EOT_ID} plus {EOT}")
    return tiktoken.Encoding(name="tinypython_2k", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID})


def export_datagym(enc: tiktoken.Encoding, path: str | os.PathLike) -> Path:
    """Write ``enc`` as a data-gym pair (encoder.json + vocab.bpe) in the directory ``path``.

    The format fixes the ids of the 256 single bytes (GPT-2's order), so those ids change unless
    ``enc`` already uses that order; every merged token keeps its place after them, so a
    tokenizer with merges at ranks 256.. keeps their ids. Text splits into the same tokens.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    spell = lambda tok: "".join(chars[b] for b in tok)
    ranks = mergeable_ranks(enc)
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("the encoding lacks some single bytes; a data-gym pair describes a byte-level BPE")
    merges = sorted((r, tok) for tok, r in ranks.items() if len(tok) > 1)
    lines = ["#version: 0.2"]
    for r, tok in merges:
        # Any split into two earlier tokens gives the merged token its rank (tiktoken joins the
        # pair's bytes); take the one whose later part is earliest.
        splits = [(max(ranks[tok[:i]], ranks[tok[i:]]), i) for i in range(1, len(tok))
                  if ranks.get(tok[:i], r) < r and ranks.get(tok[i:], r) < r]
        if not splits:
            raise ValueError(f"token {tok!r} (id {r}) is not a merge of two earlier tokens; not a BPE vocabulary")
        i = min(splits)[1]
        lines.append(f"{spell(tok[:i])} {spell(tok[i:])}")
    encoder = {c: i for i, c in enumerate(chars.values())}
    encoder.update({spell(tok): 256 + n for n, (_, tok) in enumerate(merges)})
    encoder[EOT] = enc.eot_token
    atomic_write(path / MERGES_FILE, "\n".join(lines) + "\n")
    atomic_write(path / ENCODER_FILE, json.dumps(encoder, ensure_ascii=False))
    return path


def convert_report(src: str | os.PathLike, dst: str | os.PathLike, tokenizer: str | os.PathLike | None = None
                   ) -> tuple[dict, str]:
    """What ``cspkit convert-openai`` does: ``convert`` and a summary (object and text)."""
    model = convert(src, dst, tokenizer)
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    nz = sum(int((p != 0).sum()) for p in model.parameters())
    tok = checkpoint.read_config(dst)["tokenizer"]
    obj = {"src": str(src), "dst": str(dst), "params": n, "nonzero": nz, "tokenizer": tok, "config": to_dict(c)}
    return obj, (f"converted {src} -> {dst}: {n:,} parameters, {nz / n:.2%} nonzero; {c.n_layer} layers, "
                 f"d_model {c.d_model}, {c.n_head} heads of {c.d_head}, {c.norm} norm, sink {c.sink}, "
                 f"afrac {c.afrac}, tokenizer {tok}")
