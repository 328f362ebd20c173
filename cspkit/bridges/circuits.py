"""Channels to steer, from a task's circuit in the sparse model: its read nodes, the circuit
itself (given, found in a directory of circuit files, or pruned live), the read channel that best
separates the task's two prompt classes, and its site's other read channels (docs/method.md,
"Bridges").

A directory of circuit files is laid out ``<root>/<model name>/<task>.json`` (``cspkit prune
--out`` writes one file); it is read only where it is passed (``circuits=``), never found.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .. import pruning
from .. import tasks as tasks_mod
from ..ablation import fingerprint
from ..circuit import Circuit
from ..files import atomic_write
from ..model import GPT, node_name
from .maps import load
from .steering import (
    READS,
    Channel,
    channel_stats,
    flip_rates,
    format_flips,
    own_flip_rates,
    pick_channel,
    read_channel,
)


def read_nodes(circuit: Circuit) -> list[str]:
    """A circuit's read channels (its ``L.attn.in`` and ``L.mlp.in`` nodes), the ones a bridge can steer."""
    return [node_name(loc, i) for loc, idx in circuit.nodes.items() if loc.split(".", 1)[1] in READS for i in idx]


def model_names(sparse: GPT) -> list[str]:
    """Names a sparse model's circuits may be filed under in ``<root>/<name>/``: its own
    directory's name and, for a bridge's sparse model (``<bridge>/sparse``), the bridge's and the
    checkpoint it started from (with ``train_sparse`` off, the very same weights)."""
    names = []
    path = getattr(sparse, "path", None)
    if path:
        p = Path(path)
        names += [p.name] + ([p.parent.name] if p.name == "sparse" else [])
    init = ((getattr(sparse, "checkpoint", None) or {}).get("train") or {}).get("init_from")
    if init:
        names.append(Path(init).name)
    return list(dict.fromkeys(n for n in names if n))


def find_circuit(sparse: GPT, task: str, root: str | os.PathLike) -> Path | None:
    """The first ``<root>/<name>/<task>.json`` (names from ``model_names``) that was found in this
    very model (the circuit file's weight fingerprint), or None."""
    root = Path(root)
    fp = None
    for name in model_names(sparse):
        path = root / name / f"{tasks_mod.get(task).name}.json"
        if not path.is_file():
            continue
        fp = fp or fingerprint(sparse)
        if json.loads(path.read_text()).get("model_fingerprint") in (None, fp):
            return path
    return None


def task_circuit(sparse: GPT, task: str, circuit: Circuit | str | os.PathLike | None = None,
                 circuits: str | os.PathLike | None = None, progress: bool = True, **prune_kw) -> Circuit:
    """The task's circuit in ``sparse``: ``circuit`` itself (a Circuit, or a circuit file, which must
    have been found in this model), else the file ``find_circuit`` finds in the directory
    ``circuits`` (where given), else a new one from ``cspkit.prune(sparse, task, **prune_kw)`` (a
    minute or two on CPU; not saved). The circuit's ``source`` says where it came from: the file,
    or ``"pruned"``."""
    if circuit is None:
        path = find_circuit(sparse, task, circuits) if circuits is not None else None
        if path is None:
            if progress:
                where = (f" in {circuits}/{{{','.join(model_names(sparse))}}}/" if circuits is not None
                         else " given")
                print(f"no {task} circuit of this model{where}; pruning one (a minute or two on CPU)",
                      file=sys.stderr)
            circuit = pruning.prune(sparse, task, progress=progress, **prune_kw)
            circuit.source = "pruned"
            return circuit
        circuit = path
    if not isinstance(circuit, Circuit):
        path, circuit = circuit, Circuit.load(circuit, model=sparse)
        circuit.source = str(path)
    else:
        circuit.attach(sparse)
    if circuit.task != tasks_mod.get(task).name:
        raise ValueError(f"the circuit is for task {circuit.task!r}, not {task!r}")
    return circuit


def circuit_channel(sparse: GPT, task: str, circuit: Circuit | str | os.PathLike | None = None,
                    circuits: str | os.PathLike | None = None, progress: bool = True, split: str = "train",
                    n: int | None = None, at: str = "diff") -> tuple[Channel, Circuit]:
    """The sparse read channel in the task's circuit that best separates the task's two prompt
    classes at the token ``at`` (``pick_channel`` over ``read_nodes``; see ``channel_stats``), and
    the circuit (``circuit``, else from the directory ``circuits``, else pruned: see ``task_circuit``)."""
    c = task_circuit(sparse, task, circuit, circuits, progress)
    reads = read_nodes(c)
    if not reads:
        raise ValueError(f"the {c.task} circuit ({c.n_nodes} nodes) keeps no read channel (L.attn.in / L.mlp.in) "
                         "to steer; name a node instead")
    return pick_channel(sparse, task, reads, split, n, at), c


