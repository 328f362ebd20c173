"""Every config dataclass (model, training, bridge, pruning, sweep): plain dataclasses, JSON on
disk, ``key=value`` overrides; unknown keys are rejected with a suggestion. Named recipes are in
cspkit.profiles."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The node locations of one layer, in forward order (docs/method.md, "Model").
LOCATION_TYPES = ("attn.in", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.neuron", "mlp.out")


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    block_size: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 16
    d_head: int = 16
    d_mlp: int = 1024
    pos_emb: str = "learned"          # "learned" or "none" (causal attention alone)
    sink: bool = True                 # per-head learnable logit on an extra zero-valued slot
    bigram_table: bool = False        # dense vocab x vocab logits table, never sparsified
    afrac: float | None = 0.25        # AbsTopK fraction kept; None disables activation sparsity
    afrac_locations: tuple[str, ...] = LOCATION_TYPES
    norm: str = "rms"                 # "rms" (RMSNorm) or "layer" (LayerNorm, for compat)
    norm_bias: bool = False           # LayerNorm bias (compat only)
    activation: str = "gelu"          # "gelu" or "relu"
    bias: bool = True
    tied_unembed: bool = False
    final_logits_bias: bool = False   # compat: openai models may carry a logits bias
    attn_scale: float | None = None   # None: 1 / sqrt(d_head)
    # compat (cspkit.compat). Both default to None so that configs saved before they existed
    # still compare equal key by key when a run is resumed.
    norm_eps: float | None = None     # None: 1e-5; openai RMSNorm models use float32's machine epsilon
    residual_activation: str | None = None  # "relu": ReLU on the residual after each block adds its output

    def __post_init__(self):
        self.afrac_locations = tuple(self.afrac_locations)
        bad = [l for l in self.afrac_locations if l not in LOCATION_TYPES]
        if bad:
            raise ValueError(f"afrac_locations has unknown location types {bad}; known: {list(LOCATION_TYPES)}")
        for name, val, ok in (("pos_emb", self.pos_emb, ("learned", "none")), ("norm", self.norm, ("rms", "layer")),
                              ("activation", self.activation, ("gelu", "relu")),
                              ("residual_activation", self.residual_activation, (None, "relu"))):
            if val not in ok:
                raise ValueError(f"{name}={val!r} is not supported; choose one of {list(ok)}")
        if self.afrac is not None and not 0 < self.afrac <= 1:
            raise ValueError(f"afrac={self.afrac} must be in (0, 1] or None")


def is_shard_dir(path: str) -> bool:
    """Whether ``path`` holds shards built before (cspkit.data.build_shards): a corpus entry that
    is such a directory stands for all the entries it was built from."""
    return (Path(path) / "info.json").is_file()


def may_stand_for_several(entry: str) -> bool:
    """Whether a lone corpus entry may stand for several, so that its weights cannot be counted
    here: shards built before, or a path that is not on this machine (a config recorded on
    another, where it may have been shards). cspkit.data counts the one and names the other when
    it reads them."""
    return is_shard_dir(entry) or "/" in entry and not Path(entry).exists()


def check_corpus_weights(weights: list[float], n: int | None, entries: str) -> None:
    """Refuse weights that are not one non-negative number per corpus entry, some positive;
    ``n`` None: the entries are not known yet (a shard directory), so their count is left."""
    if n is not None and len(weights) != n or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"corpus_weights={weights} needs {n} non-negative numbers, one per corpus entry "
                         f"{entries}, not all zero")


# TrainConfig fields that do not change what is trained: a run may resume with other values
RUNTIME_FIELDS = ("device", "threads", "stop_at_step")


@dataclass
class TrainConfig:
    max_steps: int = 2400
    batch_size: int = 16              # sequences per step per process
    lr: float = 6e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 0.1                  # large Adam epsilon (paper)
    weight_decay: float = 0.1         # applied by hand after each step, matrices only
    warmup_frac: float = 0.01
    dense: bool = False               # same architecture, no weight sparsity
    l0_frac: float = 1 / 16           # final fraction of nonzeros in weight matrices
    l0_frac_embed: float = 1 / 4      # final fraction for embeddings, unembedding and biases
    min_per_neuron: int = 0           # j: nonzeros forced per neuron / channel (0 = off)
    anneal_start: float = 0.01        # fraction of training where L0 annealing starts
    anneal_end: float = 0.5           # ... and where it reaches its final value
    sharkfin: bool = True
    eval_interval: int = 250
    eval_batches: int = 8
    log_interval: int = 10
    ckpt_interval: int = 250
    stop_at_val_loss: float | None = None  # end early at the first eval at or below this
    # end this invocation after this step, with a checkpoint; the schedule stays max_steps', so the
    # same command without it (or with a later one) resumes the run: a long run spans several invocations
    stop_at_step: int | None = None
    init_from: str | None = None      # checkpoint dir whose weights start the run (continued training)
    # warm restarts after the schedule above, one per entry, of that many steps: each is a run of
    # its own (OUT/stages/K, the last in OUT) begun from the weights before it with a fresh
    # optimizer, seed + K, warm-up and linear decay at the final sparsity (cspkit.training.stages)
    cycles: list[int] | None = None
    seed: int = 0
    corpus: list[str] | None = None   # directories / files / globs / stdlib / package:NAME; None = stdlib
    corpus_weights: list[float] | None = None  # share of windows drawn from each corpus entry; None: by size
    val_percent: float = 5.0
    eval_tasks: list[str] | None = None  # tasks (cspkit.tasks) scored on their test split at every eval
    device: str = "auto"
    threads: int | None = None        # torch CPU threads (None: torch's default)
    # "bf16": the forward pass under bfloat16 autocast (weights, gradients, Adam and the projection
    # stay fp32); None: fp32 throughout. None by default so that older configs resume unchanged.
    autocast: str | None = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if isinstance(self.corpus, str):  # one path, not a sequence of characters
            self.corpus = [self.corpus]
        if self.corpus_weights is not None:
            self.corpus_weights = [float(w) for w in self.corpus_weights]
            entries = self.corpus or ["stdlib"]
            n = None if len(entries) == 1 and may_stand_for_several(entries[0]) else len(entries)
            check_corpus_weights(self.corpus_weights, n, f"{entries}")
        if not 0 < self.l0_frac <= 1 or not 0 < self.l0_frac_embed <= 1:
            raise ValueError("l0_frac and l0_frac_embed must be in (0, 1]")
        if not 0 <= self.anneal_start <= self.anneal_end <= 1:
            raise ValueError("need 0 <= anneal_start <= anneal_end <= 1")
        if self.cycles is not None:
            self.cycles = [int(c) for c in self.cycles]
            if not self.cycles or min(self.cycles) < 1:
                raise ValueError(f"cycles={self.cycles} needs one positive step count per warm restart "
                                 "(cycles=[2400,2400], say), or null for none")
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"autocast={self.autocast!r} is not supported; choose None (fp32) or 'bf16'")


@dataclass
class BridgeConfig:
    """A bridge between a dense and a sparse model and its loss (docs/method.md, "Bridge loss"; cspkit.bridges).

    loss = sparse LM loss + nmse_coef * (NMSE of encoder + NMSE of decoder)
                          + kl_coef * (KL(dense || dense->sparse hybrid) + KL(dense || sparse->dense hybrid)),
    each bridge term averaged over the sites it was computed at.
    """
    enc_afrac: float | None = 0.25    # AbsTopK fraction the encoder keeps (as the sparse models' afrac); None: off
    nmse_coef: float = 1.0            # both maps' normalized MSE (1 = a map that predicts the mean)
    kl_coef: float = 1.0              # both hybrid passes' KL against the dense model's output, nats per token
    kl_sites: int | None = None       # sites per step that run the hybrid passes, drawn by the seed; None: all
    train_sparse: bool = True         # False: the sparse model stays frozen too and only the maps learn

    def __post_init__(self):
        if self.enc_afrac is not None and not 0 < self.enc_afrac <= 1:
            raise ValueError(f"enc_afrac={self.enc_afrac} must be in (0, 1] or None")
        if self.kl_sites is not None and self.kl_sites < 1:
            raise ValueError(f"kl_sites={self.kl_sites} must be at least 1, or None for every site")
        if self.nmse_coef < 0 or self.kl_coef < 0:
            raise ValueError("nmse_coef and kl_coef must be >= 0")


@dataclass
class PruneConfig:
    # The penalty per kept node is k_coef * multiplier, on a model of k_ref_nodes nodes (small-v1's
    # 11,264; on a model of n nodes each node costs k_coef * k_ref_nodes / n, so keeping a given
    # fraction of the nodes costs the same at every size; None: k_coef as given). The multiplier
    # starts at penalty_start and follows the target by dual ascent: after every step its log moves
    # by penalty_rate * (target - loss) / target, with loss a moving average of the batch's
    # calibrated task loss (the step capped at 3 * penalty_rate), so it grows while the masks do
    # better than the target and shrinks when they do worse. Starting tiny makes the nodes close
    # in order of how little they matter instead of all at once, which is how a fixed penalty
    # collapsed masks on dense models (docs/method.md, "Penalty"). penalty_start=1,
    # penalty_rate=0: a fixed penalty k_coef.
    # lr, init, weight decay, beta2 and temperature were chosen on the shipped small sparse
    # model's quote task; the paper's search centres are k_coef 1e-4, noise 1e-2, bias 1e-1,
    # weight decay 1e-3, lr 3e-3, beta2 0.95, warm-up 5 percent, temperature 1.
    steps: int = 70
    # up to this many steps more (None: as many as steps), 10 at a time, while the masks' own node
    # set scores under 0.8 x the target on the held-out pairs (the multiplier still growing;
    # cspkit.pruning.MaskSteps.train)
    extra_steps: int | None = None
    batch_pairs: int = 16
    lr: float = 3e-2
    k_coef: float = 3e-3
    k_ref_nodes: int | None = 11264
    penalty_start: float = 1e-2
    penalty_rate: float = 0.2
    # the multiplier's ceiling: penalty_max=1 stops it at the fixed penalty's strength (docs/method.md,
    # "Penalty")
    penalty_max: float = 1e6
    # when the multiplier overshot at the end (settle went back to an earlier step), train the masks
    # again from the start with a fixed penalty of this strength, at most penalty_max
    # (penalty_start=retry_penalty, penalty_rate=0), and keep whichever run's kept masks are fewer
    # and meet the target; None: no second run (docs/method.md, "Penalty")
    retry_penalty: float | None = 1.0
    # the masks train on the calibrated task loss, its scale and shift learned alongside them
    # (False: on the raw loss, as before the multiplier)
    calibrate_masks: bool = True
    # edge masks (prune(..., edges=True)) start their multiplier here: a node circuit already sits
    # near the target, with few units that each matter, so there is no crowd of redundant ones to
    # close all at once; on the quote circuit 1.0 kept 38 of 55 edges, 0.01 kept 44 and 10 kept 43
    edge_penalty_start: float = 1.0
    init_noise: float = 1e-2
    init_bias: float = 1e-1
    weight_decay: float = 1e-3
    beta2: float = 0.95
    warmup_frac: float = 0.05
    temperature: float = 1.0
    heldout_pairs: int = 64
    calib_pairs: int = 32
    calib_steps: int = 16

    def __post_init__(self):
        if self.k_ref_nodes is not None and self.k_ref_nodes < 1:
            raise ValueError(f"k_ref_nodes={self.k_ref_nodes} must be a positive node count, or None for no scaling")
        if self.retry_penalty is not None and self.retry_penalty <= 0:
            raise ValueError(f"retry_penalty={self.retry_penalty} must be positive, or None for no second mask run")
        if not (0 < self.penalty_start <= self.penalty_max and self.edge_penalty_start > 0) or self.penalty_rate < 0:
            raise ValueError(f"penalty_start={self.penalty_start} and edge_penalty_start={self.edge_penalty_start} "
                             f"must be positive, penalty_start at most penalty_max={self.penalty_max}, "
                             f"and penalty_rate={self.penalty_rate} at least 0 "
                             "(penalty_start=1, penalty_rate=0: a fixed penalty)")

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        check_keys(cls, d, "prune config")
        if "penalty_start" not in d:    # written before the multiplier: a fixed penalty on the raw loss
            d = {"penalty_start": 1.0, "penalty_rate": 0.0, "calibrate_masks": False, **d}
        if "retry_penalty" not in d:    # written before the retry: a single mask run
            d = {"retry_penalty": None, **d}
        return cls(**d)

    def node_penalty(self, n_nodes: int) -> float:
        """The penalty per kept node on a model of ``n_nodes`` nodes."""
        return self.k_coef if self.k_ref_nodes is None else self.k_coef * self.k_ref_nodes / n_nodes


@dataclass
class SweepConfig:
    """Circuit sizes over models x tasks x targets x pruning seeds (cspkit.sweeps)."""
    models: list[str]
    tasks: list[str] | None = None    # None: every registered task
    targets: list[float] = field(default_factory=lambda: [0.15])
    seeds: list[int] = field(default_factory=lambda: [0])
    ablation: str = "mean"
    prune: PruneConfig = field(default_factory=PruneConfig)


def check_keys(cls, d: dict[str, Any], what: str, names: list[str] | None = None) -> None:
    names = names or [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
        raise ValueError(f"unknown {what} key(s): {hint}. Known keys: {', '.join(names)}")


def from_dict(cls, d: dict[str, Any], what: str | None = None):
    check_keys(cls, d, what or cls.__name__)
    return cls(**d)


def to_dict(cfg) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def apply_overrides(mcfg: ModelConfig, tcfg: TrainConfig, overrides: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """``key=value`` pairs (value parsed as JSON when it can be); ``model.key`` / ``train.key``
    pick a config explicitly, a bare key must name a field of exactly one of them."""
    out = override_configs({"model": mcfg, "train": tcfg}, overrides)
    return out["model"], out["train"]


def override_configs(cfgs: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """apply_overrides for any named dataclass configs, e.g. {"bridge": ..., "train": ...}:
    ``scope.key=value`` picks the config named scope; a bare key goes to the first that has it."""
    ds = {scope: to_dict(c) for scope, c in cfgs.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in ds:
                raise ValueError(f"override {key!r}: prefix must be " + " or ".join(f"'{s}.'" for s in ds))
            d = ds[scope]
        else:
            d = next((d for d in ds.values() if name in d), None)
            if d is None:
                check_keys(None, {name: 0}, " or ".join(ds), names=[k for d in ds.values() for k in d])
        if name not in d:
            check_keys(type(cfgs[scope]), {name: 0}, scope)
        d[name] = val
    return {scope: from_dict(type(cfgs[scope]), d) for scope, d in ds.items()}
