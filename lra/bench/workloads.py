"""What lra-bench measures, as closures built inside the worker process.

A workload exposes `forward()` (inference) and `train_step()` (forward + backward; the classifier also
takes an optimizer step). Two kinds:
  layer: MultiHeadAttention alone (projections included), ours or a public reference implementation;
  model: the whole classifier of a task at its protocol size (batch and length from conf/task).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

# The public implementations timed by `--with-reference`, as (pip name, version) pairs.
REFERENCE_PACKAGES = {
    "nystrom": ("nystrom-attention", "0.0.14"),
    "linformer": ("linformer", "0.2.3"),
    "performer": ("performer-pytorch", "1.1.4"),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Workload:
    forward: Callable[[], Any]
    train_step: Callable[[], Any]
    tokens: int  # tokens per call (batch x length, both documents for Retrieval)
    batch: int
    n: int  # sequence length
    module: nn.Module | None = None  # what is timed (for inspection; the bench never reads it)
    dtype: torch.dtype | None = None  # of the arithmetic (the matmul rate is measured in it)


def _hydra_value(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def build_reference(kind: str, n: int, dim: int, heads: int, head_dim: int, options: dict) -> nn.Module:
    """The public implementation of `kind` with the same settings as ours. Imported here only."""
    try:
        if kind == "nystrom":
            from nystrom_attention import NystromAttention

            conv = options.get("conv_kernel", 33)
            return NystromAttention(dim=dim, dim_head=head_dim, heads=heads, num_landmarks=options["num_landmarks"],
                                    pinv_iterations=options["pinv_iterations"], residual=conv > 0,
                                    residual_conv_kernel=conv or 1)
        if kind == "linformer":
            from linformer import LinformerSelfAttention

            return LinformerSelfAttention(dim=dim, seq_len=n, k=options["proj_dim"], heads=heads, dim_head=head_dim,
                                          share_kv=bool(options.get("share_kv", False)))
        if kind == "performer":
            from performer_pytorch import SelfAttention

            if options.get("kernel", "softmax") != "softmax":
                raise ValueError("the performer-pytorch comparison uses the softmax kernel")
            return SelfAttention(dim=dim, heads=heads, dim_head=head_dim, nb_features=options["num_features"])
    except ImportError as err:
        pkg, ver = REFERENCE_PACKAGES[kind]
        raise ImportError(f"{pkg}=={ver} is needed for --with-reference ({err}); run `make install-bench`") from err
    raise ValueError(f"no reference implementation for '{kind}'; valid: {', '.join(REFERENCE_PACKAGES)}")


def reference_options(kind: str, attention: dict) -> dict:
    """Our composed attention options (`cfg.attention`) as the public package's settings, for the model
    comparison: what the package has an argument for, the rest as the package does it."""
    if kind == "nystrom":
        return {k: attention[k] for k in ("num_landmarks", "pinv_iterations", "conv_kernel")}
    if kind == "linformer":  # one E for keys and values when ours shares them (the package: per layer)
        return {"proj_dim": attention["proj_dim"], "share_kv": attention["sharing"] in ("kv", "layerwise")}
    if kind == "performer":
        return {"num_features": attention["num_features"], "kernel": attention["kernel"]}
    raise ValueError(f"no reference implementation for '{kind}'; valid: {', '.join(REFERENCE_PACKAGES)}")


def model_reference_options(spec: dict, backend: str) -> dict:
    """The package settings the model comparison runs `backend`'s reference with (from the composed
    preset of spec's task, as `model_workload` composes it)."""
    from omegaconf import OmegaConf

    from lra.config import compose

    overrides = [f"task={spec['task']}", f"attention={backend}"]
    if spec.get("preset"):
        overrides.append(f"experiment={spec['preset']}/{spec['task']}")
    return reference_options(backend, OmegaConf.to_container(compose(overrides).attention, resolve=True))


class PackageAttention(nn.Module):
    """A public package's self-attention (its own q/k/v and output projections) in the place of our
    multi-head wrapper: (B, L, dim) + mask (B, L), True = real token -> (B, L, dim), then the wrapper's
    output dropout. The Linformer package takes no mask (it attends over padding, as it always does)."""

    def __init__(self, kind: str, module: nn.Module, out_dropout: nn.Module) -> None:
        super().__init__()
        self.kind, self.module, self.drop = kind, module, out_dropout

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "linformer" or key_padding_mask is None:
            return self.drop(self.module(x))
        return self.drop(self.module(x, mask=key_padding_mask))


