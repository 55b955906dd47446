"""Where two backends' float32 relevances part: each backend's relevance at the output of every block of a
model, against the eager backend's in float64 on the same weights and inputs.

The H200 run of 2026-11-27 found ViT-B/16's CP-LRP relevance under Inductor 3.7e-3 (max relative) from
LXT's, while the `"triton"` backend's was 2.5e-6 and on the CPU Inductor's 5.6e-6. This prints, block by
block, how far each backend is from the float64 reference, so that the first block where one drifts shows
(the relevance pass runs from the output down: the last block is computed first).

    python bench/backend_agreement.py --device cuda                     # ViT-B/16, cp-lrp, batch 32
    python bench/backend_agreement.py --batch 2 --backends eager,inductor
"""

from __future__ import annotations

import argparse

import torch
from speed_worker import build_inputs, build_model

import lrpc


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b_16", choices=["vit_b_16"])
    parser.add_argument("--rules", default="cp-lrp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backends", default="eager,inductor,triton")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False  # compare the backends, not TF32's rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    model = build_model(args.model).to(device)
    inputs, target = build_inputs(args.model, {"batch": args.batch, "image": 224}, model)
    x, target = inputs["x"].to(device), target.to(device)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(len(model.encoder.layers))]

    def run(m: torch.nn.Module, x: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
        res = lrpc.compile(m, rules=args.rules, backend=backend, layers=blocks)(x, target=target)
        return {"input": res.relevance, **res.layers}

    reference = run(model.double(), x.double(), "eager")
    model.float()
    backends = [b for b in args.backends.split(",") if b != "triton" or device.type == "cuda"]
    print(f"{args.model}, {args.rules}, batch {args.batch}, {device}: max |a - ref| / max |ref| against float64 eager")
    print("(the relevance pass runs from the last block down)\n", flush=True)
    for backend in backends:  # one table per backend, printed as soon as it ran: a run cut short keeps them
        result = run(model, x, backend)
        print(f"| relevance at | {backend} |\n| --- | ---: |")
        for name in [*reversed(blocks), "input"]:
            print(f"| {name} | {relative(result[name], reference[name]):.1e} |")
        print(flush=True)

if __name__ == "__main__":
    main()
