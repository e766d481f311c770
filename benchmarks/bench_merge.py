"""Merge-engine benchmark: forgetless vs mergekit on the same checkpoints.

Measured (see BENCHMARKS.md, "Merge engine (foundation)"):

1. TIES over three fine-tunes of SmolLM2-135M (fp32): median wall time and peak RSS of ``forgetless merge`` and
   ``mergekit-yaml``, each run as a subprocess, and every output tensor compared.
2. Task arithmetic over one fine-tune: ``forgetless merge`` vs an I/O floor (plain safetensors reads + one
   ``save_file``, no arithmetic), and mergekit for context.
3. Peak RSS of the same forgetless TIES merge on synthetic checkpoints about 8x larger (written tensor by tensor,
   never instantiating a model), against the small one.

mergekit is not a dependency of the project: it is installed, pinned, in its own venv (``--mergekit-venv``).
Every tool runs as a child process; its peak RSS is the kernel's high-water mark for that child (``os.wait4``
rusage ``ru_maxrss``), which counts resident file-backed pages of mmap'd safetensors files as well as anonymous
memory, so the peak anonymous RSS (``RssAnon`` polled from /proc every ``--poll-ms``) is reported beside it.

Every figure is reported as the median of ``--runs`` interleaved runs with its minimum and maximum; ratios are taken
run by run (run i of one tool against run i of the other) and summarised the same way. Each run records the load
average and the CPU time the rest of the machine spent meanwhile (``other_cpu_s``, from /proc/stat): a quiet machine
shows ~0 there.

Usage: ``.venv/bin/python benchmarks/bench_merge.py [--runs 5] [--skip-large] [--bench-dir DIR]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_VERSION = "0.1.5"  # latest on PyPI that installs with torch 2.13.0 on Python 3.11
TORCH_VERSION = "2.13.0"
N_MODELS = 3
NOISE = 0.01  # perturbation: gaussian noise scaled to each tensor's std * NOISE
DENSITY = 0.5
RTOL, ATOL = 1e-5, 1e-6
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- environment


def ensure_mergekit(venv: Path) -> Path:
    """The `mergekit-yaml` of a private venv holding mergekit==MERGEKIT_VERSION (created on first use)."""
    exe = venv / "bin" / "mergekit-yaml"
    py = venv / "bin" / "python"
    stamp = venv / f".mergekit-{MERGEKIT_VERSION}-torch-{TORCH_VERSION}"
    if exe.exists() and stamp.exists():
        return exe
    print(f"[setup] creating {venv} with torch=={TORCH_VERSION} mergekit=={MERGEKIT_VERSION}", flush=True)
    if not py.exists():
        # the venv module of the interpreter running this script (Python 3.11 in the project venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # torch first and pinned (the CPU build), then mergekit with torch pinned again so no resolver swaps it
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"torch=={TORCH_VERSION}", f"mergekit=={MERGEKIT_VERSION}"], check=True)
    stamp.touch()
    return exe


def machine_info() -> dict:
    import safetensors
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        rev = ""
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "safetensors": safetensors.__version__,
        "mergekit": MERGEKIT_VERSION,
        "forgetless_git": rev,
        # the engine may be uncommitted work: fingerprint the sources that ran
        "forgetless_src_sha256": hashlib.sha256(
            b"".join(p.read_bytes() for p in sorted((REPO / "src" / "forgetless").rglob("*.py")))
        ).hexdigest()[:16],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------- checkpoints


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors"))


def copy_aux_files(src: Path, dst: Path) -> None:
    """config, tokenizer, generation config...: everything that is not a weight file or an index."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_FILES) and not p.name.endswith(".index.json"):
            shutil.copy2(p, dst / p.name)


