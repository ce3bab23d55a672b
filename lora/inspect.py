"""What does an adapter change? `python -m lora.inspect ADAPTER_DIR [--base MODEL] [--png out.png]`

Prints the modules the adapter touches, r / alpha / scaling, its parameter count, and for every layer
the Frobenius norm of the update ΔW = scaling * B @ A, computed from the adapter file alone:

    ||B A||_F^2 = tr(Aᵀ Bᵀ B A) = sum((Bᵀ B) ∘ (A Aᵀ))        two r x r Gram matrices, never out x in

With --base (a folder or file of *.safetensors) it also prints ||ΔW|| / ||W||. --png draws a heat map,
module type (rows) x layer index (columns); modules outside numbered layers get the column "-".
"""

import argparse
import math
import re
from pathlib import Path

import torch

from .io import PREFIX, read_adapter

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")   # "model.layers.3.self_attn.q_proj" -> 3, "self_attn.q_proj"


def _split(module: str) -> tuple[int | None, str]:
    m = _LAYER.match(module)
    return (int(m.group(2)), m.group(3)) if m else (None, module)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def update_norms(adapter_dir) -> list[dict]:
    """One dict per adapted module: module, layer, kind, shape (out, in), r, params, norm = ||scaling*B@A||_F."""
    config, tensors = read_adapter(adapter_dir)
    modules = sorted({k[len(PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")},
                     key=_natural)
    rows = []
    for module in modules:
        a = tensors[f"{PREFIX}{module}.lora_A.weight"].double()                 # (r, in)
        b_key = f"{PREFIX}{module}.lora_B.weight"
        if b_key not in tensors:
            raise ValueError(f"{adapter_dir}: {module} has lora_A but no lora_B ({b_key} missing)")
        b = tensors[b_key].double()                                            # (out, r)
        sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0)                        # (r, r) ∘ (r, r) -> ||BA||_F^2
        layer, kind = _split(module)
        rows.append({"module": module, "layer": layer, "kind": kind, "shape": (b.shape[0], a.shape[1]),
                     "r": a.shape[0], "params": a.numel() + b.numel(), "norm": config.scaling * math.sqrt(sq)})
    return rows


def _base_norms(base: str, modules: list[str]) -> dict[str, float]:
    """||W||_F per module from a safetensors checkpoint (keys matched by module-path suffix)."""
    from safetensors import safe_open
    path = Path(base)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"--base {base!r}: expected a folder with *.safetensors or a .safetensors file")
    norms = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            owners = {k[:-len(".weight")]: k for k in sf.keys() if k.endswith(".weight")}
            for module in modules:
                key = next((k for p, k in owners.items()
                            if p == module or module.endswith("." + p) or p.endswith("." + module)), None)
                if key is not None and module not in norms:
                    w = sf.get_tensor(key)
                    if w.is_floating_point():
                        norms[module] = w.double().norm().item()
    return norms


def format_table(rows: list[dict], config, base_norms: dict | None = None) -> str:
    head = f"{'module':<52} {'layer':>5} {'shape':>12} {'r':>3} {'params':>9} {'||dW||_F':>10}"
    head += f" {'||dW||/||W||':>12}" if base_norms is not None else ""
    lines = [head, "-" * len(head)]
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        layer = "-" if row["layer"] is None else row["layer"]
        line = f"{row['module']:<52} {layer:>5} {shape:>12} {row['r']:>3} {row['params']:>9,} {row['norm']:>10.4g}"
        if base_norms is not None:
            w = base_norms.get(row["module"])
            line += f" {row['norm'] / w:>12.3e}" if w else f" {'?':>12}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], png) -> None:
    """Heat map of ||ΔW||_F: module type (rows) x layer index (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted({r["kind"] for r in rows})
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    cols = [str(i) for i in layers] + (["-"] if any(r["layer"] is None for r in rows) else [])
    grid = torch.full((len(kinds), len(cols)), float("nan"))                   # (kinds, layers)
    for r in rows:
        col = cols.index("-" if r["layer"] is None else str(r["layer"]))
        grid[kinds.index(r["kind"]), col] = r["norm"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(cols) + 3), max(2.5, 0.4 * len(kinds) + 1.5)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer index")
    ax.set_title("||scaling * B @ A||_F per layer")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import os
    import sys

    p = argparse.ArgumentParser(prog="python -m lora.inspect", description=__doc__.splitlines()[0])
    p.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--base", help="base model weights (folder or file of *.safetensors) for ||dW||/||W||")
    p.add_argument("--png", help="write a heat map of the update norms to this PNG")
    args = p.parse_args(argv)
    try:
        if args.png and not Path(args.png).resolve().parent.is_dir():
            raise FileNotFoundError(f"--png {args.png}: the folder {Path(args.png).parent} does not exist; create it")
        config, tensors = read_adapter(args.adapter_dir)
        rows = update_norms(args.adapter_dir)
        base = _base_norms(args.base, [r["module"] for r in rows]) if args.base else None
    except (ValueError, OSError) as e:    # train.cli.user_errors, inline: lora does not import train
        if os.environ.get("QLORA_TRACEBACK") == "1":
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    saved = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in tensors if ".lora_" not in k})
    print(f"adapter    {args.adapter_dir}  (base: {config.base_model_name_or_path or 'unknown'})")
    print(f"LoRA       r={config.r} alpha={config.lora_alpha} scaling={config.scaling:.4g} "
          f"rslora={config.use_rslora} dropout={config.lora_dropout}")
    print(f"modules    {len(rows)} adapted: {sorted({r['kind'] for r in rows})}; saved in full: {saved or 'none'}")
    print(f"parameters {sum(r['params'] for r in rows):,} in LoRA A/B, "
          f"{sum(t.numel() for k, t in tensors.items() if '.lora_' not in k):,} in modules_to_save\n")
    print(format_table(rows, config, base))
    if args.png:
        plot(rows, args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
