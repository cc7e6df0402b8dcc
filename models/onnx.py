"""ONNX export of the image tower with per-head outputs, and the onnxruntime runner.

The exported graph is the Decomposer's own computation (`Decomposer.flat`, models/decompose.py),
so torch and ONNX compute the same thing. torch.onnx.export needs tensors as outputs, so a thin
adapter (_Flat) traces `flat`, which returns the Decomposition's tensors as a tuple in the fixed
order of decompose.OUTPUTS: `embedding` [B, d], `head_cls` [B, L', H, d], `rest` [B, d] and,
with tokens, `head_tokens` [B, L', H, T, d]. The graph's output names are those field names, so
OnnxRunner rebuilds the same Decomposition; the batch axis is dynamic.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from models.decompose import Decomposer, Decomposition, LayerSpec, micro_batches, resolve_layers

GRAPH_VERSION = 3  # bump when the exported graph changes, so cached exports are redone (2: fused attention;
                   # 3: any tower through models/towers, pool_mlp output)


def export_onnx(lm, path: str | os.PathLike, layers: LayerSpec = "last4", tokens: bool = False,
                opset: int = 17, optimize: bool = True) -> Path:
    """Write the decomposition graph of `lm` to `path` (float32, CPU export). Returns the path.

    optimize: fuse bias+GELU and residual+LayerNorm with onnxruntime's transformer optimizer
    (contrib ops that the CPU and CUDA providers both run); parity with torch is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if next(lm.visual.parameters()).dtype != torch.float32 or lm.device.type != "cpu":
        raise ValueError("export from a float32 model on the CPU (load_model(..., device='cpu'))")
    dec = Decomposer(lm.visual, resolve_layers(layers, lm.layers), tokens=tokens, traceable=True).eval()
    dummy = torch.randn(2, 3, lm.image_size, lm.image_size)
    # a per-process temporary name: two jobs exporting the same model at once must not write
    # into one file (each then moves its own complete file into place)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp.onnx")
    try:
        _export(_Flat(dec), dummy, tmp, list(dec.outputs), opset)
        import onnx
        model = _fuse(tmp, lm) if optimize else onnx.load(str(tmp))
        meta = dict(model_id=lm.model_id, layers=dec.layers, tokens=tokens, image_size=lm.image_size,
                    graph_version=GRAPH_VERSION, micro_batch=dec.micro_batch)
        entry = model.metadata_props.add()
        entry.key, entry.value = "clip_atlas", json.dumps(meta)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fuse(path: Path, lm):
    """onnxruntime's ViT fusions (offline, opt_level 0 so the file stays provider-neutral)."""
    import contextlib
    import io
    import onnx
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        with contextlib.redirect_stdout(io.StringIO()):      # its notes ("failed in shape inference") are not the job's output
            fused = optimize_model(str(path), model_type="vit", num_heads=lm.heads, hidden_size=lm.width, opt_level=0)
        return fused.model
    except Exception as exc:  # an unfusable graph is still a correct graph
        warnings.warn(f"ONNX fusion skipped ({type(exc).__name__}: {exc})")
        return onnx.load(str(path))


class _Flat(torch.nn.Module):
    """The tracing adapter: forward(images) = dec.flat(images), a tuple of tensors in the order
    dec.outputs (a subsequence of decompose.OUTPUTS), which torch.onnx.export can trace."""

    def __init__(self, dec: Decomposer):
        super().__init__()
        self.dec = dec

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.dec.flat(images)


def _export(module, dummy, tmp, names, opset):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), str(tmp), input_names=["images"], output_names=names,
            dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )


def select_providers(prefer: Optional[str] = None) -> list[str]:
    """CUDA when onnxruntime can use it (and a GPU is visible), else CPU. `prefer`: 'cpu' | 'cuda'."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    if prefer == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and (prefer == "cuda" or torch.cuda.is_available()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if prefer == "cuda":
        raise RuntimeError("the CUDA execution provider is not available here (no GPU or no onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


class OnnxRunner:
    """Runs an exported decomposition graph with onnxruntime; same outputs as models.decompose."""

    def __init__(self, path: str | os.PathLike, providers: Optional[Sequence[str]] = None, threads: int = 0,
                 micro_batch: Optional[int] = None, spin: bool = True):
        """micro_batch: images per CPU micro-batch (default: the exporting Decomposer's, stored in
        the file; 0: the whole batch). CUDA always takes the whole batch.

        spin: onnxruntime's intra-op threads busy-wait between parallel sections (its default, the
        fastest for the model alone). A job that runs other threads beside the model (the embed
        job's loader and writer) passes False: spinning threads take the cores those threads need
        (toy model, 2 cores: 0.41 of the model alone's throughput with spinning, 0.51 without)."""
        import onnxruntime as ort
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}; create it with `python -m etl export`")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        # Parallel loops hand out shrinking blocks of work instead of one fixed share per thread,
        # so a thread that the OS (or a busy host) delays does not hold the others up.
        opts.add_session_config_entry("session.dynamic_block_base", "4")
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers or select_providers()))
        meta = self.session.get_modelmeta().custom_metadata_map.get("clip_atlas", "{}")
        self.meta = json.loads(meta)
        self.layers = list(self.meta.get("layers", []))
        self.micro_batch = int(self.meta.get("micro_batch", 0) if micro_batch is None else micro_batch)
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def __call__(self, images: np.ndarray | torch.Tensor) -> Decomposition:
        """images: float32 [B, 3, S, S] (preprocessed) -> Decomposition of torch tensors."""
        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
        images = np.ascontiguousarray(images, np.float32)
        step = self.micro_batch if self.micro_batch and self.provider == "CPUExecutionProvider" else max(len(images), 1)
        parts = [self.session.run(self.outputs, {"images": images[sl]}) for sl in micro_batches(len(images), step)]
        arrays = [np.concatenate(p) for p in zip(*parts)] if len(parts) > 1 else parts[0]
        t = {k: torch.from_numpy(v) for k, v in zip(self.outputs, arrays)}     # graph output names = field names
        return Decomposition(layers=list(self.layers), **t)
