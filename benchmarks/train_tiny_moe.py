"""Train the two tiny embedded MoE language models, deterministically, on CPU.

Quantization effects are invisible on random weights, so ``moe_ao`` ships two
small *trained* MoE LMs (see ``moe_ao/models``). This script regenerates them
from the text committed under ``data/``:

* ``tiny-mixtral``: ``MixtralForCausalLM``, 8 experts, top-2.
* ``tiny-qwen2-moe``: ``Qwen2MoeForCausalLM`` in the DeepSeek-MoE style:
  16 fine-grained routed experts (top-4), a gated shared expert, and a dense
  first layer.

Training text is WikiText-2 *valid* + Tiny Shakespeare; WikiText-2 *test* is
held out and only evaluated on. Both models share one byte-level BPE
tokenizer trained on the training text.

After training, each checkpoint is saved in bf16, reloaded from disk, and
evaluated from the reloaded copy (so the recorded numbers are the shipped
model's), including the acceptance check: 2-bit RTN on all expert weights
must raise the KL divergence to the unquantized model at least 10x over 4-bit.

With ``--model all`` the two models train at once, one single-threaded
process each, i.e. two threads on the 2-core reference machine.

Example::

    python benchmarks/train_tiny_moe.py --model all \
        --results benchmarks/results/train_tiny_moe.md
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
TRAIN_FILES = (DATA / "wikitext-2" / "valid.txt", DATA / "tinyshakespeare" / "input.txt")
TEST_FILE = DATA / "wikitext-2" / "test.txt"
DEFAULT_OUT = REPO / "moe_ao" / "models" / "checkpoints"
MODELS = ("tiny-mixtral", "tiny-qwen2-moe")

# 4096 BPE tokens: big enough that the text compresses to ~3.3 chars/token,
# small enough that the (tied) embedding is only ~0.8M of the ~5.7M params.
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"  # also used as BOS, GPT-2 style
PAD = "<|pad|>"
SEQ_LEN = 256
BATCH_SIZE = 16  # 16 x 256 = 4096 tokens per step
DEV_EVERY_NTH_BLOCK = 50  # 2% of training blocks held out to watch overfitting
# The full test split is ~1480 blocks; 128 evenly strided blocks (32k tokens,
# ~9%) keep the six evaluation passes per model to minutes on a busy 2-core box.
DEFAULT_EVAL_BLOCKS = 128
# Group size 32 is the smallest group the project uses, i.e. the most
# favourable setting for RTN; the check must pass even there.
CHECK_GROUP_SIZE = 32
CHECK_MIN_RATIO = 10.0
# Steps per model: about an hour each on one Zen 5 thread (2.0 s / 2.9 s per step idle,
# ~2.4 s / ~3.3 s with both models training at once on the 2-core machine).
DEFAULT_STEPS = {"tiny-mixtral": 1500, "tiny-qwen2-moe": 1050}
# The dev and held-out test loss are recorded this often, for the report's curve.
CURVE_EVERY = 200


# --------------------------------------------------------------------------- data


def read_text(path: Path) -> str:
    # valid.txt starts with a UTF-8 BOM; it is not text.
    return path.read_text(encoding="utf-8").lstrip("\ufeff")


def train_tokenizer():
    """Byte-level BPE on the training text only (never on the test split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],  # ids 0 and 1
        # All 256 byte symbols, so any input text can be encoded (no <unk>).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([read_text(p) for p in TRAIN_FILES], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=SEQ_LEN,
    )


def to_blocks(ids: list[int]) -> torch.Tensor:
    """Cut a token stream into non-overlapping SEQ_LEN blocks (drop the tail)."""
    n = len(ids) // SEQ_LEN
    return torch.tensor(ids[: n * SEQ_LEN], dtype=torch.long).view(n, SEQ_LEN)