def perturb_checkpoint(src: Path, dst: Path, seed: int, scale: float = NOISE) -> Path:
    """A copy of `src` with base + N(0, 1) * std(tensor) * scale on every floating tensor; shard layout kept."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dst / ".complete").exists():
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    copy_aux_files(src, dst)
    index = src / "model.safetensors.index.json"
    if index.exists():
        shutil.copy2(index, dst / index.name)
    gen = torch.Generator().manual_seed(seed)
    for f in weight_files(src):
        out = {}
        with safe_open(str(f), framework="pt") as r:
            meta = r.metadata()
            names = r.keys()
            for name in names:
                t = r.get_tensor(name)
                if t.is_floating_point() and t.numel() > 1:
                    std = t.float().std().item()
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std * scale)
                    t = (t.float() + noise).to(t.dtype)
                    del noise
                out[name] = t
        save_file(out, str(dst / f.name), metadata=meta or {"format": "pt"})
        del out
    (dst / ".complete").touch()
    return dst


def make_small_set(bench_dir: Path, base: Path | None = None) -> tuple[Path, list[Path]]:
    if base is None:
        from forgetless.embedded import export_smollm2

        base = Path(export_smollm2())
    fts = [
        perturb_checkpoint(base, bench_dir / "ckpt" / f"smollm2-ft{i + 1}", seed=1000 + i)
        for i in range(N_MODELS)
    ]
    return base, fts


def large_config(shape: str, base_config: Path):
    """A LlamaConfig of the SmolLM2 family with ~8x the parameters of SmolLM2-135M.

    wide: hidden 576->1536, intermediate 1536->4096, 30->40 layers, 24 heads / 8 kv heads (head_dim 64):
          tensors grow too (the tied embedding 49152x1536 is 2.7x the small one's);
    deep: the same tensors as SmolLM2-135M, 30->296 layers: only the number of tensors grows;
    qwen-embed: the largest tensor is Qwen2.5-VL-7B's embedding, 152064x3584 (545 M entries, 2.03 GiB in fp32),
          with one Qwen2.5-7B decoder layer (hidden 3584, intermediate 18944, 28/4 heads): 0.78 B params.
    """
    from transformers import LlamaConfig

    cfg = LlamaConfig.from_pretrained(base_config)
    if shape == "wide":
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 1536, 4096, 40
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 24, 8, 64
    elif shape == "deep":
        cfg.num_hidden_layers = 296
    elif (
        shape == "qwen-embed"
    ):  # Qwen2.5-VL-7B's language model: its (tied here) embedding and one decoder layer
        cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 152064, 3584, 18944, 1
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 28, 4, 128
        cfg.tie_word_embeddings = True
    else:
        raise ValueError(shape)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def param_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint stores, from a meta-device model (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    seen: set[int] = set()
    out = []
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:  # tied lm_head: stored once, as model.embed_tokens.weight (as save_pretrained does)
            continue
        seen.add(id(p))
        out.append((name, tuple(p.shape)))
    return out


def write_random_checkpoint(cfg, dst: Path, aux_src: Path, seed: int, shard_bytes: int) -> Path:
    """Random fp32 weights written tensor by tensor into ~`shard_bytes` safetensors shards plus an index."""
    import torch
    from safetensors.torch import save_file

    if (dst / ".complete").exists():
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    copy_aux_files(aux_src, dst)
    cfg.save_pretrained(dst)  # overwrites the copied config.json
    shapes = param_shapes(cfg)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 4 * math.prod(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    total = 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in group:
            t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02)
            if name.endswith("norm.weight"):
                t.add_(1.0)
            shard[name] = t
            weight_map[name] = fname
            total += 4 * t.numel()
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dst / ".complete").touch()
    return dst


def make_large_set(ckpt_dir: Path, small_base: Path, shape: str, shard_bytes: int) -> tuple[Path, list[Path]]:
    cfg = large_config(shape, small_base)
    root = ckpt_dir / f"large-{shape}"
    base = write_random_checkpoint(cfg, root / "base", small_base, seed=7, shard_bytes=shard_bytes)
    fts = [perturb_checkpoint(base, root / f"ft{i + 1}", seed=2000 + i) for i in range(N_MODELS)]
    return base, fts


def checkpoint_stats(folder: Path) -> dict:
    from safetensors import safe_open

    n_params = n_tensors = largest = 0
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as r:
            names = r.keys()
            for k in names:
                n = math.prod(r.get_slice(k).get_shape())
                n_params += n
                n_tensors += 1
                largest = max(largest, n)
    size = sum(f.stat().st_size for f in weight_files(folder))
    return {
        "params": n_params,
        "tensors": n_tensors,
        "largest_tensor_params": largest,
        "files": len(weight_files(folder)),
        "bytes": size,
    }


def warm_page_cache(folders: list[Path]) -> None:
    """Read every weight file once so every timed run starts from the same (cached) state."""
    for folder in folders:
        for f in weight_files(folder):
            with open(f, "rb") as fh:
                while fh.read(64 * MIB):
                    pass


# ----------------------------------------------------------------------------------------------- measuring


def _read_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:", "RssShmem:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0])  # kB
    except OSError:
        pass
    return out


def cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine has spent busy (every core; /proc/stat), or NaN off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def busy_processes() -> list[str]:
    """Other processes using a CPU now (ps's %CPU ≥ 10, this benchmark and its children aside): what a quiet
    machine must not have."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,ppid,pcpu,args", "--no-headers"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return []
    mine = {os.getpid(), os.getppid()}
    busy = []
    for line in out.splitlines():
        pid, ppid, pcpu, args = line.split(None, 3)
        if (
            float(pcpu) >= 10
            and int(pid) not in mine
            and int(ppid) not in mine
            and not args.startswith("ps ")
        ):
            busy.append(f"{pid} {pcpu}% {args[:100]}")
    return busy


def launch(cmd: list[str], log: Path, poll_ms: float) -> dict:
    """Run `cmd` as a child of this (small, torch-free) process: wall time, kernel peak RSS, polled peaks.

    Linux charges a child the high-water RSS of the address space it had before exec (the parent's, under
    vfork/fork), so `ru_maxrss` is only honest from a small parent: `run_measured` runs this in a fresh
    launcher process that imports nothing heavy (its own peak RSS, ~10 MiB, is reported as `launcher_rss_mib`).
    """
    import resource

    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "VmHWM": 0}
    done = threading.Event()
    log.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    busy0 = cpu_busy_s()
    with open(log, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO)

        def poll() -> None:
            while not done.is_set():
                st = _read_status(proc.pid)
                for k, v in peaks.items():
                    peaks[k] = max(v, st.get(k, 0))
                done.wait(poll_ms / 1000)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy = cpu_busy_s() - busy0
        done.set()
        th.join()
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),  # Linux: kB
        "peak_anon_mib": round(peaks["RssAnon"] / 1024, 1),
        "peak_file_mib": round(peaks["RssFile"] / 1024, 1),
        "polled_hwm_mib": round(peaks["VmHWM"] / 1024, 1),
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "rc": os.waitstatus_to_exitcode(status),
        # 1-min load average before and after: other work on the machine shows up here (the child adds ~1-2)
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        # CPU seconds the rest of the machine spent during the run (busy time of every core minus the child's;
        # the launcher's poll thread is a few ms): 0 on a quiet machine, whatever else ran otherwise
        "other_cpu_s": round(busy - ru.ru_utime - ru.ru_stime, 2),
        "launcher_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "log": str(log),
    }


