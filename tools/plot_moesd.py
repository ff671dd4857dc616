"""MoESD's question, measured: how the speedup of speculative decoding moves with batch for an MoE model and for a
dense model of the same active size, next to what the performance model predicts.

The MoE is the bundled model; the dense model is built from it (same embeddings, attention and norms; each
layer's MLP = the concatenation of two of its experts, so a token computes exactly as many weights as one routed
to top-2). Both are verified with the oracle drafter (calibrate/oracle.py: free drafts of a fixed acceptance), so
the curves show the verification economics alone, the part MoESD models; the MoE is also run with its real best
drafter (shadow-int4 self-drafting).

    python tools/plot_moesd.py [--batches 1 2 4 8 16 32] [--acceptance 0.8] [--k 4] [--hardware PROFILE]
        [--out docs/bench/moesd-batch]          # writes .json and .png
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moespec.assets import REFERENCE_MODEL
from moespec.bench.machine import machine
from moespec.calibrate.validate import validate
from moespec.perf.hardware import get_profile


def dense_twin(folder: Path) -> Path:
    """A dense qwen3 with the bundled MoE's attention and, per layer, experts 0 and 1 side by side as its MLP."""
    cfg = json.loads((REFERENCE_MODEL / "config.json").read_text())
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    k, inter = cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    sd = {}
    with safe_open(str(REFERENCE_MODEL / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if ".mlp." not in name:
                sd[name] = f.get_tensor(name)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp."
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                sd[p + proj + ".weight"] = torch.cat([f.get_tensor(f"{p}experts.{e}.{proj}.weight")
                                                      for e in range(k)], dim=dim).contiguous()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    dense = {key: v for key, v in cfg.items() if not any(s in key for s in ("expert", "moe", "router", "sparse",
                                                                              "mlp_only"))}
    dense.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], intermediate_size=k * inter)
    (folder / "config.json").write_text(json.dumps(dense, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(REFERENCE_MODEL / name, folder / name)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--acceptance", type=float, default=0.8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--hardware", default="this-machine", help="hardware profile (moespec calibrate writes one)")
    p.add_argument("--out", default="docs/bench/moesd-batch")
    a = p.parse_args()
    hw = get_profile(a.hardware)
    dense = dense_twin(Path.home() / ".cache" / "moespec" / "reference-dense-twin")
    runs = {}
    for name, model, drafter in (("moe", REFERENCE_MODEL, f"oracle:{a.acceptance}"),
                                 ("dense", dense, f"oracle:{a.acceptance}"),
                                 ("moe-shadow-int4", REFERENCE_MODEL, "shadow-int4")):
        print(f"{name}: {drafter}, batches {a.batches}", flush=True)
        runs[name] = validate(hw, model, tuple(a.batches), a.new_tokens, repetitions=a.repetitions,
                              draft_lens=(0, a.k), prompt_set="humaneval", prompt_len=64, drafter=drafter,
                              log=lambda m: print("  " + m, flush=True))
    out = Path(a.out)
    report = {"machine": machine(), "hardware": hw.name, "k": a.k, "acceptance": a.acceptance,
              "dense_model": str(dense), "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    for name, r in runs.items():
        for s in r["speedups"]:
            print(f"{name:16} batch {s['batch']:>3}: measured {s['measured_speedup']:.2f}x  predicted "
                  f"{s['predicted_speedup']:.2f}x  (acceptance {s['acceptance']:.2f})")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"moe": "tab:blue", "dense": "tab:orange", "moe-shadow-int4": "tab:green"}
    labels = {"moe": f"MoE (bundled), oracle drafts a={report['acceptance']}",
              "dense": f"dense twin (same active size), oracle drafts a={report['acceptance']}",
              "moe-shadow-int4": "MoE, self-drafting with shadow int4 experts"}
    for name, r in report["runs"].items():
        b = [s["batch"] for s in r["speedups"]]
        ax.plot(b, [s["measured_speedup"] for s in r["speedups"]], "o-", color=colors[name],
                label=labels[name] + ": measured")
        ax.plot(b, [s["predicted_speedup"] for s in r["speedups"]], "--", color=colors[name], alpha=0.7,
                label="predicted")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows decoded together)")
    ax.set_ylabel(f"speedup over plain decoding (k = {report['k']})")
    ax.set_title(f"Speculation vs batch, all experts resident ({report['machine']['cpu']}, float32)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
