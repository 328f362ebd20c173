"""Bridges between a dense and a sparse model, and steering the dense model through the sparse
model's channels (docs/method.md, "Bridges", with "Bridge loss" and "Interventions").

A bridge pairs two models of the same depth and tokenizer site by site (a site is the residual
stream entering a sublayer: ``0.attn``, ``0.mlp``, ``1.attn``, ...). At every site it holds an
encoder, dense residual -> sparse residual (linear, then AbsTopK), and a decoder, sparse
residual -> dense residual (linear). A hybrid pass switches model once: the dense model up to a
site, the encoder, the sparse model from there (``d2s``), or the sparse model, the decoder, the
dense model (``s2d``).

The loss: the sparse model's language-model loss, plus nmse_coef times both maps' normalized
MSE, plus kl_coef times both hybrid passes' KL(dense output || hybrid output), the bridge terms
averaged over sites (``BridgeConfig``). The dense model is frozen; gradients flow into the maps
and, unless ``train_sparse`` is off, the sparse model.

Steering (``intervene``): change one sparse read channel (``L.attn.in[c]``, ``L.mlp.in[c]``) by
delta at every token, carry that change through the decoder into the dense residual at the
channel's site, and run the dense model on; ``flip_rates`` counts how often that flips the
dense model's answer on a task, against a random direction of the same norm.

The shipped bridge joins ``small-dense`` to ``small-sparse``; steering one read channel of the
quote circuit (strength 0 leaves the dense model's logits exactly as they were):

>>> import torch
>>> from cspkit import bridges, paths
>>> dense, sparse, bridge = bridges.load(paths.models_dir() / "small-bridge")
>>> tokens = torch.tensor([dense.encoding.encode("x = 'a'")])
>>> steered = bridges.intervene(dense, sparse, bridge, "3.attn.in[112]", -5.0, 1.0, tokens=tokens)
>>> unsteered = bridges.intervene(dense, sparse, bridge, "3.attn.in[112]", -5.0, 0.0, tokens=tokens)
>>> torch.equal(unsteered, dense(tokens)), torch.equal(steered, dense(tokens))
(True, False)

``train(...)`` makes a bridge, ``load(path)`` reads one back, ``flip_rates(...)`` measures the
steering on a task; each has its own example.

Modules, each importing only those above it:

- ``maps``: the ``Bridge`` module, the passes (``run_sublayers``, ``hybrid``), the loss and its
  terms, the least-squares start, bridge files (``load``);
- ``evaluation``: the bridge's ``quality``: each map's fraction of variance explained and each
  hybrid pass's KL, per site, beside trivial baselines (``report`` for a bridge directory);
- ``training``: a bridge profile's configs (``configs_for``) and ``train``;
- ``steering``: ``steering_vector``, ``intervene``, channel statistics, ``flip_rates``;
- ``circuits``: the channels of a task's circuit (``circuit_channel``, ``site_channels``).
"""
from .circuits import (
    circuit_channel,
    find_circuit,
    model_names,
    read_nodes,
    shown_path,
    site_channels,
    steer_report,
    task_circuit,
)
from .evaluation import format_quality, quality, report, report_file, val_tokens
from .maps import (
    KINDS,
    Bridge,
    bridge_loss,
    check_pair,
    file_digest,
    hybrid,
    init_maps_,
    kl,
    load,
    nmse,
    residuals,
    run_sublayers,
    save_bridge,
    sites,
    step_sites,
)
from .steering import (
    AT,
    READS,
    Channel,
    channel_stats,
    diff_positions,
    flip_rate,
    flip_rates,
    format_flips,
    intervene,
    own_flip_rates,
    pick_channel,
    read_channel,
    read_channels,
    steering_fidelity,
    steering_vector,
)
from .training import configs_for, train, train_report

__all__ = [
    # maps
    "KINDS", "Bridge", "sites", "check_pair", "run_sublayers", "residuals", "nmse", "kl", "hybrid", "bridge_loss",
    "step_sites", "init_maps_", "file_digest", "save_bridge", "load",
    # training
    "configs_for", "train", "train_report",
    # evaluation
    "quality", "val_tokens", "format_quality", "report", "report_file",
    # steering
    "READS", "AT", "Channel", "read_channel", "read_channels", "steering_vector", "intervene", "diff_positions",
    "channel_stats", "pick_channel", "flip_rate", "flip_rates", "own_flip_rates", "steering_fidelity", "format_flips",
    # circuits
    "read_nodes", "model_names", "find_circuit", "task_circuit", "circuit_channel", "site_channels", "shown_path",
    "steer_report",
]