def run_measured(cmd: list[str], log: Path, poll_ms: float) -> dict:
    """`launch` in a fresh launcher process (see there why); raises with the log's tail if `cmd` fails."""
    launcher = [sys.executable, str(Path(__file__).resolve()), "--launch", str(log), str(poll_ms), "--", *cmd]
    out = subprocess.run(launcher, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if res["rc"] != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed (rc={res['rc']}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return res


KEYS = (
    "wall_s",
    "peak_rss_mib",
    "peak_anon_mib",
    "peak_file_mib",
    "polled_hwm_mib",
    "user_s",
    "sys_s",
    "cpu_s",
    "other_cpu_s",
    "load_before",
)


def median_of(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in KEYS}


def spread_of(runs: list[dict]) -> dict:
    """[min, max] over the runs, per measure."""
    return {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in KEYS}


def paired(runs_a: list[dict], runs_b: list[dict], key: str = "wall_s") -> dict:
    """a/b of each interleaved pair of runs (run i of a against run i of b): median, min, max."""
    r = [x[key] / y[key] for x, y in zip(runs_a, runs_b, strict=True)]
    return {
        "median": round(statistics.median(r), 4),
        "min": round(min(r), 4),
        "max": round(max(r), 4),
        "runs": [round(x, 4) for x in r],
    }


# ----------------------------------------------------------------------------------------------- recipes


def write_forgetless_recipe(
    path: Path, method: str, base: Path, models: list[Path], params: dict, out_dtype: str = "float32"
) -> Path:
    import yaml

    recipe = {
        "method": method,
        "base": str(base),
        "models": [{"model": str(m), "weight": 1.0} for m in models],
        "parameters": params,
        "dtype": out_dtype,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_mergekit_config(
    path: Path,
    method: str,
    base: Path,
    models: list[Path],
    model_params: dict,
    params: dict,
    out_dtype: str = "float32",
) -> Path:
    import yaml

    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {**model_params, "weight": 1.0}} for m in models],
        "parameters": params,
        "dtype": "float32",
        "out_dtype": out_dtype,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def forgetless_cmd(recipe: Path, out: Path, memory: str | None = None, src: Path | None = None) -> list[str]:
    """The `forgetless merge` CLI; `src`: another tree's ``src/`` instead of the installed one (the engine before a
    change, run side by side with it)."""
    exe = (
        [str(Path(sys.executable).parent / "forgetless")]
        if src is None
        else ["env", f"PYTHONPATH={src}", sys.executable, "-m", "forgetless.cli"]
    )
    return [
        *exe,
        "merge",
        str(recipe),
        "--out",
        str(out),
        "--force",
        *(["--memory", memory] if memory else []),
    ]


def before_jobs(
    args, recipe: Path, work: Path, memory: str | None = None
) -> dict[str, tuple[list[str], Path]]:
    """`--before LABEL=SRC`: the same forgetless merge from another source tree, as tool `forgetless-LABEL`."""
    jobs = {}
    for spec in args.before:
        label, _, src = spec.partition("=")
        out = work / f"out-forgetless-{label}"
        jobs[f"forgetless-{label}"] = (forgetless_cmd(recipe, out, memory, Path(src).resolve()), out)
    return jobs


def mergekit_cmd(exe: Path, cfg: Path, out: Path) -> list[str]:
    # mergekit defaults (CPU, no lazy unpickle, synchronous writes, tokenizer copied, model card written)
    return [str(exe), str(cfg), str(out)]


def io_floor_cmd(base: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--io-floor", str(base), str(model), str(out)]


def io_floor(base: Path, model: Path, out: Path) -> None:
    """The I/O floor of a one-model merge: read every tensor of base and model, write them once. No arithmetic."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    result = {}
    for bf, mf in zip(weight_files(base), weight_files(model), strict=True):
        with safe_open(str(bf), framework="pt") as rb, safe_open(str(mf), framework="pt") as rm:
            names = rb.keys()
            for name in names:
                rb.get_tensor(name)
                result[name] = rm.get_tensor(name)
    out.mkdir(parents=True, exist_ok=True)
    copy_aux_files(model, out)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})


def fresh(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    return out


# ----------------------------------------------------------------------------------------------- comparing


def load_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in weight_files(folder):
        out.update(load_file(str(f)))
    return out


def compare_outputs(a_dir: Path, b_dir: Path) -> dict:
    """Every tensor of two merge outputs: key sets, shapes, dtypes, max abs diff, allclose(rtol, atol)."""
    import torch

    a, b = load_all(a_dir), load_all(b_dir)
    common = sorted(set(a) & set(b))
    worst_name, worst = None, 0.0
    not_close = []
    mismatched = []
    differing: list[str] = []
    n_diff_entries = 0
    n_equal = 0
    max_rel = 0.0
    for k in common:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            mismatched.append(f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            continue
        d = (x.double() - y.double()).abs()
        m = d.max().item() if d.numel() else 0.0
        if m == 0:
            n_equal += 1
        else:
            differing.append(k)
            n_diff_entries += int((x != y).sum())
        if m > worst:
            worst, worst_name = m, k
        max_rel = max(max_rel, (d / y.double().abs().clamp_min(1e-30)).max().item() if d.numel() else 0.0)
        if not torch.allclose(x, y, rtol=RTOL, atol=ATOL):
            not_close.append(k)
    return {
        "tensors_a": len(a),
        "tensors_b": len(b),
        "only_in_a": sorted(set(a) - set(b)),
        "only_in_b": sorted(set(b) - set(a)),
        "shape_or_dtype_mismatch": mismatched,
        "compared": len(common),
        "bitwise_equal": n_equal,
        "max_abs_diff": worst,
        "max_abs_diff_tensor": worst_name,
        "max_rel_diff": max_rel,
        "not_allclose": not_close,
        "differing": differing,
        "differing_entries": n_diff_entries,
        "total_entries": sum(a[k].numel() for k in common),
        "allclose": not not_close and not mismatched and set(a) == set(b),
        "rtol": RTOL,
        "atol": ATOL,
    }


class TensorSource:
    """name -> tensor over the safetensors files of a folder (handles kept open)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.handles = {}
        for f in weight_files(folder):
            h = safe_open(str(f), framework="pt")
            names = h.keys()
            for name in names:
                self.handles[name] = h

    def __getitem__(self, name: str):
        return self.handles[name].get_tensor(name)


def ties_reference(base, fts: list, density: float, stable: bool):
    """mergekit 0.1.5's TIES (magnitude sparsify, sum consensus, normalize, weights 1, lambda 1), op for op.

    The only freedom is the order of equal |delta| at the top-k boundary: mergekit uses
    ``torch.argsort(descending=True)`` (not stable); ``stable=True`` keeps the lowest flat index first.
    """
    import torch

    deltas = base.new_empty((len(fts), *base.shape))
    k = max(1, int(density * base.numel()))
    for i, ft in enumerate(fts):
        delta = ft - base
        mask = torch.zeros(delta.numel(), dtype=delta.dtype)
        w = delta.abs().reshape(-1).float()
        mask[torch.argsort(w, descending=True, stable=stable)[:k]] = 1
        deltas[i] = delta * mask.reshape_as(delta)
    weights = torch.ones(len(fts), dtype=deltas.dtype)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = sign == majority
    mixed = (deltas * agree).sum(dim=0)
    divisor = (weights * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed /= divisor
    return (base + mixed).to(base.dtype)


def boundary_ties(base, fts: list, density: float):
    """Entries whose |delta| equals a model's k-th largest |delta| when that value straddles the top-k boundary:
    the only entries where two correct TIES implementations may keep different elements."""
    import torch

    k = int(density * base.numel())
    amb = torch.zeros(base.shape, dtype=torch.bool)
    for ft in fts:
        a = (ft - base).abs()
        thr = a.reshape(-1).kthvalue(a.numel() - k + 1).values
        at = a == thr
        if int((a > thr).sum()) + int(at.sum()) > k:
            amb |= at
    return amb


def diagnose_ties(fl_dir: Path, mk_dir: Path, base: Path, fts: list[Path], names: list[str]) -> dict:
    """For tensors where forgetless and mergekit differ: are the differences only at top-k boundary ties, does
    mergekit equal its own formula with argsort as it runs, and forgetless the same formula with stable order?"""
    import torch

    fl, mk, b, f = (
        TensorSource(fl_dir),
        TensorSource(mk_dir),
        TensorSource(base),
        [TensorSource(p) for p in fts],
    )
    out = {
        "tensors": len(names),
        "differing_entries": 0,
        "boundary_tie_entries": 0,
        "differing_outside_boundary_ties": 0,
        "mergekit_equals_reference_argsort": 0,
        "forgetless_equals_reference_stable": 0,
        "forgetless_max_abs_diff_vs_reference_stable": 0.0,
    }
    for name in names:
        x, y, bt = fl[name], mk[name], b[name].float()
        ft = [s[name].float() for s in f]
        amb = boundary_ties(bt, ft, DENSITY)
        diff = x != y
        out["differing_entries"] += int(diff.sum())
        out["boundary_tie_entries"] += int(amb.sum())
        out["differing_outside_boundary_ties"] += int((diff & ~amb).sum())
        ref_mk = ties_reference(bt, ft, DENSITY, stable=False)
        out["mergekit_equals_reference_argsort"] += int(torch.equal(ref_mk, y))
        ref_st = ties_reference(bt, ft, DENSITY, stable=True)
        out["forgetless_equals_reference_stable"] += int(torch.equal(ref_st, x))
        out["forgetless_max_abs_diff_vs_reference_stable"] = max(
            out["forgetless_max_abs_diff_vs_reference_stable"], (ref_st - x).abs().max().item()
        )
    return out


# ----------------------------------------------------------------------------------------------- benchmarks


def bench_pair(
    name: str,
    jobs: dict[str, tuple[list[str], Path]],
    runs: int,
    logs: Path,
    poll_ms: float,
    keep_outputs: bool | set[str] = True,
) -> dict:
    """Interleaved runs of each job (tool -> (cmd, out dir)); every output dir is removed before its run (and
    after it, unless `keep_outputs` is True or holds the tool: outputs that are not compared take disk only)."""
    res: dict[str, list[dict]] = {tool: [] for tool in jobs}
    for i in range(runs):
        for tool, (cmd, out) in jobs.items():
            fresh(out)
            r = run_measured(cmd, logs / f"{name}-{tool}-{i + 1}.log", poll_ms)
            if keep_outputs is not True and tool not in (keep_outputs or ()):
                fresh(out)
            print(
                f"  [{name}] {tool:<10} run {i + 1}/{runs}: {r['wall_s']:7.2f} s  peak RSS "
                f"{r['peak_rss_mib']:7.0f} MiB  (anon {r['peak_anon_mib']:.0f}, file {r['peak_file_mib']:.0f})  "
                f"cpu {r['cpu_s']:.1f} s  others' cpu {r['other_cpu_s']:.1f} s  "
                f"load {r['load_before']:.1f}->{r['load_after']:.1f}",
                flush=True,
            )
            res[tool].append(r)
    return {tool: {"runs": rs, "median": median_of(rs), "spread": spread_of(rs)} for tool, rs in res.items()}


def compare_befores(res: dict, jobs: dict, work: Path, name: str) -> None:
    """Each `--before` tool's outputs against forgetless's, tensor by tensor (the same bits expected), and the
    per-run wall ratio forgetless / before."""
    for tool in jobs:
        if tool.startswith("forgetless-") and "forgetless" in jobs:
            c = compare_outputs(work / "out-forgetless", work / f"out-{tool}")
            res.setdefault("compare_before", {})[tool] = {
                k: c[k]
                for k in (
                    "compared",
                    "bitwise_equal",
                    "max_abs_diff",
                    "differing_entries",
                    "total_entries",
                    "only_in_a",
                    "only_in_b",
                    "shape_or_dtype_mismatch",
                )
            }
            res.setdefault("ratios", {})[f"wall_vs_{tool}"] = paired(
                res["forgetless"]["runs"], res[tool]["runs"]
            )
            print(
                f"  [{name}] forgetless vs {tool}: {c['bitwise_equal']}/{c['compared']} tensors bitwise equal, "
                f"wall ratio {res['ratios'][f'wall_vs_{tool}']['median']}",
                flush=True,
            )


def bench_ties(args, base: Path, fts: list[Path], mk_exe: Path | None, tools: list[str]) -> dict:
    work = args.bench_dir / "ties"
    params_fl = {"density": DENSITY, "lambda": 1.0}
    jobs = {}
    if "forgetless" in tools:
        recipe = write_forgetless_recipe(work / "forgetless.yaml", "ties", base, fts, params_fl)
        jobs["forgetless"] = (
            forgetless_cmd(recipe, work / "out-forgetless", args.memory),
            work / "out-forgetless",
        )
        jobs.update(before_jobs(args, recipe, work, args.memory))
    if "mergekit" in tools and mk_exe:
        cfg = write_mergekit_config(
            work / "mergekit.yaml",
            "ties",
            base,
            fts,
            {"density": DENSITY},
            {"normalize": True, "lambda": 1.0, "int8_mask": False},
        )
        jobs["mergekit"] = (mergekit_cmd(mk_exe, cfg, work / "out-mergekit"), work / "out-mergekit")
    print(f"[ties] {len(fts)} models, density {DENSITY}, {args.runs} runs", flush=True)
    res = bench_pair("ties", jobs, args.runs, args.bench_dir / "logs", args.poll_ms)
    if {"forgetless", "mergekit"} <= set(jobs):
        res["compare"] = compare_outputs(work / "out-forgetless", work / "out-mergekit")
        c = res["compare"]
        print(
            f"  [ties] compare: {c['compared']} tensors, max |diff| {c['max_abs_diff']:.3g} "
            f"({c['max_abs_diff_tensor']}), bitwise equal {c['bitwise_equal']}, allclose {c['allclose']}",
            flush=True,
        )
        if c["differing"] and not args.no_diagnose:
            print(
                f"  [ties] {c['differing_entries']} of {c['total_entries']} entries differ, in "
                f"{len(c['differing'])} tensors; diagnosing up to {args.diagnose_max}",
                flush=True,
            )
            d = res["diagnose"] = diagnose_ties(
                work / "out-forgetless", work / "out-mergekit", base, fts, c["differing"][: args.diagnose_max]
            )
            print(
                f"  [ties] {d['differing_entries']} differing entries, {d['differing_outside_boundary_ties']} "
                f"outside top-k boundary ties; mergekit == its formula (argsort) on "
                f"{d['mergekit_equals_reference_argsort']}/{d['tensors']}, forgetless == same formula with "
                f"stable order on {d['forgetless_equals_reference_stable']}/{d['tensors']} (max |diff| "
                f"{d['forgetless_max_abs_diff_vs_reference_stable']:.3g})",
                flush=True,
            )
        fl, mk = res["forgetless"]["median"], res["mergekit"]["median"]
        res["ratios"] = {
            "speedup": round(mk["wall_s"] / fl["wall_s"], 2),
            "wall_fraction": paired(res["forgetless"]["runs"], res["mergekit"]["runs"]),
            "rss_fraction": round(fl["peak_rss_mib"] / mk["peak_rss_mib"], 3),
            "anon_fraction": round(fl["peak_anon_mib"] / max(mk["peak_anon_mib"], 1e-9), 3),
        }
    compare_befores(res, jobs, work, "ties")
    if not args.keep_outputs:
        for _, out in jobs.values():
            fresh(out)
    return res


def bench_task_arithmetic(args, base: Path, ft: Path, mk_exe: Path | None, tools: list[str]) -> dict:
    work = args.bench_dir / "task_arithmetic"
    jobs = {"io_floor": (io_floor_cmd(base, ft, work / "out-io-floor"), work / "out-io-floor")}
    if "forgetless" in tools:
        recipe = write_forgetless_recipe(
            work / "forgetless.yaml", "task_arithmetic", base, [ft], {"lambda": 1.0}
        )
        jobs["forgetless"] = (forgetless_cmd(recipe, work / "out-forgetless"), work / "out-forgetless")
        jobs.update(before_jobs(args, recipe, work))
    if "mergekit" in tools and mk_exe:
        cfg = write_mergekit_config(
            work / "mergekit.yaml", "task_arithmetic", base, [ft], {}, {"lambda": 1.0}
        )
        jobs["mergekit"] = (mergekit_cmd(mk_exe, cfg, work / "out-mergekit"), work / "out-mergekit")
    print(f"[task_arithmetic] 1 model, {args.runs} runs", flush=True)
    res = bench_pair(
        "ta",
        jobs,
        args.runs,
        args.bench_dir / "logs",
        args.poll_ms,
        keep_outputs={t for t in jobs if t != "io_floor"},
    )
    floor = res["io_floor"]["median"]["wall_s"]
    tools_run = [t for t in jobs if t != "io_floor"]
    res["ratios"] = {f"{t}_vs_io_floor": round(res[t]["median"]["wall_s"] / floor, 2) for t in tools_run}
    res["ratios"].update(
        {f"{t}_vs_io_floor_paired": paired(res[t]["runs"], res["io_floor"]["runs"]) for t in tools_run}
    )
    if {"forgetless", "mergekit"} <= set(jobs):
        res["compare"] = compare_outputs(work / "out-forgetless", work / "out-mergekit")
        c = res["compare"]
        print(
            f"  [ta] compare: {c['compared']} tensors, max |diff| {c['max_abs_diff']:.3g}, "
            f"allclose {c['allclose']}",
            flush=True,
        )
    compare_befores(res, jobs, work, "ta")
    if not args.keep_outputs:
        for _, out in jobs.values():
            fresh(out)
    return res


def bench_large(
    args, small_base: Path, small_ties: dict | None, mk_exe: Path | None, tools: list[str]
) -> dict:
    out: dict = {}
    for shape in args.large_shapes:
        args.large_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(args.large_dir).free / 1024**3
        print(
            f"[large-{shape}] generating checkpoints under {args.large_dir} ({free:.0f} GiB free)", flush=True
        )
        t0 = time.perf_counter()
        base, fts = make_large_set(args.large_dir, small_base, shape, int(args.shard_gb * 1024**3))
        gen_s = time.perf_counter() - t0
        stats = checkpoint_stats(base)
        print(
            f"  [large-{shape}] {stats['params'] / 1e9:.3f} B params, {stats['tensors']} tensors, "
            f"{stats['files']} shards, {stats['bytes'] / 1024**3:.2f} GiB each (ready in {gen_s:.0f} s)",
            flush=True,
        )
        if args.warm_large:
            warm_page_cache([base, *fts])
        work = args.bench_dir / f"large-{shape}"
        jobs = {}
        recipe = write_forgetless_recipe(
            work / "forgetless.yaml",
            "ties",
            base,
            fts,
            {"density": DENSITY, "lambda": 1.0},
            args.large_out_dtype,
        )
        if "forgetless" in tools:
            jobs["forgetless"] = (
                forgetless_cmd(recipe, work / "out-forgetless", args.memory),
                work / "out-forgetless",
            )
            jobs.update(before_jobs(args, recipe, work, args.memory))
        if args.large_mergekit and mk_exe:
            cfg = write_mergekit_config(
                work / "mergekit.yaml",
                "ties",
                base,
                fts,
                {"density": DENSITY},
                {"normalize": True, "lambda": 1.0, "int8_mask": False},
                args.large_out_dtype,
            )
            jobs["mergekit"] = (mergekit_cmd(mk_exe, cfg, work / "out-mergekit"), work / "out-mergekit")
        res = bench_pair(
            f"large-{shape}", jobs, args.large_runs, args.bench_dir / "logs", args.poll_ms, keep_outputs=False
        )
        res["checkpoint"] = stats
        if {"forgetless", "mergekit"} <= set(jobs):
            res["ratios"] = {"wall_fraction": paired(res["forgetless"]["runs"], res["mergekit"]["runs"])}
        for tool in jobs:
            if tool.startswith("forgetless-") and "forgetless" in jobs:
                res.setdefault("ratios", {})[f"wall_vs_{tool}"] = paired(
                    res["forgetless"]["runs"], res[tool]["runs"]
                )
        if small_ties:
            for tool in jobs:
                if tool in small_ties:
                    s, big = small_ties[tool]["median"], res[tool]["median"]
                    res.setdefault("growth_vs_small", {})[tool] = {
                        "peak_rss": round(big["peak_rss_mib"] / s["peak_rss_mib"], 3),
                        "peak_anon": round(big["peak_anon_mib"] / max(s["peak_anon_mib"], 1e-9), 3),
                        "wall": round(big["wall_s"] / s["wall_s"], 2),
                    }
        out[shape] = res
        for tool in jobs:
            fresh(work / f"out-{tool}")
        if not args.keep_large:
            shutil.rmtree(args.large_dir / f"large-{shape}", ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------- reporting


def markdown_table(results: dict) -> str:
    rows = [
        (
            "| benchmark | tool | wall (s): median [min–max] | peak RSS (MiB): median [min–max] | peak RssAnon "
            "(MiB) | others' CPU (s) [max] | ratio |"
        ),
        "|---|---|---:|---:|---:|---:|---|",
    ]

    def row(bench: str, tool: str, res: dict, ratio: str = "") -> None:
        m, sp = res["median"], res.get("spread") or {k: [v, v] for k, v in res["median"].items()}
        rows.append(
            f"| {bench} | {tool} | {m['wall_s']:.2f} [{sp['wall_s'][0]:.2f}–{sp['wall_s'][1]:.2f}] | "
            f"{m['peak_rss_mib']:.0f} [{sp['peak_rss_mib'][0]:.0f}–{sp['peak_rss_mib'][1]:.0f}] | "
            f"{m['peak_anon_mib']:.0f} | {sp['other_cpu_s'][1]:.1f} | {ratio} |"
        )

    ties = results.get("ties")
    if ties:
        r = ties.get("ratios", {})
        for tool in ("forgetless", "mergekit", *sorted(t for t in ties if t.startswith("forgetless-"))):
            if tool in ties:
                ratio = ""
                if tool.startswith("forgetless-"):
                    w = r[f"wall_vs_{tool}"]
                    ratio = f"forgetless takes {w['median']}x its wall [{w['min']}–{w['max']}]"
                elif tool == "forgetless" and "wall_fraction" in r:
                    w = r["wall_fraction"]
                    ratio = (
                        f"{w['median']}x mergekit's wall [{w['min']}–{w['max']}] ({r['speedup']}x faster), "
                        f"{r['rss_fraction']}x the peak RSS"
                    )
                row("TIES, 3 models, 135M fp32", tool, ties[tool], ratio)
    ta = results.get("task_arithmetic")
    if ta:
        for tool in (
            "io_floor",
            "forgetless",
            "mergekit",
            *sorted(t for t in ta if t.startswith("forgetless-")),
        ):
            if tool in ta:
                p = ta["ratios"].get(f"{tool}_vs_io_floor_paired")
                ratio = f"{p['median']}x the I/O floor [{p['min']}–{p['max']}]" if p else ""
                row("task arithmetic, 1 model", tool, ta[tool], ratio)
    for shape, big in results.get("large", {}).items():
        p = big["checkpoint"]["params"] / 1e9
        for tool in ("forgetless", "mergekit", *sorted(t for t in big if t.startswith("forgetless-"))):
            if tool in big:
                g = big.get("growth_vs_small", {}).get(tool)
                ratio = f"peak RSS {g['peak_rss']}x the 135M run (anon {g['peak_anon']}x)" if g else ""
                r = big.get("ratios", {})
                if tool == "forgetless" and "wall_fraction" in r:
                    w = r["wall_fraction"]
                    ratio += f"; {w['median']}x mergekit's wall [{w['min']}–{w['max']}]"
                if f"wall_vs_{tool}" in r:
                    w = r[f"wall_vs_{tool}"]
                    ratio += f"; forgetless takes {w['median']}x its wall [{w['min']}–{w['max']}]"
                row(f"TIES, 3 models, {p:.2f}B fp32 ({shape})", tool, big[tool], ratio)
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--runs", type=int, default=5, help="timed runs per tool (small checkpoints), interleaved"
    )
    ap.add_argument(
        "--bench-dir",
        type=Path,
        default=Path(os.environ.get("BENCH_DIR", REPO / "bench-out")),
        help="checkpoints, outputs, logs and results (default $BENCH_DIR or ./bench-out)",
    )
    ap.add_argument(
        "--base",
        type=Path,
        default=None,
        help="base HF folder (default: forgetless.embedded.export_smollm2(), SmolLM2-135M fp32)",
    )
    ap.add_argument("--mergekit-venv", type=Path, default=REPO / ".mergekit-venv")
    ap.add_argument(
        "--tools", default="forgetless,mergekit", help="comma-separated subset of forgetless,mergekit"
    )
    ap.add_argument(
        "--only",
        default="ties,task_arithmetic,large",
        help="comma-separated subset of ties,task_arithmetic,large",
    )
    ap.add_argument(
        "--skip-large", action="store_true", help="skip the ~8x checkpoints (17 GiB of disk per shape)"
    )
    ap.add_argument(
        "--large-shapes",
        default="wide,deep",
        help="wide: wider+more layers (tensors grow); deep: same tensors, 296 layers; qwen-embed: "
        "Qwen2.5-VL-7B's 152064x3584 embedding and one 7B layer",
    )
    ap.add_argument("--large-runs", type=int, default=1)
    ap.add_argument(
        "--memory",
        default=None,
        help="forgetless's --memory for the TIES runs (small and large), e.g. 1.5GiB; default: its own",
    )
    ap.add_argument(
        "--large-mergekit", action="store_true", help="also run mergekit on the large checkpoints"
    )
    ap.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="LABEL=SRC",
        help="also run forgetless from another tree's src/ (e.g. before=/tmp/old/src: the engine before "
        "a change) as tool forgetless-LABEL, interleaved with the others (repeatable)",
    )
    ap.add_argument(
        "--keep-large", action="store_true", help="keep the large checkpoints (else deleted after use)"
    )
    ap.add_argument(
        "--large-out-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="output dtype of the large merges, both tools (bfloat16: half the output's disk)",
    )
    ap.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep the last merged outputs of the small benchmarks (else removed once compared)",
    )
    ap.add_argument(
        "--large-dir",
        type=Path,
        default=None,
        help="where the large checkpoints are written (default BENCH_DIR/ckpt; a tmpfs such as /dev/shm "
        "where the disk is short: 4 × 4 GiB per shape, the outputs stay in BENCH_DIR)",
    )
    ap.add_argument(
        "--no-warm-large",
        dest="warm_large",
        action="store_false",
        help="do not pre-read the large checkpoints into the page cache",
    )
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the large checkpoints (GiB)")
    ap.add_argument("--poll-ms", type=float, default=20.0, help="/proc polling interval for RssAnon/RssFile")
    ap.add_argument(
        "--no-diagnose",
        action="store_true",
        help="skip re-deriving differing TIES tensors (boundary ties, reference formula)",
    )
    ap.add_argument("--diagnose-max", type=int, default=12, help="differing TIES tensors to re-derive")
    ap.add_argument(
        "--json", type=Path, default=None, help="raw results (default BENCH_DIR/bench_merge.json)"
    )
    ap.add_argument("--io-floor", nargs=3, metavar=("BASE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    args.only = [t for t in args.only.split(",") if t]
    args.large_shapes = [s for s in args.large_shapes.split(",") if s]
    if args.skip_large and "large" in args.only:
        args.only.remove("large")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--launch"]:  # launcher mode: --launch LOG POLL_MS -- CMD...
        print(json.dumps(launch(argv[4:], Path(argv[1]), float(argv[2]))))
        return 0
    args = parse_args(argv)
    if args.io_floor:
        io_floor(*(Path(p) for p in args.io_floor))
        return 0
    args.bench_dir = args.bench_dir.resolve()
    args.large_dir = (args.large_dir or args.bench_dir / "ckpt").resolve()
    args.bench_dir.mkdir(parents=True, exist_ok=True)
    mk_exe = ensure_mergekit(args.mergekit_venv) if "mergekit" in args.tools else None
    results: dict = {
        "machine": machine_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "busy_before": busy_processes(),
        "loadavg_before": os.getloadavg(),
    }
    if results["busy_before"]:
        print(
            "[setup] WARNING: the machine is not quiet; busy processes:\n  "
            + "\n  ".join(results["busy_before"]),
            flush=True,
        )
    print(
        f"[setup] {results['machine']['cpus']} CPUs, {results['machine']['mem_gib']} GiB, "
        f"torch {results['machine']['torch']}, mergekit {MERGEKIT_VERSION}",
        flush=True,
    )
    base, fts = make_small_set(args.bench_dir, args.base)
    results["small_checkpoint"] = checkpoint_stats(base)
    warm_page_cache([base, *fts])
    if "ties" in args.only:
        results["ties"] = bench_ties(args, base, fts, mk_exe, args.tools)
    if "task_arithmetic" in args.only:
        results["task_arithmetic"] = bench_task_arithmetic(args, base, fts[0], mk_exe, args.tools)
    if "large" in args.only:
        results["large"] = bench_large(args, base, results.get("ties"), mk_exe, args.tools)
    table = markdown_table(results)
    results["table_markdown"] = table
    path = args.json or args.bench_dir / "bench_merge.json"
    path.write_text(json.dumps(results, indent=2))
    print("\n" + table + f"\n\nraw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