def load_data(tokenizer, eval_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (train, dev, test) blocks of token ids."""
    ids: list[int] = []
    for path in TRAIN_FILES:
        # verbose=False: whole files are far longer than model_max_length on purpose.
        ids += tokenizer(read_text(path), verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = to_blocks(ids)
    is_dev = torch.arange(len(blocks)) % DEV_EVERY_NTH_BLOCK == DEV_EVERY_NTH_BLOCK - 1
    test = to_blocks(tokenizer(read_text(TEST_FILE), verbose=False)["input_ids"])
    if 0 < eval_blocks < len(test):
        # Evenly strided, so every part of the test split is represented.
        test = test[torch.linspace(0, len(test) - 1, eval_blocks).long()]
    logger.info(
        "tokens: train %d blocks, dev %d blocks, test %d blocks (x%d tokens)",
        int((~is_dev).sum()), int(is_dev.sum()), len(test), SEQ_LEN,
    )
    return blocks[~is_dev], blocks[is_dev], test


# -------------------------------------------------------------------------- models


def build_config(name: str, tokenizer):
    """Architecture of each embedded model.

    Every linear's in_features (192, 128, 64) is a multiple of 64 so that
    quantization group sizes 32 and 64 divide it. Sizes are chosen so that
    both bf16 checkpoints together stay under 25 MB (~5.7M params each).
    """
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=192,
        num_hidden_layers=7,
        num_attention_heads=6,  # head_dim 32
        num_key_value_heads=2,  # GQA, as both real model families use
        max_position_embeddings=SEQ_LEN,
        # Tied: an untied head would add 0.8M params (1.6 MB) for little gain.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        output_router_logits=True,  # training only; switched off before saving
        # Switch-Transformer's coefficient: 10x the HF default, because tiny
        # routers collapse easily; still weak enough to leave natural imbalance.
        router_aux_loss_coef=0.01,
    )
    if name == "tiny-mixtral":
        return MixtralConfig(
            **common,
            head_dim=32,
            intermediate_size=128,  # per expert; top-2 gives 256 active = 1.33x hidden
            num_local_experts=8,
            num_experts_per_tok=2,
        )
    if name == "tiny-qwen2-moe":
        return Qwen2MoeConfig(
            **common,
            intermediate_size=384,  # the dense layer-0 MLP (2x hidden)
            mlp_only_layers=[0],  # DeepSeek-MoE: first layer dense
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=64,  # fine-grained: 1/3 hidden per expert
            shared_expert_intermediate_size=128,  # = 2 routed experts, always on
            norm_topk_prob=False,  # as Qwen1.5/2-MoE
        )
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def count_params(model) -> int:
    # parameters() de-duplicates tied tensors, so the tied head counts once.
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of steps, then cosine decay to 10% of peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(name: str, tokenizer, train_blocks, dev_blocks, test_blocks, steps: int, seed: int, lr: float):
    """Trains one model from scratch. Returns (model, stats).

    ``stats["curve"]`` lists (step, train loss, dev loss, test loss) every
    CURVE_EVERY steps. The test loss is only recorded, never used to choose
    anything (no early stopping): the last step's weights are the model.
    """
    from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM

    cls = MixtralForCausalLM if name == "tiny-mixtral" else Qwen2MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(build_config(name, tokenizer))
    logger.info("%s: %.2fM params", name, count_params(model) / 1e6)
    # No weight decay on norms (1-D), as is usual.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    # Fixed data order: a seeded permutation of the blocks per epoch.
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    recent: list[float] = []
    curve: list[tuple[int, float, float, float]] = []
    coef = model.config.router_aux_loss_coef
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < BATCH_SIZE:
            order = torch.randperm(len(train_blocks), generator=gen)
        idx, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        batch = train_blocks[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()  # = LM loss + coef * load-balancing loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_loss = out.loss.item() - coef * out.aux_loss.item()
        recent = (recent + [lm_loss])[-20:]
        dev = float("nan")
        if (step + 1) % CURVE_EVERY == 0 or step == steps - 1:
            dev = evaluate_nll(model, dev_blocks)
            curve.append((step + 1, sum(recent) / len(recent), dev, evaluate_nll(model, test_blocks)))
            model.train()
        if step % 50 == 0 or step == steps - 1 or not math.isnan(dev):
            logger.info(
                "%s step %d/%d lr %.2e lm_loss %.3f aux %.3f dev_loss %.3f (%.0fs)",
                name, step, steps, lr_at(step, steps, lr), lm_loss,
                out.aux_loss.item(), dev, time.perf_counter() - start,
            )
    stats = {
        "steps": steps,
        "train_seconds": time.perf_counter() - start,
        # Mean over the last 20 steps: single-batch losses are noisy.
        "train_loss": sum(recent) / len(recent),
        "curve": curve,
    }
    model.config.output_router_logits = False  # so loaded models' .loss is plain LM loss
    return model.eval(), stats


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def iter_logprobs(model, blocks: torch.Tensor, batch_size: int = BATCH_SIZE):
    """Yields (log-probs [B, T-1, V] float32, targets [B, T-1]) per batch."""
    model.eval()
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        yield F.log_softmax(logits, dim=-1), x[:, 1:]


def evaluate_nll(model, blocks: torch.Tensor) -> float:
    """Mean next-token NLL over non-overlapping blocks (each block starts fresh)."""
    total, count = 0.0, 0
    for logp, target in iter_logprobs(model, blocks):
        total += -logp.gather(-1, target[..., None]).sum().item()
        count += target.numel()
    return total / count


def fake_quant_rtn(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest along the last (in_features) dim.

    Every group of ``group_size`` consecutive input weights of an output row
    gets its own scale and zero point; the result is dequantized to float.
    """
    g = w.float().reshape(-1, group_size)
    lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-12)  # constant groups: avoid 0/0
    zero = torch.round(-lo / scale)  # integer zero point: lo maps to ~0
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(w.shape).to(w.dtype)


