"""torch.distributed on CPU: N ranks x 1 thread vs 1 rank x 1 thread, for measured KL sensitivities and GPTQ.

Each configuration runs as its own set of processes (gloo, ``RANK`` / ``WORLD_SIZE`` set as
torchrun sets them), on an embedded model with paper_table's setup (group 32, GPTQ,
64 x 256 calibration tokens; the KL measured on ``--kl-windows`` windows); rank 0 times
each step after a barrier and checks the results equal the one-rank run's.

    python benchmarks/bench_distributed.py                       # tiny-mixtral, 1 vs 2 ranks
    python benchmarks/bench_distributed.py --kl-windows 16       # paper_table's KL windows

Writes ``benchmarks/results/distributed.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch

    import moe_ao
    from moe_ao import distributed, models
    from moe_ao.calibration import load_calibration, load_eval_tokens
    from moe_ao.eval.metrics import compare, eval_windows, logprobs
    from moe_ao.planner import measure_sensitivities, plan

    torch.set_num_threads(1)
    distributed.init_from_env()
    model, tok = models.load(args.model)
    calib = load_calibration("wikitext2-valid", tok, 64, 256, 0, model.config)
    out = {}
    distributed.barrier("start")
    t = time.perf_counter()
    stats = measure_sensitivities(model, calib, group_size=32, kl_windows=args.kl_windows, progress=False)
    distributed.barrier("sensitivities")
    out["measure_sensitivities_s"] = time.perf_counter() - t
    p = plan(model, "knapsack", budget_bits=2.5, stats=stats, group_size=32)
    windows = eval_windows(load_eval_tokens(tok), 256, 16)  # WikiText-2 test: held out
    ref = logprobs(model, windows)
    split = copy.deepcopy(model)
    t = time.perf_counter()
    moe_ao.quantize_(model, p, method="gptq", calibration=calib, progress=False)
    distributed.barrier("gptq")
    out["gptq_s"] = time.perf_counter() - t
    t = time.perf_counter()
    moe_ao.quantize_(split, p, method="gptq", calibration=calib, progress=False, split_calibration=True)
    distributed.barrier("gptq, calibration split")
    out["gptq_split_s"] = time.perf_counter() - t
    if distributed.is_writer():
        codes = {n: [getattr(q, k).clone() for k in q.__tensor_flatten__()[0]] for n, q in model.named_parameters()
                 if type(q) is not torch.nn.Parameter}
        kl = {"gptq": compare(ref, model, windows).kl, "gptq_split": compare(ref, split, windows).kl}
        torch.save({"times": out, "table": stats.sensitivities, "codes": codes, "kl": kl}, args.worker_out)


def launch(world: int, args: argparse.Namespace, out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker-out", str(out), "--model", args.model,
               "--kl-windows", str(args.kl_windows)]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a rank of the {world}-rank run failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--kl-windows", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="benchmarks/results/distributed.md")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        return worker(args)
    import torch

    runs = {}
    for world in args.ranks:
        path = Path(f"/tmp/moe_ao_bench_distributed_{os.getpid()}_{world}.pt")
        launch(world, args, path)
        runs[world] = torch.load(path, weights_only=False)
        path.unlink()
    base = runs[args.ranks[0]]
    lines = ["# torch.distributed on CPU (gloo): N ranks x 1 thread", "", f"Machine: {machine()}; load average "
             f"{os.getloadavg()[0]:.2f} at the end (2 cores: above ~2 the ranks did not get a core each).", "",
             f"Model {args.model}, group 32, 64 x 256 calibration tokens of WikiText-2 valid; measure_sensitivities "
             f"(GPTQ candidates, widths 2/3/4/8) on {args.kl_windows} windows; then GPTQ of its knapsack plan at 2.5 "
             "bits, every rank running every calibration batch (codes bit-identical to 1 rank), and with "
             "`split_calibration=True` (each rank runs its share of the batches, Hessians summed over ranks). KL: "
             "vs the float model on 16 x 256 held-out WikiText-2 test tokens.", "",
             "| ranks | measure_sensitivities s | speed-up | GPTQ s | speed-up | table and GPTQ codes vs 1 rank "
             "| GPTQ split_calibration s | speed-up | KL GPTQ | KL split |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for world, r in runs.items():
        t, t0 = r["times"], base["times"]
        same = r["table"] == base["table"] and r["codes"].keys() == base["codes"].keys() and all(
            all(torch.equal(a, b) for a, b in zip(r["codes"][k], base["codes"][k])) for k in r["codes"])
        lines.append(f"| {world} | {t['measure_sensitivities_s']:.1f} | "
                     f"{t0['measure_sensitivities_s'] / t['measure_sensitivities_s']:.2f}x | {t['gptq_s']:.1f} | "
                     f"{t0['gptq_s'] / t['gptq_s']:.2f}x | {'bit-identical' if same else 'DIFFERENT'} | "
                     f"{t['gptq_split_s']:.1f} | {t0['gptq_s'] / t['gptq_split_s']:.2f}x | {r['kl']['gptq']:.3e} | "
                     f"{r['kl']['gptq_split']:.3e} |")
    lines += ["", f"Command: `python benchmarks/bench_distributed.py {' '.join(sys.argv[1:])}`"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({w: r["times"] for w, r in runs.items()}))


if __name__ == "__main__":
    main()
