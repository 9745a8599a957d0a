"""Images per second for CLIP image-expert fine-tuning and evaluation (mergesec.kinds.image).

The vision tower has ViT-B/32's shape (hidden 768, 12 layers, 12 heads, MLP 3072, 224-pixel
images, 32-pixel patches) with random weights, behind a zero-shot head of 10 random class
embeddings (projection 512, logit scale 100), exactly as ``ImageTask`` trains and scores experts.
Images are ``builtin:synthetic_shapes`` pictures (64 px) put through a CLIP image processor (resize and crop
to 224, normalise). Measured, in one process on the same data:

- preprocess: the image processor alone (PIL -> pixel tensor), images/s;
- train full / train LoRA (r 16 on q/k/v/out_proj): forward, backward and AdamW step on
  preprocessed batches, images/s;
- eval: forward without gradients, images/s;

each for the precision chosen at run time (``--precision auto``: float32 on the CPU, bfloat16
autocast on a recent GPU).

    python benchmarks/image_throughput.py [--device cuda] [--batch-size 32] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_task(device: str, precision: str, lora: bool, seed: int = 0):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from mergesec.kinds.image.clip import ImageClassifier, ZeroShotHead
    from mergesec.kinds.image.task import ImageTask
    from mergesec.training.precision import choose_precision

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=32, projection_dim=512,
    )  # fmt: skip
    head = ZeroShotHead(
        torch.nn.functional.normalize(torch.randn(10, 512), dim=-1),
        torch.randn(512, 768) / 28,
        100.0,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    task = ImageTask(
        ImageClassifier(CLIPVisionModel(cfg), head), processor, device=device,
        precision=choose_precision(device, precision),
    )  # fmt: skip
    if lora:
        task.attach_lora(
            r=16, alpha=16, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
        )
        task.model.to(device)
    return task


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(n_images: int, seconds: list[float]) -> float:
    return n_images / statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    bs = args.batch_size or (128 if cuda else 32)
    steps = args.steps or (10 if cuda else 4)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mergesec.data.images import synthetic_images

    images = list(synthetic_images("shapes", sizes=(bs, 1, 1), image_size=64)["train"]["image"])
    task = build_task(args.device, args.precision, lora=False)
    out: dict[str, object] = {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "precision": task.precision.name,
        "batch_size": bs,
        "steps": steps,
    }

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        pix = task.processor(images=images, return_tensors="pt")["pixel_values"]
        times.append(time.perf_counter() - t)
    out["preprocess_images_per_s"] = rate(bs, times)
    batch = {"pixel_values": pix.float(), "labels": torch.randint(0, 10, (bs,))}

    for mode in ("full", "lora"):
        if mode == "lora":
            task = build_task(args.device, args.precision, lora=True)
        params = [p for p in task.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        task.model.train()
        times = []
        for i in range(steps + 1):
            sync(args.device)
            t = time.perf_counter()
            loss = task.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sync(args.device)
            if i:  # the first step warms up kernels and allocators
                times.append(time.perf_counter() - t)
        out[f"train_{mode}_images_per_s"] = rate(bs, times)
        out[f"train_{mode}_trainable_params"] = sum(p.numel() for p in params)

    task.model.eval()
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            sync(args.device)
            t = time.perf_counter()
            task.logits(batch)
            sync(args.device)
            if i:
                times.append(time.perf_counter() - t)
    out["eval_images_per_s"] = rate(bs, times)
    print(
        json.dumps(
            {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}, indent=2
        )
    )


if __name__ == "__main__":
    main()