def is_expert_weight(name: str) -> bool:
    """Routed experts (fused 3-D gate_up/down) and shared-expert MLPs.

    Routers and the scalar ``shared_expert_gate`` are not experts.
    """
    return ".experts." in name or ".shared_expert." in name


def quantize_experts(model, bits: int, group_size: int):
    qmodel = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in qmodel.named_parameters():
            if is_expert_weight(name):
                # Fused experts are [E, out, in]: in_features is the last dim.
                p.copy_(fake_quant_rtn(p, bits, group_size))
    return qmodel


@torch.no_grad()
def rtn_kl_check(model, blocks: torch.Tensor, group_size: int = CHECK_GROUP_SIZE) -> dict:
    """Mean per-token KL(full precision || RTN) for 4- and 2-bit expert weights.

    Returns dict with ``kl4``, ``kl2`` and ``ratio`` = kl2 / kl4.
    """
    q4 = quantize_experts(model, 4, group_size)
    q2 = quantize_experts(model, 2, group_size)
    sums, count = {4: 0.0, 2: 0.0}, 0
    streams = zip(iter_logprobs(model, blocks), iter_logprobs(q4, blocks), iter_logprobs(q2, blocks))
    for (ref, _), (lp4, _), (lp2, _) in streams:
        for bits, lp in ((4, lp4), (2, lp2)):
            sums[bits] += (ref.exp() * (ref - lp)).sum().item()
        count += ref.shape[0] * ref.shape[1]
    kl4, kl2 = sums[4] / count, sums[2] / count
    return {"kl4": kl4, "kl2": kl2, "ratio": kl2 / kl4}


