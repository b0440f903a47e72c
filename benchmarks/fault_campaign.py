"""Fault-injection campaign: kill (SIGKILL) or freeze (SIGSTOP) one rank of a running
pipeline and check that every other rank raises a RuntimeFailure that names its rank, the
instruction and the micro batch, within the helix timeout + 2 s.

    python benchmarks/fault_campaign.py            # 54 injections, writes BENCHMARKS.md
    python benchmarks/fault_campaign.py --quick    # 10 injections, no file written

Workload (public API only): ``helix_compiler.helix_compile`` of a tiny Llama (4 layers,
hidden 64, seq 64) with ``timeout=3``, running ``loss = pipe(ids, labels);
loss.backward()`` in a loop. The victim arms a timer at a random offset into its forward
or backward half (durations measured over two warm-up steps) and signals itself; it writes
the time and phase first. Every survivor writes the exception it got (type, message, time)
and exits at once (as a crashing training script would).

Launch kinds: ``torchrun`` (``torchrun --standalone --nproc-per-node N`` of this script;
the agent hosts the store), ``spawn`` (``spawn_ranks`` from the campaign's own process,
which hosts the store) and
``bare`` (N plain processes with ``MASTER_ADDR``/``MASTER_PORT`` and env:// rendezvous:
rank 0 hosts the TCPStore, and the process group keeps the 30-minute default timeout).

Outcomes per survivor: ``named`` (RuntimeFailure naming rank, instruction and micro
batch), ``tagged`` (a transport RuntimeFailure raised between instructions, e.g. by the
step's final drain, naming rank, peer, fold and the message tag such as ``'bwd E m0'``:
instruction kind, segment and micro batch), ``collective`` (RuntimeFailure from a bounded collective of the pipeline, naming
rank and collective but no instruction), ``unwrapped`` (any other error), ``hung`` (nothing
within timeout + 10 s), ``late`` (an error after timeout + 2 s). Exits non-zero if any
survivor hung, raised an unwrapped error or was late.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = "HELIX_FAULT_TRIAL"
TIMEOUT = 3.0
SLACK = 2.0


# ------------------------------------------------------------------------------ worker side


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def worker(rank: int, trial: dict) -> None:
    """One rank of a trial: train until something fails; never returns normally."""
    import torch

    from helix_compiler import helix_compile
    from helix_compiler.models import Llama, LlamaConfig

    out = Path(trial["outdir"])
    (out / f"pid{rank}").write_text(str(os.getpid()))
    state = {"phase": "setup", "step": 0}
    victim = rank == trial["victim"]
    rng = random.Random(trial["seed"])
    durations: dict[str, list[float]] = {"forward": [], "backward": []}

    def inject() -> None:
        if state["phase"] != trial["phase"]:
            return  # the timer came late (load): the next step arms a new one
        _write(out / "inject.json", {"t": time.time(), "phase": state["phase"],
                                     "step": state["step"], "pid": os.getpid()})
        os.kill(os.getpid(), getattr(signal, trial["signal"]))

    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        world = trial["world"]
        seq = trial.get("seq", 64)
        m = 2 * world  # helix_compile's default: pp_size x num_folds
        model = Llama(LlamaConfig(num_layers=trial.get("layers", 4), hidden=64))
        pipe = helix_compile(model, world, seq, num_folds=2, timeout=trial["timeout"])
        gen = torch.Generator().manual_seed(1)
        while True:
            ids = torch.randint(0, 256, (m, seq), generator=gen)
            labels = torch.randint(0, 256, (m, seq), generator=gen)
            step = state["step"]
            if victim and step >= 2:
                want = trial["phase"]
                base = sum(durations["forward"]) / 2 if want == "backward" else 0.0
                d = min(durations[want])
                timer = threading.Timer(base + rng.uniform(0.05, 0.9) * d, inject)
                timer.daemon = True
                timer.start()
            t0 = time.perf_counter()
            state["phase"] = "forward"
            loss = pipe(ids, labels)
            t1 = time.perf_counter()
            state["phase"] = "backward"
            loss.backward()
            t2 = time.perf_counter()
            state["phase"] = "between steps"
            durations["forward"].append(t1 - t0)
            durations["backward"].append(t2 - t1)
            state["step"] += 1
            if step > 60:
                raise RuntimeError("no failure after 60 steps")
    except BaseException as e:  # noqa: BLE001 - recorded for the controller
        import traceback

        _write(out / f"rank{rank}.json", {"t": time.time(), "type": type(e).__name__,
                                          "msg": str(e)[:3000], "phase": state["phase"],
                                          "step": state["step"], "tb": traceback.format_exc()[-3000:]})
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # close the sockets now: peers waiting on this rank fail at once


def _worker_from_env() -> None:
    from helix_compiler.runtime.launch import init_from_env

    trial = json.loads(os.environ[ENV])
    info = init_from_env(timeout=1800.0, backend="gloo", num_threads=1)
    worker(info.rank, trial)


# ------------------------------------------------------------------------------ controller


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _classify(rank: int, res: dict | None, t_inj: float, timeout: float) -> tuple[str, float | None]:
    if res is None:
        return "hung", None
    dt = res["t"] - t_inj
    msg = res["msg"]
    if res["type"] not in ("RuntimeFailure", "RankFailed") or f"rank {rank}" not in msg:
        kind = "unwrapped"
    elif "instruction" in msg and "micro batch" in msg:
        kind = "named"
    elif re.search(r"tag '(fwd|bwd) \S+ m\d+'", msg):
        kind = "tagged"  # a transport failure outside an instruction (drain at the step's end)
    elif "collective" in msg:
        kind = "collective"
    else:
        kind = "unwrapped"
    if kind != "unwrapped" and dt > timeout + SLACK:
        kind = "late"
    return kind, dt


def run_in_process(trial: dict, worker_fn=None, grace: float | None = None) -> dict:
    """One ``spawn`` injection from this process (its forkserver is reused from trial to
    trial): spawn_ranks raises when the first rank exits and kills the rest (a stopped victim
    included) after a grace period long enough for every survivor to report. ``worker_fn``
    (default :func:`worker`) must be importable by the spawned ranks."""
    from helix_compiler.runtime.launch import RankFailed, spawn_ranks

    outdir = Path(tempfile.mkdtemp(prefix="helix_fault_"))
    trial = {**trial, "outdir": str(outdir)}
    try:
        spawn_ranks(worker_fn or worker, trial["world"], trial, timeout=300, comm_timeout=1800.0,
                    grace=trial["timeout"] + SLACK + 5.0 if grace is None else grace)
    except RankFailed:
        pass
    return _collect(trial, outdir)


def _collect(trial: dict, outdir: Path) -> dict:
    inj = json.loads((outdir / "inject.json").read_text()) if (outdir / "inject.json").exists() else {}
    row = {k: trial[k] for k in ("launch", "world", "victim", "signal", "phase")}
    row["injected_in"] = inj.get("phase")
    row["injected_step"] = inj.get("step")
    row["log"] = str(outdir / "log.txt")
    row["outcomes"] = {}
    for r in range(trial["world"]):
        if r == trial["victim"]:
            continue
        p = outdir / f"rank{r}.json"
        res = json.loads(p.read_text()) if p.exists() else None
        if not inj:
            row["outcomes"][str(r)] = ("no injection", None, (res or {}).get("msg", "")[:300])
            continue
        kind, dt = _classify(r, res, inj["t"], trial["timeout"])
        msg = (res or {}).get("msg", "")
        row["outcomes"][str(r)] = (kind, dt, msg.splitlines()[0][:300] if msg else "")
    return row


def _read_inject(outdir: Path) -> float | None:
    p = outdir / "inject.json"
    return json.loads(p.read_text())["t"] if p.exists() else None


def run_trial(trial: dict, script: str) -> dict:
    """One ``torchrun`` or ``bare`` injection, in its own process tree."""
    outdir = Path(tempfile.mkdtemp(prefix="helix_fault_"))
    trial = {**trial, "outdir": str(outdir)}
    env = {**os.environ, ENV: json.dumps(trial), "PYTHONUNBUFFERED": "1"}
    world, launch = trial["world"], trial["launch"]
    log = open(outdir / "log.txt", "w")  # noqa: SIM115 - closed below
    procs = []
    if launch == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world), "--monitor-interval", "5", script, "--worker"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True))
    else:  # bare: rank 0 hosts the store
        port = _free_port()
        for r in range(world):
            e = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                 "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)}
            procs.append(subprocess.Popen([sys.executable, script, "--worker"], env=e,
                                          stdout=log, stderr=log, start_new_session=True))
    t_start = time.time()
    survivors = [r for r in range(world) if r != trial["victim"]]
    results: dict[int, dict] = {}
    t_inj = None
    inj: dict = {}
    try:
        while True:
            time.sleep(0.05)
            now = time.time()
            if t_inj is None and (outdir / "inject.json").exists():
                inj = json.loads((outdir / "inject.json").read_text())
                t_inj = inj["t"]
            for r in survivors:
                p = outdir / f"rank{r}.json"
                if r not in results and p.exists():
                    results[r] = json.loads(p.read_text())
            if len(results) == len(survivors) and t_inj is not None:
                break
            if all(p.poll() is not None for p in procs):
                time.sleep(0.2)  # the launch is gone: collect what it left
                t_inj = t_inj or _read_inject(outdir)
                break
            if t_inj is None and (now - t_start > 240 or all(
                    (outdir / f"rank{r}.json").exists() for r in range(world))):
                break  # never injected: every rank failed before (or never started)
            if t_inj is not None and now - t_inj > trial["timeout"] + 10:
                break
    finally:
        pids = []
        for r in range(world):
            try:
                pids.append(int((outdir / f"pid{r}").read_text()))
            except (OSError, ValueError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
        log.close()
    return _collect(trial, outdir)


def plan(quick: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    trials = []
    if quick:
        combos = [("spawn", 2, 0, "SIGKILL", "forward"), ("spawn", 2, 1, "SIGSTOP", "backward"),
                  ("bare", 2, 0, "SIGSTOP", "forward"), ("bare", 2, 1, "SIGKILL", "backward"),
                  ("bare", 3, 0, "SIGKILL", "backward"), ("torchrun", 2, 1, "SIGSTOP", "forward"),
                  ("torchrun", 2, 0, "SIGKILL", "backward"), ("torchrun", 3, 2, "SIGSTOP", "backward"),
                  ("spawn", 4, 3, "SIGKILL", "forward"), ("bare", 4, 0, "SIGSTOP", "backward")]
    else:
        combos = []
        sigs = ("SIGKILL", "SIGSTOP")
        for j, launch in enumerate(("torchrun", "spawn", "bare")):
            for victim in range(2):  # 2 ranks: every victim x signal x phase
                for sig in sigs:
                    for phase in ("forward", "backward"):
                        combos.append((launch, 2, victim, sig, phase))
            for victim in range(4):  # 4 ranks: every victim, phases and signals alternate
                combos.append((launch, 4, victim, sigs[(victim + j) % 2],
                               ("forward", "backward")[victim // 2 % 2 ^ j % 2]))
            for victim in range(3):  # 3 ranks: every victim in both phases, signals alternate
                for k, phase in enumerate(("forward", "backward")):
                    combos.append((launch, 3, victim, sigs[(victim + k + j) % 2], phase))
    for launch, world, victim, sig, phase in combos:
        trials.append({"launch": launch, "world": world, "victim": victim, "signal": sig,
                       "phase": phase, "seed": rng.randrange(1 << 30), "timeout": TIMEOUT})
    return trials


def summarize(rows: list[dict], cmd: str, elapsed: float) -> tuple[str, bool]:
    from helix_compiler.reporting import cpu_model

    counts: dict[str, int] = {}
    times: list[float] = []
    ok = True
    lines = ["| # | launch | ranks | victim | signal | phase (planned / at signal) | survivors: outcome, s to error |",
             "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        cells = []
        for r, (kind, dt, _msg) in sorted(row["outcomes"].items(), key=lambda kv: int(kv[0])):
            counts[kind] = counts.get(kind, 0) + 1
            if kind in ("hung", "unwrapped", "late", "no injection"):
                ok = False
            if dt is not None:
                times.append(dt)
            cells.append(f"r{r} {kind}" + (f" {dt:.2f}" if dt is not None else ""))
        lines.append(f"| {i} | {row['launch']} | {row['world']} | {row['victim']} | {row['signal']} | "
                     f"{row['phase']} / {row['injected_in']} | {'; '.join(cells)} |")
    n_surv = sum(counts.values())
    times.sort()
    med = times[len(times) // 2] if times else float("nan")
    worst = times[-1] if times else float("nan")
    kill = [dt for row in rows if row["signal"] == "SIGKILL" for (_, dt, _) in row["outcomes"].values() if dt is not None]
    stop = [dt for row in rows if row["signal"] == "SIGSTOP" for (_, dt, _) in row["outcomes"].values() if dt is not None]
    head = (f"## Fault campaign: SIGKILL/SIGSTOP of one rank of a running pipeline\n\n"
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
            f"{os.cpu_count()} CPUs, {cpu_model()}; torch {_torch_version()}; Python "
            f"{platform.python_version()} (shared with other jobs). Command: `{cmd}` ({elapsed:.0f} s).\n\n"
            f"Workload: `helix_compile` of a 4-layer Llama (hidden 64, seq 64, 2 folds, "
            f"M = 2 x ranks), `timeout={TIMEOUT:g}`, steps `loss = pipe(ids, labels); "
            f"loss.backward()` in a loop; the victim signals itself at a random offset into the "
            f"planned half of step 3 (or a later step when the timer fires outside that half). {len(rows)} injections, {n_surv} survivors: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + f". Time from signal to the survivor's exception: median {med:.2f} s, worst "
            f"{worst:.2f} s (bound: timeout + {SLACK:g} s = {TIMEOUT + SLACK:g} s); after SIGKILL "
            f"worst {max(kill, default=float('nan')):.2f} s, after SIGSTOP worst "
            f"{max(stop, default=float('nan')):.2f} s.\n\n"
            "Outcomes: `named` = RuntimeFailure naming the rank, instruction and micro batch; "
            "`tagged` = transport RuntimeFailure between instructions (the step's final drain) "
            "naming rank, peer, fold and the message tag (e.g. 'bwd E m0'); "
            "`collective` = RuntimeFailure of a bounded collective (rank, collective, timeout); "
            "`unwrapped`, `hung`, `late` fail the campaign. Launch: `torchrun` = torchrun "
            "--standalone (agent hosts the store); `spawn` = spawn_ranks (parent hosts the "
            "store); `bare` = plain processes, env:// rendezvous, rank 0 hosts the store and "
            "the process group has a 30-minute timeout.\n\n")
    return head + "\n".join(lines), ok


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 injections, do not write BENCHMARKS.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="run only the first N injections")
    ap.add_argument("--json", type=Path, default=None, help="also write every row (with messages) here")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker_from_env()
    trials = plan(args.quick, args.seed)[:args.limit]
    script = str(Path(__file__).resolve())
    rows = []
    t0 = time.time()
    for i, trial in enumerate(trials, 1):
        row = run_in_process(trial) if trial["launch"] == "spawn" else run_trial(trial, script)
        rows.append(row)
        outs = ", ".join(f"r{r} {k}" + (f" {dt:.2f}s" if dt is not None else "")
                         for r, (k, dt, _) in sorted(row["outcomes"].items()))
        print(f"[{i}/{len(trials)}] {trial['launch']} x{trial['world']} victim {trial['victim']} "
              f"{trial['signal']} {trial['phase']} (at {row['injected_in']}): {outs}", flush=True)
        for r, (k, _dt, msg) in row["outcomes"].items():
            if k not in ("named", "tagged", "collective"):
                print(f"    r{r}: {msg}  [log {row['log']}]", flush=True)
    cmd = "python benchmarks/fault_campaign.py" + (" --quick" if args.quick else "")
    body, ok = summarize(rows, cmd, time.time() - t0)
    print("\n" + body)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.quick and args.limit is None:
        from helix_compiler.reporting import write_section

        write_section(args.out, "fault_campaign", body)
        print(f"\nwrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