def layer_workload(spec: dict, impl: dict, device: torch.device) -> Workload:
    """impl: {"impl": "ours" | "reference", "backend": name, "options": {...}}; input (B, n, dim)."""
    from models.multihead import MultiHeadAttention

    n, dim, heads, head_dim = spec["n"], spec["dim"], spec["heads"], spec["head_dim"]
    dtype = DTYPES[spec["dtype"]]
    if impl["impl"] == "ours":
        from lra.config import attention_spec

        target = {k: v for k, v in attention_spec(impl["backend"]).items() if k in ("_target_", "name")}
        net: nn.Module = MultiHeadAttention(dim, heads, target, head_dim=head_dim, max_len=n, **impl["options"])
        call = lambda x: net(x)  # noqa: E731
    else:
        net = build_reference(impl["backend"], n, dim, heads, head_dim, impl["options"])
        call = lambda x: net(x)  # noqa: E731
    net = net.to(device=device, dtype=dtype).train()
    x = torch.randn(spec["batch"], n, dim, device=device, dtype=dtype)  # (B, n, dim)

    def forward() -> None:
        with torch.inference_mode():
            call(x)

    def train_step() -> None:
        call(x).float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    return Workload(forward, train_step, spec["batch"] * n, spec["batch"], n, net, dtype)


def padded_batch(batch: int, n: int, vocab_size: int, fixed_length: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as the DataModule hands it over: ids (B, n) and mask (B, n), True = real token. Tasks of
    variable length (ListOps, Text, Retrieval) get real lengths drawn uniformly from n/4..n, the first
    example full, so the padded length is n and masking costs what it costs in training; pixel tasks
    (`fixed_length`) are all real tokens, as their batches are."""
    lengths = torch.full((batch,), n)
    if not fixed_length:
        lengths = torch.randint(max(1, n // 4), n + 1, (batch,), generator=generator)
        lengths[0] = n
    mask = torch.arange(n)[None, :] < lengths[:, None]  # (B, n)
    ids = torch.randint(1, vocab_size, (batch, n), generator=generator).masked_fill(~mask, 0)  # 0: padding
    return ids, mask


def model_workload(spec: dict, impl: dict, device: torch.device) -> Workload:
    """The task's classifier with its optimizer: the protocol preset's model (`spec["preset"]`, e.g.
    nystromformer: conf/experiment/nystromformer/<task>.yaml with the backend's protocol options) or, with
    no preset, the defaults; batch and length from the task unless `model_batch`/`model_length` say."""
    from hydra.utils import get_class, instantiate

    from lra.config import compose
    from lra.training.run import build_net

    overrides = [f"task={spec['task']}", f"attention={impl['backend']}"]
    if spec.get("preset"):  # the published protocol's model for this task and backend (its preset)
        overrides.append(f"experiment={spec['preset']}/{spec['task']}")
    if spec.get("model_length"):  # a smaller model for quick checks; the protocol size otherwise
        overrides.append(f"task.max_len={spec['model_length']}")
    if impl.get("impl", "ours") == "ours":  # a reference's options are the package's (see reference_options)
        overrides += [f"attention.{k}={_hydra_value(v)}" for k, v in impl["options"].items()]
    cfg = compose(overrides)
    reader = get_class(cfg.task.reader._target_)  # class attributes only: no data is read
    vocab_size, num_classes = reader.vocab_size, int(cfg.task.num_classes)
    n = int(cfg.task.max_len)
    batch = int(spec.get("model_batch") or cfg.data.batch_size)
    net = build_net(cfg, vocab_size, num_classes)  # every model argument from the config, as lra-train builds it
    if impl.get("impl") == "reference":  # the same model with the public package's attention in every layer
        kind = impl["backend"]  # impl["options"]: the package's settings, from model_reference_options
        for block in net.encoder.blocks:
            mha = block.attn
            block.attn = PackageAttention(kind, build_reference(kind, n + int(net.encoder.cfg.cls), int(cfg.model.dim),
                                                                mha.num_heads, mha.head_dim, impl["options"]), mha.drop)
    net = net.to(device=device, dtype=DTYPES[spec["dtype"]]).train()
    opt = instantiate(cfg.optimizer)(net.parameters())
    if spec.get("compile"):  # as lra-train compile=true: in place; the warm-up steps pay the compilation
        net.compile()
    g = torch.Generator().manual_seed(0)
    ids, mask = padded_batch(batch, n, vocab_size, reader.fixed_length, g)
    data = {"input_ids": ids.to(device), "mask": mask.to(device)}
    docs = 1
    if cfg.task.head == "dual":  # Retrieval: a second document per example
        data.update(input_ids2=data["input_ids"].roll(1, 0), mask2=data["mask"].roll(1, 0))
        docs = 2
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)

    def forward() -> None:
        with torch.inference_mode():
            net(data)

    def train_step() -> None:
        loss = nn.functional.cross_entropy(net(data).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Workload(forward, train_step, batch * n * docs, batch, n, net, DTYPES[spec["dtype"]])
