"""One rank of the distributed tests (tests/test_distributed.py starts it with RANK / WORLD_SIZE set).

    python tests/dist_worker.py equal OUT   # KL sensitivities + GPTQ codes of a tiny model -> OUT (rank 0)
    python tests/dist_worker.py split OUT   # GPTQ with the calibration split over ranks -> OUT.<rank>.pt
    python tests/dist_worker.py stream OUT SRC IDS  # streamed GPTQ of checkpoint SRC, calibration split, -> OUT
    python tests/dist_worker.py profile OUT # profile with Hessians, calibration split over ranks -> OUT.<rank>.pt
    python tests/dist_worker.py die OUT     # rank 1 exits at once; rank 0 records the error it gets
"""

from __future__ import annotations

import copy
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import archs  # noqa: E402

import moe_ao  # noqa: E402
from moe_ao import distributed  # noqa: E402
from moe_ao.discovery import units  # noqa: E402
from moe_ao.sensitivity import kl_sensitivities  # noqa: E402
from moe_ao.sensitivity_estimate import estimate_kl_sensitivities  # noqa: E402


def packed_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every packed parameter's inner tensors (codes, scales, slot table) and the float ones."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "__tensor_flatten__") and type(p) is not torch.nn.Parameter:
            for inner in p.__tensor_flatten__()[0]:
                out[f"{name}.{inner}"] = getattr(p, inner).detach().clone()
        else:
            out[name] = p.detach().clone()
    return out


def count_batches(module) -> list[int]:
    """Wraps ``module.run_layer`` to count the calibration batches this rank pushes through layers;
    the count is the returned list's one item."""
    batches = [0]
    run_layer = module.run_layer

    def counting(layer, inputs):
        batches[0] += len(inputs.hidden)
        return run_layer(layer, inputs)

    module.run_layer = counting
    return batches


def equal(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = archs.build("mixtral")
    ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    measured = [u for u in units(model) if u.kind in ("attention", "expert", "lm_head")]
    sizes = {u.name: 32 for u in measured}
    table, _ = kl_sensitivities(model, ids, measured, sizes, (2, 4), kl_windows=4, batch_size=4, progress=False)
    estimate, _ = estimate_kl_sensitivities(model, ids, measured, sizes, (2, 4), progress=False)
    # RTN candidates: each rank's pass 1 runs its own windows only
    estimate_rtn, _ = estimate_kl_sensitivities(model, ids, measured, sizes, (2, 4), quantizer="rtn", progress=False)
    planned = [u for u in measured if u.kind != "lm_head"]
    plan = moe_ao.Plan({u.name: (2 if u.kind == "expert" else 4) for u in planned}, group_size=32)
    moe_ao.quantize_(model, plan, method="gptq", calibration=ids, progress=False)
    if distributed.is_writer():
        torch.save({"table": table, "estimate": estimate, "estimate_rtn": estimate_rtn,
                    "tensors": packed_tensors(model),
                    "world": distributed.world()[1]}, out)


def split(out: pathlib.Path) -> None:
    from moe_ao.quant import gptq_driver

    torch.manual_seed(0)
    model = archs.build("mixtral")
    ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    batches = count_batches(gptq_driver)
    hessians = {}
    quantize_phase = gptq_driver._quantize_phase

    def recording(layer, prefix, obs, *args):  # the statistics GPTQ solves with, per layer and phase
        hessians.update({f"{prefix}:{len(hessians)}:{k}": h.clone() for k, h in obs.H.items()})
        return quantize_phase(layer, prefix, obs, *args)

    gptq_driver._quantize_phase = recording
    float_model = copy.deepcopy(model)
    planned = [u for u in units(model) if u.kind in ("attention", "expert")]
    plan = moe_ao.Plan({u.name: (2 if u.kind == "expert" else 4) for u in planned}, group_size=32)
    moe_ao.quantize_(model, plan, method="gptq", calibration=ids, progress=False, batch_size=2,
                     split_calibration=True)
    extra = moe_ao.quantization_report(model).extra
    with torch.no_grad():
        want = float_model(ids).logits.log_softmax(-1)
        kl = F.kl_div(model(ids).logits.log_softmax(-1), want, log_target=True, reduction="batchmean").item()
    rank = distributed.world()[0]
    torch.save({"tensors": packed_tensors(model), "routing": extra["routing_counts"], "tokens": extra["tokens"],
                "batches": batches[0], "world": distributed.world()[1], "kl": kl,
                "hessians": {k: h for k, h in hessians.items() if k.startswith("model.layers.0:")}},
               out.with_name(f"{out.name}.{rank}.pt"))


def stream(out: pathlib.Path) -> None:
    from moe_ao.stream import StreamedModel, quantize_pretrained

    src, ids = sys.argv[3], torch.load(sys.argv[4])
    found = units(StreamedModel(src).model)
    plan = moe_ao.Plan({u.name: (2, 4)[(u.expert or 0) % 2] for u in found if u.kind == "expert"}, group_size=32)
    quantize_pretrained(src, plan, out, method="gptq", calibration=ids, batch_size=1, split_calibration=True,
                        progress=False)


def profile(out: pathlib.Path) -> None:
    from moe_ao import profiling

    torch.manual_seed(0)
    model = archs.build("qwen2_moe")  # a dense layer, a shared expert and routed experts
    ids = torch.randint(0, model.config.vocab_size, (7, 16), generator=torch.Generator().manual_seed(0))
    batches = count_batches(profiling)
    # 4 batches, the last one short, and 24 of the 112 tokens sampled for the block predictor
    prof = profiling.profile(model, ids, hessians=True, batch_size=2, max_block_tokens=24, progress=False)
    torch.save({"profile": prof, "batches": batches[0], "world": distributed.world()[1]},
               out.with_name(f"{out.name}.{distributed.world()[0]}.pt"))


def die(out: pathlib.Path) -> None:
    rank, _ = distributed.world()
    if rank == 1:
        sys.exit(3)
    try:
        distributed.gather_dict({"x": torch.ones(2)}, "the test's tensors")
        out.write_text("no error")
    except distributed.DistributedError as e:
        out.write_text(f"DistributedError: {e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init_from_env()
    modes = {"equal": equal, "split": split, "stream": stream, "profile": profile, "die": die}
    modes[sys.argv[1]](pathlib.Path(sys.argv[2]))