def site_channels(sparse: GPT, task: str, circuit: Circuit, channel: Channel, split: str = "train",
                  n: int | None = None) -> list[Channel]:
    """All of the circuit's read channels at ``channel``'s site (read at the same token), the
    most separating first: steered together (``flip_rates`` with the list), they move the
    circuit's reads at that site from one class's means to the other's."""
    site = read_channel(sparse, channel.node)[0]
    nodes = [x for x in read_nodes(circuit) if read_channel(sparse, x)[0] == site]
    if channel.node not in nodes:
        nodes.insert(0, channel.node)
    return sorted(channel_stats(sparse, task, nodes, split, n, at=channel.at), key=lambda ch: -abs(ch.score))


def shown_path(path) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    if path is None or not os.path.isabs(path):  # "pruned": found live, not read from a file
        return str(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def steer_report(bridge_dir: str | os.PathLike, task: str, node: str = "auto",
                 circuit: str | os.PathLike | None = None, circuits: str | os.PathLike | None = None,
                 at: str = "diff", all_site_channels: bool = False, strengths=(0.25, 0.5, 1.0),
                 split: str = "test", n: int | None = None, seed: int = 0, out: str | os.PathLike | None = None,
                 progress: bool = True) -> tuple[dict, str]:
    """What ``cspkit intervene`` does: steer the dense model of the bridge in ``bridge_dir``
    through one sparse read channel (``node``, or ``auto``: the task circuit's most separating
    read), or through all of the circuit's reads at that site, and report the flip rates against
    the random control; the result also written to ``out`` as JSON when given."""
    dense, sparse, bridge = load(bridge_dir)
    found = None
    if node == "auto":
        ch, found = circuit_channel(sparse, task, circuit, circuits, progress=progress, at=at)
        how = (f" (auto: of the {len(read_nodes(found))} read channels of the {found.n_nodes}-node "
               f"circuit {shown_path(found.source)}, the one that best separates the two prompt classes)")
    else:
        ch, how = channel_stats(sparse, task, [node], at=at)[0], ""
    if all_site_channels:
        if found is None:
            found = task_circuit(sparse, task, circuit, circuits, progress=progress)
        ch = site_channels(sparse, task, found, ch)
        how += f", with all {len(ch)} of the circuit's read channels at its site, each by its own delta"
    r = flip_rates(dense, sparse, bridge, task, ch, strengths, split, n, seed)
    own = own_flip_rates(sparse, task, ch, strengths, split, n, seed)
    r["own"] = {"sparse_right": own["sparse_right"], "rows": own["rows"]}
    if found is not None:
        r["circuit"] = {"source": shown_path(found.source), "nodes": found.n_nodes, "read_nodes": read_nodes(found)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps(r, indent=1) + "\n")
    token = "last token" if r["at"] == "last" else "first token where the pair's prompts differ"

    def first(k: str) -> float:
        return r[k] if isinstance(r[k], float) else r[k][0]
    lines = [f"{r['task']}: steering {ch.node if isinstance(ch, Channel) else ch[0].node}{how}, through "
             f"the bridge at site {r['site']} at every token",
             f"class means of {r['node'] if isinstance(r['node'], str) else r['node'][0]} at the {token}, train "
             f"prompts: A {first('mean_a'):.3f}, B {first('mean_b'):.3f} ({first('score'):+.2f} pooled sd); "
             f"delta = B - A = {first('delta'):+.3f} (A prompts +delta, B prompts -delta)",
             f"{r['split']} split: the dense model prefers the right candidate on {r['dense_right']} of "
             f"{r['prompts']} prompts; flip rate = the fraction of those that switch to the other class's answer; "
             "logit shift = mean change of their other-minus-own candidate logit gap; P(other) = mean probability "
             "of the other class's answer over the whole vocabulary; strength s moves the channel s of the way from "
             "its class's mean to the other class's (above 1: extrapolation)",
             format_flips(r["rows"]),
             f"the sparse model itself, the same change made in it ({r['own']['sparse_right']} prompts right "
             "unsteered):",
             format_flips(r["own"]["rows"])]
    return r, "\n".join(lines)
