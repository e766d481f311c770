"""What the tests run under torchrun (2 CPU ranks, gloo), and :func:`torchrun`; not a test module itself.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py fsdp OUT spider
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py trainer OUT spider

``fsdp OUT RULE``: a tiny Llama sharded with FSDP2 (``fully_shard`` per decoder layer and at the root), trained
for :data:`STEPS` steps on :func:`batches` — each rank its interleaved half of every batch — twice: once with the
rule's plain API and once through ``SpiderCallback``'s hooks, called as the Trainer calls them. Rank 0 writes the
whole trained weights (``plain.safetensors``, ``callback.safetensors``); every rank writes its pieces of the rule's
state (``rank{R}.safetensors``: θ₀, and G or the mask) and ``rank{R}.json`` (the rule's history and
``extra_bytes()``, the whole-tensor moments of |θ₀| it computed, and :func:`moment_checks`).

``trainer OUT RULE``: the transformers Trainer (accelerate's DDP on CPU) with ``SpiderCallback``, per-device batch
:data:`PER_RANK`; rank 0 writes ``trainer.safetensors`` and ``trainer.json``. ``trainer_fsdp OUT RULE``: the same
with FSDP2 (``fsdp_config={"version": 2}``), one GPU per rank: accelerate applies FSDP on GPUs only.

``cli OUT ARGS… [--then ARGS…]``: ``forgetless.cli.main(ARGS)``, as ``python -m forgetless.cli ARGS`` runs it;
after ``--then`` another command in the same process, as the cgm chain computes its statistics one after the
other (rank 1 starts it a second after rank 0: a rank that reads its peer's address before the peer has
published it fails at once).

Every mode ends with rank R writing ``OUT/threads{R}.json``: the gloo threads alive right after each of its process
groups ended and at its end, which must be none (a gloo thread alive while the interpreter finalizes may abort it).

The single-process references are computed by the test itself, from :func:`tiny_model` and :func:`batches`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TEXT

STEPS, LR, CLIP = 3, 1e-2, 0.5
ROWS, PER_STEP, PER_RANK = 8, 4, 2  # 8 rows of 8 tokens; every optimizer step takes 4 of them, 2 per rank
# shapes whose Shard(0) pieces on 2 ranks are uneven or empty (1 row: rank 1 gets none), and degenerate values
MOMENT_CASES = {"one_row": (1, 5), "odd": (7, 4), "three": (3,), "constant": (1000,), "zeros": (5, 3)}


def tiny_model():
    """A two-layer Llama from a config, same weights every call (its RMSNorm weights are all 1: ties everywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TEXT, "num_hidden_layers": 2}))
    model.model.embed_tokens.requires_grad_(False)  # a frozen tensor among trainable ones
    return model.train()


def rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, TEXT["vocab_size"], (ROWS, 8), generator=g)


def batches() -> list[torch.Tensor]:
    """The rows of each optimizer step (every row has all its tokens labelled: each rank's mean loss weighs
    its rows as the whole batch's mean does)."""
    ids = rows()
    return [ids[(s * PER_STEP + torch.arange(PER_STEP)) % ROWS] for s in range(STEPS)]


def moment_case(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(name))
    shape = MOMENT_CASES[name]
    if name == "constant":
        return torch.full(shape, -0.1)
    if name == "zeros":
        return torch.zeros(shape)
    return torch.randn(shape, generator=g)