@torch.no_grad()
def expert_load(model, blocks: torch.Tensor) -> tuple[float, float]:
    """(min, max) share of routed token slots any expert gets, over MoE layers.

    Perfect balance is 1/num_experts for every expert.
    """
    shares = []
    for i in range(0, len(blocks), BATCH_SIZE):
        out = model(input_ids=blocks[i : i + BATCH_SIZE], output_router_logits=True)
        for j, logits in enumerate(out.router_logits):
            k = model.config.num_experts_per_tok
            hits = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
            if i == 0:
                shares.append(hits.double())
            else:
                shares[j] += hits
    frac = torch.stack([s / s.sum() for s in shares])
    return frac.min().item(), frac.max().item()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def evaluate_checkpoint(path: Path, test_blocks: torch.Tensor, dev_blocks: torch.Tensor) -> dict:
    """Evaluate the saved checkpoint as shipped: reload bf16 from disk, offline."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True)
    res = {"test_ppl_bf16": math.exp(evaluate_nll(model, test_blocks))}
    model = model.float()  # bf16 weights, fp32 compute: the reference for quantization
    res["test_ppl_fp32"] = math.exp(evaluate_nll(model, test_blocks))
    res["dev_loss"] = evaluate_nll(model, dev_blocks)
    res["load_min"], res["load_max"] = expert_load(model, dev_blocks)
    res.update(rtn_kl_check(model, test_blocks))
    res["params"] = count_params(model)
    res["size_mb"] = dir_size_mb(path)
    res["sha256"] = file_sha256(path / "model.safetensors")
    return res


# ---------------------------------------------------------------------------- report


def machine_info() -> dict:
    import os

    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def config_summary(cfg) -> str:
    head = (
        f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, vocab {cfg.vocab_size}, "
        f"tied emb {cfg.tie_word_embeddings}, aux coef {cfg.router_aux_loss_coef}"
    )
    if cfg.model_type == "mixtral":
        return (
            f"{head}; {cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, "
            f"expert intermediate {cfg.intermediate_size}"
        )
    return (
        f"{head}; {cfg.num_experts} routed experts top-{cfg.num_experts_per_tok}, "
        f"moe intermediate {cfg.moe_intermediate_size}, shared expert "
        f"{cfg.shared_expert_intermediate_size} (sigmoid-gated), dense layers {cfg.mlp_only_layers} "
        f"(intermediate {cfg.intermediate_size})"
    )


def verdict(row: dict) -> str:
    return "pass" if row["ratio"] >= CHECK_MIN_RATIO else "FAIL"


def write_report(path: Path, command: str, info: dict, rows: dict, configs: dict):
    eval_tokens = next(iter(rows.values()))["eval_tokens"]
    lines = [
        "# Training the embedded tiny MoE models",
        "",
        "Generated by `benchmarks/train_tiny_moe.py`.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), shared with other work, so wall times are "
        f"indicative; with `--jobs 2` both models train at once, one process each. "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}.",
        "",
        "Training text: WikiText-2 valid + Tiny Shakespeare (2% of blocks held out as dev). "
        f"Evaluation: WikiText-2 test, {eval_tokens} tokens in evenly strided non-overlapping "
        f"{SEQ_LEN}-token blocks; perplexity is per BPE token (vocab {VOCAB_SIZE}), not per word. "
        "Numbers are from the checkpoint reloaded from disk in bf16 (fp32 = the bf16 weights upcast).",
        "",
        f"KL check: mean per-token KL(full || RTN) on the same test blocks, with asymmetric min-max "
        f"round-to-nearest (group size {CHECK_GROUP_SIZE}, fake-quant in fp32) on all routed- and "
        f"shared-expert weights; pass if KL(2-bit) / KL(4-bit) >= {CHECK_MIN_RATIO:g}.",
        "",
        "| | " + " | ".join(rows) + " |",
        "| --- | " + " | ".join("---" for _ in rows) + " |",
    ]
    fields = [
        ("config", lambda n, r: config_summary(configs[n])),
        ("params", lambda n, r: f"{r['params'] / 1e6:.2f}M"),
        ("checkpoint size", lambda n, r: f"{r['size_mb']:.1f} MB"),
        ("steps (x 4096 tokens)", lambda n, r: str(r["steps"])),
        ("train wall time", lambda n, r: f"{r['train_seconds'] / 60:.1f} min ({r['threads']} thread(s))"),
        ("final train loss (mean last 20 steps)", lambda n, r: f"{r['train_loss']:.3f}"),
        ("dev loss", lambda n, r: f"{r['dev_loss']:.3f}"),
        ("test ppl bf16", lambda n, r: f"{r['test_ppl_bf16']:.2f}"),
        ("test ppl fp32", lambda n, r: f"{r['test_ppl_fp32']:.2f}"),
        ("expert load share min / max (dev)", lambda n, r: f"{r['load_min']:.3f} / {r['load_max']:.3f}"),
        ("KL 4-bit RTN", lambda n, r: f"{r['kl4']:.4g}"),
        ("KL 2-bit RTN", lambda n, r: f"{r['kl2']:.4g}"),
        ("KL ratio 2-bit / 4-bit", lambda n, r: f"{r['ratio']:.1f} ({verdict(r)})"),
        ("model.safetensors sha256", lambda n, r: f"`{r['sha256'][:16]}…`"),
    ]
    for label, fmt in fields:
        lines.append(f"| {label} | " + " | ".join(fmt(n, r) for n, r in rows.items()) + " |")
    lines.append("")
    for name, row in rows.items():
        if not row.get("curve"):
            continue
        lines += [
            f"Training curve of {name} (train loss: mean of the last 20 steps; dev and test: mean NLL "
            "per token, fp32 weights during training; test ppl = exp(test loss)):",
            "",
            "| step | train loss | dev loss | test loss | test ppl |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {s} | {tr:.3f} | {dv:.3f} | {te:.3f} | {math.exp(te):.1f} |" for s, tr, dv, te in row["curve"]]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    logger.info("wrote %s", path)


# ------------------------------------------------------------------------------ CLI


def run_model(name: str, args: argparse.Namespace) -> dict:
    """Trains (unless --check-only), saves and evaluates one model; returns its report row."""
    from transformers import AutoTokenizer

    path = args.out / name
    if args.check_only:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = train_tokenizer()  # deterministic, so both models get the same one
    train_blocks, dev_blocks, test_blocks = load_data(tokenizer, args.eval_blocks)
    stats = {"steps": 0, "train_seconds": float("nan"), "train_loss": float("nan")}
    if not args.check_only:
        steps = args.steps or DEFAULT_STEPS[name]
        model, stats = train(name, tokenizer, train_blocks, dev_blocks, test_blocks, steps, args.seed, args.lr)
        model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        del model
    row = {**stats, **evaluate_checkpoint(path, test_blocks, dev_blocks)}
    row["eval_tokens"] = test_blocks.numel()
    row["threads"] = torch.get_num_threads()
    logger.info("%s: %s", name, row)
    return row


def run_parallel(names: list[str], args: argparse.Namespace, threads: int) -> dict:
    """One worker process per model, each with ``threads`` intra-op threads.

    On a 2-core machine that is also running other work, two single-threaded
    processes beat one two-threaded process: small matmuls scale poorly across
    threads, and an OpenMP barrier stalls whenever either thread is preempted.
    """
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for name in names:
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--model", name, "--jobs", "1",
                "--threads", str(threads), "--steps", str(args.steps or 0), "--out", str(args.out),
                "--seed", str(args.seed), "--lr", str(args.lr), "--eval-blocks", str(args.eval_blocks),
                "--row-json", str(Path(tmp) / f"{name}.json"),
            ] + (["--check-only"] if args.check_only else [])
            procs[name] = subprocess.Popen(cmd)
        failed = [name for name, proc in procs.items() if proc.wait() != 0]
        if failed:
            raise RuntimeError(f"worker(s) failed: {failed}")
        return {name: json.loads((Path(tmp) / f"{name}.json").read_text()) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all", choices=[*MODELS, "all"])
    parser.add_argument(
        "--steps", type=int, default=0, help=f"optimizer steps per model (0: {DEFAULT_STEPS})"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint root dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--eval-blocks", type=int, default=DEFAULT_EVAL_BLOCKS, help="test blocks; 0 = all")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once, one process each")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads per process (default 1); bit-exact results need the same value",
    )
    parser.add_argument(
        "--check-only", action="store_true", help="evaluate existing checkpoints, no training"
    )
    parser.add_argument("--results", type=Path, default=None, help="write a markdown report here")
    parser.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)  # worker -> parent
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep the log readable
    command = "python " + shlex.join([str(Path(sys.argv[0])), *(sys.argv[1:] if argv is None else argv)])
    names = list(MODELS) if args.model == "all" else [args.model]
    jobs = max(1, min(args.jobs, len(names)))
    # One thread per model process by default, so that `--model NAME` alone
    # reproduces the checkpoint trained by `--model all` bit for bit.
    threads = args.threads or 1

    if jobs > 1:
        rows = run_parallel(names, args, threads)
    else:
        torch.set_num_threads(threads)
        rows = {name: run_model(name, args) for name in names}
    if args.row_json:
        import json

        args.row_json.write_text(json.dumps(rows[names[0]]))
        return 0

    if args.results:
        configs = {
            n: transformers.AutoConfig.from_pretrained(args.out / n, local_files_only=True) for n in names
        }
        write_report(args.results, command, machine_info(), rows, configs)

    ok = True
    for name, r in rows.items():
        passed = r["ratio"] >= CHECK_MIN_RATIO
        ok &= passed
        print(
            f"{name}: {r['params'] / 1e6:.2f}M params, {r['size_mb']:.1f} MB, {r['steps']} steps "
            f"in {r['train_seconds'] / 60:.1f} min, train loss {r['train_loss']:.3f}, "
            f"test ppl bf16 {r['test_ppl_bf16']:.2f} / fp32 {r['test_ppl_fp32']:.2f}, "
            f"KL 4-bit {r['kl4']:.4g} 2-bit {r['kl2']:.4g} ratio {r['ratio']:.1f} "
            f"{'PASS' if passed else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