def moment_checks(mesh) -> dict[str, list[float]]:
    """``abs_moments`` of each :data:`MOMENT_CASES` tensor from its sharded pieces (all-reduced): [mean, std]."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from forgetless.train.spider import abs_moments, local_part, sharding_of

    out = {}
    for name in MOMENT_CASES:
        piece = distribute_tensor(moment_case(name), mesh, [Shard(0)], src_data_rank=None)
        mean, std = abs_moments(local_part(piece), sharding=sharding_of(piece, name))
        out[name] = [float(mean), float(std)]
    return out


def shard(model, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def whole(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (a collective: every rank calls it)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def train_fsdp(rule_name: str, mesh, via_callback: bool):
    from types import SimpleNamespace

    from forgetless.train.spider import SpiderCallback, make_rule

    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    shard(model, mesh)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    if via_callback:
        callback = SpiderCallback(rule_name)
        args = SimpleNamespace(fsdp="full_shard", deepspeed=None, fp16=False)
        callback.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
        rule = callback.rule
    else:
        rule = make_rule(rule_name, params)
    for ids in batches():
        mine = ids[rank::world]
        model(input_ids=mine, labels=mine).loss.backward()  # FSDP2 averages the ranks' gradients
        torch.nn.utils.clip_grad_norm_(params.values(), CLIP)  # the whole gradient's norm, over the pieces
        if via_callback:
            callback.on_pre_optimizer_step(args, None, None)
            opt.step()
            callback.on_optimizer_step(args, None, None)
        else:
            rule.accumulate()
            opt.step()
            rule.apply()
        opt.zero_grad()
    return model, rule


def run_fsdp(rule_name: str, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, rule = train_fsdp(rule_name, mesh, via_callback=False)
    weights = whole(model)
    cb_model, _ = train_fsdp(rule_name, mesh, via_callback=True)
    cb_weights = whole(cb_model)
    state = {f"theta0/{n}": t for n, t in rule.theta0.items()}
    if rule_name == "spider":
        state |= {f"grad_sum/{n}": t for n, t in rule.grad_sum.items()}
        moments0 = {n: [float(x) for x in m] for n, m in rule._moments0.items()}  # as the rule keeps them
    else:
        state |= {f"mask/{n}": t for n, t in rule.mask.items()}
        moments0 = {}
    checks = moment_checks(mesh)
    getattr(
        mesh, "_pg_registry", {}
    ).clear()  # torch's DTensor dispatch cache keeps the mesh for good: it must not keep the group
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "history": rule.history,
                "extra_bytes": rule.extra_bytes(),
                "moments0": moments0,
                "moment_checks": checks,
                "sharded": sorted(n for n, s in rule.shards.items() if s is not None),
            }
        )
    )
    if rank == 0:
        save_file(weights, str(out / "plain.safetensors"))
        save_file(cb_weights, str(out / "callback.safetensors"))


def trainer_args(output_dir: Path, per_device: int, fsdp: bool, cpu: bool):
    from trainer_args import quiet_args

    sharding = (
        {
            "fsdp": "full_shard",
            "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        }
        if fsdp
        else {}
    )
    return quiet_args(output_dir, steps=STEPS, lr=LR, batch=per_device, clip=CLIP, cpu=cpu, **sharding)


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = rows()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_with_trainer(rule_name: str, output_dir: Path, per_device: int, fsdp: bool, cpu: bool):
    """The Trainer with SpiderCallback; under torchrun accelerate wraps the model in DDP (or shards it with FSDP2)
    and gives each rank every world-th batch of ``per_device`` rows of the one seeded shuffle (so the global batch
    is their union)."""
    from transformers import Trainer

    from forgetless.train.spider import SpiderCallback

    model = tiny_model()
    callback = SpiderCallback(rule_name)
    Trainer(
        model=model,
        args=trainer_args(output_dir, per_device, fsdp, cpu),
        train_dataset=Rows(),
        callbacks=[callback],
    ).train()
    return model, callback.rule


def run_trainer(rule_name: str, out: Path, fsdp: bool = False) -> None:
    """``trainer``: DDP on CPU; ``trainer_fsdp``: FSDP2 on one GPU per rank (accelerate shards on GPUs only)."""
    from forgetless.train.spider import DTensor

    model, rule = train_with_trainer(rule_name, out / "trainer", PER_RANK, fsdp, cpu=not fsdp)
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
        for n, p in model.named_parameters()
    }  # gathered whole on every rank (a collective under FSDP)
    if dist.get_rank() == 0:
        save_file(weights, str(out / "trainer.safetensors"))
        (out / "trainer.json").write_text(
            json.dumps({"history": rule.history, "world": dist.get_world_size()})
        )


def gloo_threads() -> int:
    """How many of this process's threads are gloo's (its worker and TCP loop threads, named by torch)."""
    names = (Path(f"/proc/self/task/{t}/comm").read_text() for t in os.listdir("/proc/self/task"))
    return sum(n.startswith(("pt_gloo", "gloo")) for n in names)


def torchrun(mode: str, out: Path, *args: str, timeout: int = 120) -> list[int]:
    """This worker's ``mode out args…`` on 2 ranks, one CPU thread each; fail with their output, or if a rank
    had a gloo thread alive once a process group ended or at its exit. Returns rank 0's ends (see :func:`main`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        mode,
        str(out),
        *args,
    ]
    out.mkdir(exist_ok=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    ranks = [json.loads((out / f"threads{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["at_exit"] == 0 and set(ranks[0]["ends"]) == {0}, ranks
    return ranks[0]["ends"]


def main(what: str, out: Path, args: list[str]) -> None:
    """Run the mode, then write ``threads{RANK}.json``: the gloo threads alive right after each process group
    ended (``ends``: the group's threads are joined as it ends) and at the end (``at_exit``)."""
    from forgetless.stats import distributed

    ends: list[int] = []
    end = distributed.end_process_group

    def counted_end(wait: bool = True) -> None:
        end(wait)
        ends.append(gloo_threads())

    distributed.end_process_group = counted_end
    if what == "fsdp":
        with distributed.process_group("cpu"):
            run_fsdp(args[0], out)
    elif what == "cli":
        from forgetless.cli import main as cli

        commands: list[list[str]] = [[]]
        for a in args:
            commands.append([]) if a == "--then" else commands[-1].append(a)
        for i, command in enumerate(commands):
            if i and os.environ["RANK"] == "1":
                time.sleep(1.0)
            cli(command)  # a failure exits here
    else:
        run_trainer(args[0], out, fsdp=what == "trainer_fsdp")
        distributed.end_process_group()  # accelerate's group: nothing in the Trainer ends it
    threads = {"ends": ends, "at_exit": gloo_threads()}
    (out / f"threads{os.environ['RANK']}.json").write_text(json.dumps(threads))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
